"""What source 4's data scripts wrote, written by `prepare` from BDD too:

    captions/<stem>.txt                      one caption per image (generate_bdd_captions.py)
    bdd_hf_dataset_lora_train.csv            image, text (lora_bdd_to_huggingface_csv.py)
    bdd_hf_dataset_controlnet_train.csv      image, conditioning_image, text (train_controlnet_sdxl.py's columns)
    yolo/                                    a BDD -> YOLO detection dataset: images/train, labels/train
                                             (10 classes, normalised boxes), data.yaml, for training the
                                             filter's detector on real frames

and a BDD split as a YOLO set for the evaluate stage (`bdd_split_to_yolo`).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from diffplat.data.bdd import DETECTION_CLASSES
from diffplat.fileio import link_or_copy, replace_dir, write_text_atomic


@dataclass(frozen=True)
class Labelled:
    image: Path
    caption: str
    width: int
    height: int
    mask: Path | None = None
    boxes: tuple = ()  # (class, x1, y1, x2, y2) in pixels


def yolo_lines(item: Labelled) -> str:
    """One line per box: class id, centre x, centre y, width, height, each in 0..1."""
    lines = []
    for cls, x1, y1, x2, y2 in item.boxes:
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue  # parse_frame refuses these; never a NaN in a label file
        x1, x2 = sorted((min(max(x1, 0), item.width), min(max(x2, 0), item.width)))
        y1, y2 = sorted((min(max(y1, 0), item.height), min(max(y2, 0), item.height)))
        if x2 - x1 < 1 or y2 - y1 < 1:
            continue  # a box cut to nothing by the image border
        cx, cy = (x1 + x2) / 2 / item.width, (y1 + y2) / 2 / item.height
        lines.append(f"{DETECTION_CLASSES.index(cls)} {cx:.6f} {cy:.6f} {(x2 - x1) / item.width:.6f} {(y2 - y1) / item.height:.6f}\n")
    return "".join(lines)


def _csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_source4_exports(out: Path, items: list[Labelled]) -> None:
    with replace_dir(out / "captions", "captions folder", ("../prepare_report.json",)) as tmp:
        for item in items:
            (tmp / f"{item.image.stem}.txt").write_text(item.caption + "\n", encoding="utf-8")
    write_text_atomic(out / "bdd_hf_dataset_lora_train.csv",
                      _csv(["image", "text"], [[str(i.image), i.caption] for i in items]))  # fmt: skip
    write_text_atomic(out / "bdd_hf_dataset_controlnet_train.csv",
                      _csv(["image", "conditioning_image", "text"],
                           [[str(i.image), str(i.mask), i.caption] for i in items if i.mask]))  # fmt: skip
    write_yolo(out / "yolo", [i for i in items if i.boxes])


def write_yolo(folder: Path, items: list[Labelled], split: str = "train") -> None:
    """A YOLO detection set of `items` (images linked, one label file each, an empty one for an
    image with no boxes), replacing `folder` whole."""
    with replace_dir(folder, "YOLO export", ("../prepare_report.json",)) as tmp:
        for sub in (f"images/{split}", f"labels/{split}"):
            (tmp / sub).mkdir(parents=True)
        for item in items:
            link_or_copy(item.image, tmp / f"images/{split}" / item.image.name)
            (tmp / f"labels/{split}" / f"{item.image.stem}.txt").write_text(yolo_lines(item))
        # no `path:`: ultralytics reads the lists against this file's folder, wherever it is run
        names = dict(enumerate(DETECTION_CLASSES))
        (tmp / "data.yaml").write_text(yaml.safe_dump({"train": f"images/{split}", "val": f"images/{split}",
                                                       "names": names}, sort_keys=False))  # fmt: skip


def bdd_split_to_yolo(images: Path, label_files: list[Path], folder: Path, split: str = "train") -> dict:
    """A BDD split (images + label JSON) as a YOLO set in `folder`: every image that has a label
    record, boxes or not (an image without objects is a real negative). Returns what was left out."""
    from PIL import Image

    from diffplat.data.bdd import load_label_file
    from diffplat.pictures import list_images

    frames, bad_records = {}, []
    for path in label_files:
        found, broken = load_label_file(path)
        frames.update(found)
        bad_records += broken
    items, unlabelled, unreadable = [], [], []
    for image in list_images(images):
        frame = frames.get(image.name)
        if frame is None:
            unlabelled.append(image.name)
            continue
        try:
            with Image.open(image) as im:
                width, height = im.size
        except Exception as err:  # noqa: BLE001 - any undecodable file is one skipped image
            unreadable.append(f"{image.name}: {type(err).__name__}: {err}")
            continue
        items.append(Labelled(image, "", width, height, None, frame.boxes))
    if not items:
        raise ValueError(f"{images}: no image has a record in {', '.join(p.name for p in label_files)}")
    write_yolo(folder, items, split)
    return {"images": len(items), "boxes": sum(len(i.boxes) for i in items), "no_label_record": len(unlabelled),
            "unreadable": unreadable, "bad_label_records": bad_records}  # fmt: skip
