"""The training sets an evaluation compares: the real training images, plus synthetic ones mixed in.

Each variant is a YOLO dataset on disk that ultralytics trains on from any folder:

    images/train/<set>__<file>     the real training images and the chosen synthetic ones
    labels/train/<set>__<stem>.txt their labels, synthetic ones rewritten to the real class ids
    data.yaml                      no `path:`; train: images/train; val: the real validation
                                   folder (absolute); names: the real set's
    mix.json                       every source file and where it went, and how it was chosen

Synthetic images are chosen by a seeded shuffle of each set (keyed by the seed and the set's name),
taking the first n: the same seed gives the same images, a larger share the same ones and more,
and adding a set leaves the others' choice alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from diffplat.data.bdd import CATEGORY_ALIASES as BDD_ALIASES  # 2018 names -> det_20 names
from diffplat.fileio import link_or_copy, replace_dir

log = logging.getLogger("diffplat")

# ultralytics' IMG_FORMATS (8.4): the files its loader takes from an image folder, so a set here
# holds exactly the images ultralytics would train on.
IMAGE_SUFFIXES = frozenset({"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"})  # fmt: skip


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path | None  # None: no label file, an image with no objects (as ultralytics reads it)
    rel: str  # the image's path inside its split folder, "/"-separated


def label_path(image: Path) -> Path:
    """Where ultralytics looks for an image's labels: the last `images` folder in the path becomes
    `labels`, the suffix `.txt` (ultralytics.data.utils.img2label_paths)."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(labels.join(str(image).rsplit(images, 1)).rsplit(".", 1)[0] + ".txt")


def list_samples(folders: Sequence[Path], name: str) -> list[Sample]:
    """The images under `folders` (recursively, hidden files passed over, as ultralytics' glob
    does) with their label files; raises if there are none."""
    found = []
    for folder in folders:
        images = []
        for path in Path(folder).rglob("*"):
            rel = path.relative_to(folder)
            if path.suffix[1:].lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in rel.parts) and path.is_file():
                images.append((rel.as_posix(), path))
        for rel, image in sorted(images):
            label = label_path(image)
            found.append(Sample(image, label if label.is_file() else None, rel))
    if not found:
        raise ValueError(f"{name}: no images in {', '.join(str(f) for f in folders)}")
    return found


def _names(value, where: str) -> dict[int, str]:
    if isinstance(value, list):
        names = dict(enumerate(value))
    elif isinstance(value, dict):
        try:
            names = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{where}: `names` keys must be class ids (0, 1, ...)") from None
    else:
        raise ValueError(f"{where}: `names` must be a list or an id -> name mapping, got {type(value).__name__}")
    if not names or sorted(names) != list(range(len(names))):
        raise ValueError(f"{where}: `names` must give classes 0..n-1, got ids {sorted(names)}")
    return {i: str(names[i]) for i in sorted(names)}


def _root(value, data_yaml: Path, name: str) -> Path:
    """The folder `train`/`val` are read against: `path:`, or data.yaml's own folder."""
    if value in (None, ""):
        return data_yaml.parent
    if not isinstance(value, str):
        raise ValueError(f"{name}: `path:` in {data_yaml} must be a folder, got {type(value).__name__}")
    root = Path(value)  # a relative one is read against the working directory, as ultralytics does
    if not root.is_dir():
        how = "" if root.is_absolute() else " (a relative `path:` is read against the working directory, as ultralytics reads it)"
        raise FileNotFoundError(f"{name}: path: {value} in {data_yaml} is not a folder{how}")
    return root.resolve()


