"""The `composites` prepare source: In-Context LoRA training rows, one composite each.

Groups of images become one composite (`groups`):
- `existing`: composites made elsewhere, each with a same-named `.txt` (sources 1 and 3), taken
  as they are, their layout given in the job file;
- `consecutive`: a folder's images in name order, `layout.panels` at a time (every `stride`);
- `list`: a text file, one composite a line, its panels' files separated by commas;
- `bdd`: BDD frames sharing an attribute (scene, time of day, weather), captions from labels.
Panel texts come from same-named `.txt` files (or BDD labels) and are combined as
`[TAG] summary [SCENE-1] ... [SCENE-2] ...`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from diffplat.config import CompositeSource
from diffplat.data import bdd
from diffplat.data.composites import CompositeError, Layout, combine_captions, make_composite
from diffplat.data.images import MAX_PIXELS, BadImage, png_bytes, read_image
from diffplat.pictures import list_images

log = logging.getLogger("diffplat")

_SUMMARIES = {
    "scene": "{count} driving scenes on a {value}",
    "timeofday": "{count} driving scenes, {value}",
    "weather": "{count} driving scenes in {value} weather",
}


class Skips:
    """Items left out, each with its reason: counted by reason, named one by one."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.reasons: dict[str, int] = {}

    def add(self, reason: str, item: str) -> None:
        self.items.append(f"{item}: {reason}")
        key = reason.split(" (")[0]
        self.reasons[key] = self.reasons.get(key, 0) + 1


def read_caption(image: Path) -> str:
    """The same-named `.txt` beside an image; CompositeError naming the file if unusable."""
    path = image.with_suffix(".txt")
    if not path.is_file():
        raise CompositeError(f"missing caption (no {path.name})")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise CompositeError(f"caption not UTF-8 ({path.name})") from None
    except OSError as err:
        raise CompositeError(f"unreadable caption ({path.name}: {err.strerror or err})") from None
    if not text:
        raise CompositeError(f"empty caption ({path.name})")
    return text


def _open(path: Path, max_pixels: int) -> Image.Image:
    return read_image(path, max_pixels)[1]  # a full decode: verify() misses truncated files


def _windows(items: list, size: int, stride: int) -> Iterator[list]:
    for start in range(0, len(items) - size + 1, stride):
        yield items[start : start + size]


def _panel_groups(c: CompositeSource, layout: Layout, resolve: Callable, skips: Skips):
    """(panel images, panel texts, summary) for every composite to build."""
    stride = c.stride or layout.panels
    if c.groups == "consecutive":
        pool = []
        for path in list_images(resolve(c.images)):
            try:
                pool.append((path, read_caption(path)))
            except CompositeError as err:
                skips.add(str(err), path.name)
        for group in _windows(pool, layout.panels, stride):
            yield [p for p, _ in group], [t for _, t in group], c.summary
    elif c.groups == "list":
        list_file = resolve(c.list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"prepare.composites.list_file: {list_file} is not a file")
        folder = resolve(c.images) if c.images else list_file.parent
        for n, line in enumerate(list_file.read_text().splitlines(), 1):
            names = [s.strip() for s in line.split(",") if s.strip()]
            if not names or line.lstrip().startswith("#"):
                continue
            where = f"{list_file.name} line {n}"
            if len(names) != layout.panels:
                skips.add(f"{len(names)} files for layout {layout}, which takes {layout.panels}", where)
                continue
            paths = [folder / name for name in names]
            try:
                texts = [read_caption(p) for p in paths]
            except CompositeError as err:
                skips.add(str(err), where)
                continue
            yield paths, texts, c.summary
    elif c.groups == "bdd":
        images_dir = resolve(c.bdd.images)
        frames: dict[str, bdd.FrameLabels] = {}
        for label_file in c.bdd.labels:
            found, bad = bdd.load_label_file(resolve(label_file))
            frames.update(found)
            for message in bad:
                skips.add("bad label record", message)
        by_value: dict[str, list[Path]] = defaultdict(list)
        for path in list_images(images_dir):
            frame = frames.get(path.name)
            value = getattr(frame, c.group_by) if frame else None
            if value is None:
                skips.add(f"no label record with a {c.group_by}", path.name)
                continue
            by_value[value].append(path)
        template = c.summary or _SUMMARIES[c.group_by]
        for value in sorted(by_value):
            for group in _windows(by_value[value], layout.panels, stride):
                texts = [bdd.caption_from_labels(frames[p.name], template=c.bdd.caption_template) for p in group]
                yield group, texts, template.format(count=layout.panels, value=value, attribute=c.group_by)


def composite_items(c: CompositeSource, resolve: Callable, skips: Skips) -> list[dict]:
    """One work item per composite: an existing one's file, or the panels (and their texts) of
    one to build. Groups and texts are settled here, on the driver; images are read in tasks."""
    if c.groups == "existing":
        return [{"id": p.stem, "name": p.name, "image": str(p), "files": [str(p), str(p.with_suffix(".txt"))]}
                for p in list_images(resolve(c.images))]  # fmt: skip
    layout = Layout.parse(c.layout)
    return [{"id": f"composite-{n:05d}", "name": ", ".join(p.name for p in paths), "panels": [str(p) for p in paths],
             "texts": texts, "summary": summary, "files": [str(p) for p in paths]}
            for n, (paths, texts, summary) in enumerate(_panel_groups(c, layout, resolve, skips))]  # fmt: skip


def composite_row(item: dict, c: CompositeSource, max_pixels: int = MAX_PIXELS) -> dict:
    """One composite -> its shard row (in a shard task): an existing one checked against the
    layout, or one built from its panels."""
    from diffplat.data.shard_job import Skip

    layout = Layout.parse(c.layout)
    if c.groups == "existing":
        path = Path(item["image"])
        try:
            caption = read_caption(path)
            data, image = read_image(path, max_pixels)
            layout.check_size(image.width, image.height, path.name)
        except (CompositeError, BadImage) as err:
            raise Skip(str(err).removeprefix(f"{path.name}: "), path.name) from None
        return _row(item["id"], data, caption, layout, image.size, "composites:existing")
    try:
        panels = [_open(Path(p), max_pixels) for p in item["panels"]]
    except BadImage as err:
        raise Skip(str(err), item["name"]) from None
    composite = make_composite(panels, layout, c.panel_size)
    caption = combine_captions(item["texts"], c.tag, item["summary"])
    return _row(item["id"], png_bytes(composite), caption, layout, composite.size, f"composites:{c.groups}")


def _row(row_id: str, data: bytes, caption: str, layout: Layout, size, source: str) -> dict:
    return {"id": row_id, "image": data, "caption": caption, "layout": str(layout), "width": size[0],
            "height": size[1], "source": source}  # fmt: skip
