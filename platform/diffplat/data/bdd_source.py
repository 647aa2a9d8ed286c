"""The `bdd` prepare source: BDD100K images with captions from their labels (or masks).

Listing runs on the driver: label files are streamed into one small record per frame
(`bdd.load_label_file`), images are listed and paired with their masks. Each image then becomes
a row in a shard task (`bdd_row`): the image is checked, the mask read and coloured as the
ControlNet map, and the caption made from the labels, or from the mask where an image has no
label record.
"""

from __future__ import annotations

from pathlib import Path


from diffplat.config import ConfigError, PrepareConfig
from diffplat.data import bdd
from diffplat.data.images import BadImage, png_bytes, read_image
from diffplat.data.shard_job import Skip
from diffplat.pictures import list_images


def bdd_items(images: list[Path], frames: dict[str, bdd.FrameLabels], masks: Path | None, config: PrepareConfig) -> list[dict]:
    """One work item per image: its paths and its caption where its labels give one."""
    items = []
    for path in images:
        frame = frames.get(path.name)
        mask = bdd.find_mask(masks, path.name)
        caption = bdd.caption_from_labels(frame, config.caption_prefix, config.bdd.caption_template) if frame else None
        items.append({"id": path.stem, "name": path.name, "image": str(path), "mask": str(mask) if mask else None,
                      "caption": caption, "files": [str(path)] + ([str(mask)] if mask else [])})  # fmt: skip
    return items


def bdd_row(item: dict, prefix: str, max_pixels: int) -> dict:
    """One image -> its shard row. A bad mask only loses the map (counted in `warnings`)."""
    try:
        data, image = read_image(Path(item["image"]), max_pixels)
    except BadImage as err:
        raise Skip(str(err), item["name"]) from None
    width, height = image.size
    warnings, mask = [], None
    if item["mask"]:
        name = Path(item["mask"]).name
        try:
            mask = bdd.read_mask(Path(item["mask"]), max_pixels)
        except bdd.MaskError as err:
            warnings.append([name, "bad mask (" + str(err).removeprefix(f"{name}: ") + ")"])
        if mask is not None and mask.shape[:2] != (height, width):
            warnings.append([name, f"mask size differs from image (mask {mask.shape[1]}x{mask.shape[0]}, "
                                   f"image {width}x{height})"])  # fmt: skip
            mask = None
    if item["caption"] is not None:
        caption, source = item["caption"], "bdd:labels"
    elif mask is not None:
        caption, source = bdd.caption_from_mask(mask, prefix), "bdd:mask"
    else:
        raise Skip("no caption source (no label record and no usable mask)", item["name"])
    return {"id": item["id"], "image": data, "caption": caption, "width": width, "height": height, "source": source,
            "conditioning": png_bytes(bdd.colorize_mask(mask), flat=True) if mask is not None else None, "warnings": warnings}  # fmt: skip


def select_frames(images: list[Path], frames: dict[str, bdd.FrameLabels], where: dict[str, list[str]]) -> list[Path]:
    """The images whose label record matches every attribute of `where` (all of them if it is
    empty). A `where` that keeps nothing is an error listing the values the labels do have."""
    if not where:
        return images
    kept = [p for p in images if (f := frames.get(p.name)) and all(getattr(f, k) in v for k, v in where.items())]
    if not kept:
        seen = {k: sorted({str(getattr(f, k)) for f in frames.values()}) for k in where}
        raise ConfigError("prepare.bdd.where keeps no image: " + "; ".join(
            f"{k} is one of {where[k]}, but the labels have {', '.join(seen[k]) or 'no records'}" for k in where))
    return kept


def list_bdd(config: PrepareConfig, resolve) -> tuple[list[Path], dict[str, bdd.FrameLabels], list[str]]:
    """The images, the label record of each frame, and the label records that were bad."""
    src = config.bdd
    images_dir = resolve(src.images)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"prepare.bdd.images: {images_dir} is not a folder")
    frames: dict[str, bdd.FrameLabels] = {}
    bad: list[str] = []
    for label_file in src.labels:
        found, broken = bdd.load_label_file(resolve(label_file))
        frames.update(found)
        bad.extend(broken)
    return list_images(images_dir), frames, bad