@dataclass(frozen=True)
class YoloSet:
    """A YOLO detection dataset as its data.yaml describes it; `name` names it in errors, in
    mix.json and in the mixed files' names."""

    name: str
    data_yaml: Path
    names: dict[int, str]
    splits: dict[str, tuple[Path, ...]]  # "train" / "val" -> image folders, absolute

    @classmethod
    def load(cls, where: str | Path, name: str | None = None) -> YoloSet:
        """From a data.yaml, or a folder holding one; `name` defaults to the yaml's folder name."""
        where = Path(where)
        data_yaml = (where if where.suffix in (".yaml", ".yml") else where / "data.yaml").resolve()
        name = name or data_yaml.parent.name
        if not data_yaml.is_file():
            raise FileNotFoundError(f"{name}: no data.yaml at {data_yaml}")
        try:
            data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"{name}: {data_yaml} is not readable YAML ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{name}: {data_yaml} must hold a mapping (train, val, names)")
        names = _names(data.get("names"), f"{name}: {data_yaml}")
        root = _root(data.get("path"), data_yaml, name)
        splits = {}
        for split in ("train", "val"):
            value = data.get(split)
            if value in (None, "", []):
                continue
            folders = []
            for entry in value if isinstance(value, list) else [value]:
                if not isinstance(entry, str) or not entry:
                    raise ValueError(f"{name}: `{split}:` in {data_yaml} must name folders, got {entry!r}")
                folder = root / entry  # an absolute entry stays itself
                if folder.is_file():
                    raise ValueError(f"{name}: {split}: {entry} in {data_yaml} is a list file; only image folders are read here")
                if not folder.is_dir():
                    raise FileNotFoundError(f"{name}: {split} folder {folder} (from {data_yaml}) does not exist")
                folders.append(folder.resolve())
            splits[split] = tuple(folders)
        if "train" not in splits:
            raise ValueError(f"{name}: {data_yaml} has no `train:`")
        return cls(name, data_yaml, names, splits)

    def samples(self, split: str = "train") -> list[Sample]:
        """Every image of a split with its label file, sorted; raises if there are none."""
        if split not in self.splits:
            raise ValueError(f"{self.name}: {self.data_yaml} has no `{split}:`")
        return list_samples(self.splits[split], self.name)


def _canonical(name: str, aliases: dict[str, str]) -> str:
    key = " ".join(name.replace("_", " ").split()).lower()  # "Traffic_Light" matches "traffic light"
    return aliases.get(key, key)


def class_map(source: YoloSet, target: YoloSet, *, drop_unmapped: bool = False,
              aliases: dict[str, str] = BDD_ALIASES) -> dict[int, int | None]:  # fmt: skip
    """Source class id -> target class id, matched by name (case, `_` and aliases aside); None
    marks a class with no match, which only `drop_unmapped` allows (its boxes are dropped)."""
    by_name: dict[str, int] = {}
    for tid, tname in target.names.items():
        key = _canonical(tname, aliases)
        if key in by_name:
            raise ValueError(f"{target.name}: classes {target.names[by_name[key]]!r} and {tname!r} are one class by "
                             f"name, so mapping onto them would be ambiguous")  # fmt: skip
        by_name[key] = tid
    mapping = {sid: by_name.get(_canonical(sname, aliases)) for sid, sname in source.names.items()}
    unmapped = [source.names[sid] for sid, tid in mapping.items() if tid is None]
    if unmapped and not drop_unmapped:
        raise ValueError(f"{source.name}: classes {unmapped} have no match by name in {target.name}; "
                         f"{source.name} names: {list(source.names.values())}; "
                         f"{target.name} names: {list(target.names.values())} (drop_unmapped=True drops those boxes)")  # fmt: skip
    return mapping


def unnamed_classes(mapping: dict[int, int | None], target: YoloSet) -> list[str]:
    """The target's classes no source class maps to: such objects in the source's images are
    unlabelled, background to a detector trained on them."""
    named = {t for t in mapping.values() if t is not None}
    return [n for i, n in target.names.items() if i not in named]


def _class_id(token: str) -> int | None:
    try:
        value = float(token)  # ultralytics reads a label line as floats: "2" and "2.0" are class 2
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def rewrite_labels(text: str, mapping: dict[int, int | None], where: str) -> tuple[str, int]:
    """Label text with each line's class id put through `mapping` (the coordinates untouched);
    lines of classes mapped to None are dropped. Returns the text and the boxes dropped."""
    lines, dropped = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        cls = _class_id(tokens[0])
        if cls not in mapping:
            raise ValueError(f"{where} line {number}: class {tokens[0]!r} is not one of its data.yaml's class ids "
                             f"(0..{max(mapping)})")  # fmt: skip
        if mapping[cls] is None:
            dropped += 1
            continue
        lines.append(" ".join([str(mapping[cls]), *tokens[1:]]) + "\n")
    return "".join(lines), dropped


