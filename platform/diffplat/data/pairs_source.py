"""The `pairs` prepare source: images with conditioning images, for ControlNet.

Pairs come from two folders matched by base name (`photo.jpg` with `photo.png`, or BDD's
`photo_train_id.png`), or from source 4's ControlNet CSV index (columns `image`,
`conditioning_image`, `text` by default). With `segmentation: true` the conditioning images
are segmentation masks: grey train-id masks and colour maps are told apart, checked, and stored
as the palette map the ControlNet sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from PIL import UnidentifiedImageError

from diffplat.config import PairsSource
from diffplat.data import bdd
from diffplat.data.composite_source import Skips, read_caption
from diffplat.data.composites import CompositeError
from diffplat.data.folder_source import csv_rows, is_file
from diffplat.data.images import MAX_PIXELS, BadImage, png_bytes, read_image
from diffplat.data.shard_job import Skip
from diffplat.pictures import list_images


def map_stem(path: Path) -> str:
    """The image a map belongs to: BDD names masks `<image stem>_train_id.png`."""
    return path.stem.removesuffix("_train_id")


def _folder_pairs(c: PairsSource, resolve: Callable, skips: Skips) -> Iterator[tuple[Path, Path, str]]:
    images = {p.stem: p for p in list_images(resolve(c.images))}
    maps = {map_stem(p): p for p in list_images(resolve(c.conditioning))}
    captions = resolve(c.captions) if c.captions else None
    for stem in sorted(set(maps) - set(images)):
        skips.add("conditioning image without an image", maps[stem].name)
    for stem, image in sorted(images.items()):
        if stem not in maps:
            skips.add("no conditioning image", image.name)
            continue
        try:
            caption = read_caption(captions / f"{stem}.txt" if captions else image)
        except CompositeError as err:
            skips.add(str(err), image.name)
            continue
        yield image, maps[stem], caption


def _csv_pairs(c: PairsSource, resolve: Callable, skips: Skips) -> Iterator[tuple[Path, Path, str]]:
    index = resolve(c.csv)
    for where, row in csv_rows(index, (c.image_column, c.conditioning_column, c.caption_column), "prepare.pairs.csv",
                               skips):  # fmt: skip
        paths = [Path(row[c.image_column]), Path(row[c.conditioning_column])]
        paths = [p if p.is_absolute() else index.parent / p for p in paths]
        caption = row[c.caption_column].strip()
        if not caption:
            skips.add("missing caption", where)
        elif not is_file(paths[0]):
            skips.add(f"no image ({paths[0].name})", where)
        elif not is_file(paths[1]):
            skips.add(f"no conditioning image ({paths[1].name})", where)
        else:
            yield paths[0], paths[1], caption


def pair_items(c: PairsSource, resolve: Callable, skips: Skips) -> list[dict]:
    """One work item per pair: image, map and caption (listed and matched on the driver)."""
    pairs = _csv_pairs(c, resolve, skips) if c.csv else _folder_pairs(c, resolve, skips)
    return [{"id": image.stem, "name": image.name, "image": str(image), "map": str(cond), "caption": caption,
             "files": [str(image), str(cond)]} for image, cond, caption in pairs]  # fmt: skip


def pair_row(item: dict, c: PairsSource, prefix: str, max_pixels: int = MAX_PIXELS) -> dict:
    """One pair -> its shard row (in a shard task): both images checked, sizes matched, a
    segmentation map stored as the palette map the ControlNet sees."""
    image_path, map_path = Path(item["image"]), Path(item["map"])
    try:
        data, image = read_image(image_path, max_pixels)
    except BadImage as err:
        raise Skip(str(err), image_path.name) from None
    try:
        if c.segmentation:
            ids = bdd.read_mask(map_path, max_pixels)
            map_size = (ids.shape[1], ids.shape[0])
            conditioning = png_bytes(bdd.colorize_mask(ids), flat=True)
        else:
            conditioning, condition = read_image(map_path, max_pixels)
            map_size = condition.size
    except bdd.MaskError as err:
        raise Skip(str(err).removeprefix(f"{map_path.name}: "), map_path.name) from None
    except BadImage as err:
        raise Skip(f"conditioning {err}", map_path.name) from None
    except (OSError, UnidentifiedImageError) as err:  # read_mask's own decode
        raise Skip(f"corrupt conditioning image ({err})", map_path.name) from None
    if map_size != image.size:
        raise Skip(f"map size differs from image (map {map_size[0]}x{map_size[1]}, image {image.width}x{image.height})",
                   map_path.name)  # fmt: skip
    return {"id": item["id"], "image": data, "caption": prefix + item["caption"], "conditioning": conditioning,
            "width": image.width, "height": image.height, "source": "pairs:csv" if c.csv else "pairs:folders"}  # fmt: skip