def _identity(path: Path):
    """One file, also when reached through a hard link or another path."""
    st = path.stat()
    return (st.st_dev, st.st_ino) if st.st_ino else str(path.resolve())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _SamePicture:
    """Finds a file with the same content among `paths`; only files of equal size are hashed."""

    def __init__(self, paths: list[Path]):
        self.by_size: dict[int, list[Path]] = {}
        for p in paths:
            self.by_size.setdefault(p.stat().st_size, []).append(p)
        self.hashes: dict[Path, str] = {}

    def find(self, path: Path) -> Path | None:
        candidates = self.by_size.get(path.stat().st_size)
        if not candidates:
            return None
        digest = _sha256(path)
        for c in candidates:
            if c not in self.hashes:
                self.hashes[c] = _sha256(c)
            if self.hashes[c] == digest:
                return c
        return None


def _prefix(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def _asked(name: str, share, by: str, n_real: int) -> tuple[int, str]:
    """How many images a share asks for, and how it was worked out (for messages and mix.json)."""
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not math.isfinite(share) or share < 0:
        raise ValueError(f"{name}: a share must be a number >= 0, got {share!r}")
    if by == "count":
        if share != int(share):
            raise ValueError(f"{name}: by='count' takes a whole number of images, got {share!r}")
        return int(share), f"count {int(share)}"
    return math.floor(share * n_real + 0.5), f"ratio {share} x {n_real} real images"  # nearest, halves up


@dataclass(frozen=True)
class Mixed:
    folder: Path
    data_yaml: Path
    images: dict[str, int]  # set name -> its images in the mix
    dropped_boxes: dict[str, int]  # synthetic set name -> boxes of unmapped classes dropped


def mix(real_train: YoloSet, synthetic: Sequence[tuple[YoloSet, float]], out_folder: str | Path, seed: int,
        by: str = "ratio", *, drop_unmapped: bool = False, val: str | Path | Sequence[str | Path] | None = None) -> Mixed:  # fmt: skip
    """Write a YOLO dataset of `real_train`'s training images plus, from each synthetic set, a
    seeded choice of images: `share` x the real image count (by="ratio") or `share` images
    (by="count"). `val` (default: real_train's `val:`) is the real validation folder(s); none of its
    pictures may be in the training images. The folder is replaced whole, or not at all."""
    if by not in ("ratio", "count"):
        raise ValueError(f"mix: by must be 'ratio' or 'count', got {by!r}")
    out = Path(out_folder).resolve()
    real = real_train.samples("train")
    if isinstance(val, (str, Path)):
        val = [val]
    val_folders = tuple(Path(v).resolve() for v in val) if val is not None else real_train.splits.get("val")
    if not val_folders:
        raise ValueError(f"{real_train.name}: {real_train.data_yaml} has no `val:`; give the real validation folder (val=...)")
    for folder in val_folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{real_train.name}: validation folder {folder} does not exist")
        if folder in real_train.splits["train"]:
            raise ValueError(f"{real_train.name}: validation folder {folder} is also its training folder; "
                             f"evaluate on images the detector does not train on (give val=...)")  # fmt: skip
    val_images = [s.image for s in list_samples(val_folders, f"{real_train.name} (validation)")]

    sets = [real_train, *(s for s, _ in synthetic)]
    prefixes = [_prefix(s.name) for s in sets]
    if len(set(prefixes)) < len(prefixes):
        twice = sorted({p for p in prefixes if prefixes.count(p) > 1})
        raise ValueError(f"mix: more than one set is named {twice}; give each its own (YoloSet.load(..., name=...))")
    for source in [s.data_yaml.parent for s in sets] + list(val_folders):
        if source == out or out in source.parents:
            raise ValueError(f"mix: the output folder {out} holds {source}, which writing it would remove")
    for folder in [f for s in sets for f in s.splits["train"]] + list(val_folders):
        if folder in out.parents:  # its images would be listed with that set's next time
            raise ValueError(f"mix: the output folder {out} is inside image folder {folder}")
    mappings = [class_map(s, real_train, drop_unmapped=drop_unmapped) for s, _ in synthetic]

    # Each synthetic set's choice: its images in a seeded order, the first n not already in the mix.
    used = {_identity(s.image) for s in real}
    plan: list[tuple[YoloSet, dict | None, list[Sample]]] = [(real_train, None, real)]
    record_sets = []
    for (syn, share), mapping in zip(synthetic, mappings):
        pool = syn.samples("train")
        asked, how = _asked(syn.name, share, by, len(real))
        if asked > len(pool):
            raise ValueError(f"{syn.name}: {asked} images asked for ({how}), it holds {len(pool)}")
        order = list(pool)
        random.Random(f"{seed}/{syn.name}").shuffle(order)  # str seeds are hashed stably across runs
        chosen, passed_over = [], 0
        for sample in order:
            if len(chosen) == asked:
                break
            key = _identity(sample.image)
            if key in used:
                passed_over += 1
                continue
            used.add(key)
            chosen.append(sample)
        if len(chosen) < asked:
            raise ValueError(f"{syn.name}: {asked} images asked for ({how}), only {len(chosen)} of the {len(pool)} "
                             f"it holds are not already in the mix")  # fmt: skip
        plan.append((syn, mapping, chosen))
        record_sets.append({
            "name": syn.name, "data_yaml": str(syn.data_yaml), "share": float(share), "asked": asked, "holds": len(pool),
            "passed_over_as_already_in": passed_over,
            "class_map": {syn.names[s]: (None if t is None else real_train.names[t]) for s, t in mapping.items()},
            # objects of these classes are in its pictures unlabelled, as background
            "real_classes_it_does_not_name": unnamed_classes(mapping, real_train),
        })  # fmt: skip

    same = _SamePicture(val_images)
    for source_set, _, samples in plan:
        for sample in samples:
            hit = same.find(sample.image)
            if hit is not None:
                raise ValueError(f"{source_set.name}: {sample.image} is the same picture as real validation image {hit}; "
                                 f"a detector must not train on its validation images")  # fmt: skip

    files, images, dropped = [], {}, {}
    with replace_dir(out, "evaluation mix") as tmp:
        (tmp / "images/train").mkdir(parents=True)
        (tmp / "labels/train").mkdir(parents=True)
        stems: dict[str, Path] = {}  # x.png and x.jpg would share one label file
        for source_set, mapping, samples in plan:
            prefix, lost = _prefix(source_set.name), 0
            for sample in samples:
                flat = f"{prefix}__{sample.rel.replace('/', '__')}"
                stem = flat.rsplit(".", 1)[0]
                if stem in stems:
                    raise ValueError(f"{source_set.name}: {sample.image} and {stems[stem]} would both be {stem} in the mix")
                stems[stem] = sample.image
                image_to, label_to = f"images/train/{flat}", None
                link_or_copy(sample.image, tmp / image_to)
                if sample.label is not None:
                    label_to = f"labels/train/{stem}.txt"
                    if mapping is None:  # the real set's own labels, as they are
                        link_or_copy(sample.label, tmp / label_to)
                    else:
                        text = sample.label.read_text(encoding="utf-8")
                        text, n = rewrite_labels(text, mapping, f"{source_set.name}: {sample.label}")
                        (tmp / label_to).write_text(text)
                        lost += n
                files.append({"source": source_set.name, "image": str(sample.image),
                              "label": None if sample.label is None else str(sample.label),
                              "to_image": image_to, "to_label": label_to})  # fmt: skip
            images[source_set.name] = len(samples)
            if mapping is not None:
                dropped[source_set.name] = lost
        for entry in record_sets:
            entry["dropped_boxes"] = dropped[entry["name"]]
            if entry["real_classes_it_does_not_name"]:
                log.debug("mix: %s names none of %s", entry["name"], entry["real_classes_it_does_not_name"])
        val_value = str(val_folders[0]) if len(val_folders) == 1 else [str(f) for f in val_folders]
        # No `path:`: `train` is read against this file's folder, wherever the mix is moved; `val`
        # is absolute, the real validation images where they are (never copied into a mix).
        data_yaml = {"train": "images/train", "val": val_value, "names": dict(real_train.names)}
        (tmp / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False))
        record = {
            "seed": seed, "by": by,
            "real": {"name": real_train.name, "data_yaml": str(real_train.data_yaml), "images": len(real)},
            "val": val_value, "synthetic": record_sets, "files": files,
        }  # fmt: skip
        (tmp / "mix.json").write_text(json.dumps(record, indent=2) + "\n")
    log.debug("mix: %s: %d real + %d synthetic training images", out, len(real), sum(images.values()) - len(real))
    return Mixed(out, out / "data.yaml", images, dropped)
