"""The `prepare` stage: a source dataset -> Parquet shards, index files and a report.

Bad items are skipped and counted, each with a message naming it; the stage fails only when
nothing usable is left.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from diffplat.config import PrepareConfig
from diffplat.data import bdd
from diffplat.data.bdd_exports import Labelled, write_source4_exports
from diffplat.data.composite_source import Skips, composite_rows
from diffplat.data.folder_source import captioned_images
from diffplat.data.images import BadImage, Duplicates, read_image
from diffplat.data.pairs_source import pair_rows
from diffplat.data.shards import write_shards
from diffplat.fileio import replace_dir, write_json_atomic, write_text_atomic
from diffplat.pictures import list_images

log = logging.getLogger("diffplat")

class NothingUsable(RuntimeError):
    pass


def _check_image(path: Path, max_pixels: int) -> tuple[bytes, int, int]:
    data, image = read_image(path, max_pixels)
    return data, image.width, image.height


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def prepare(config: PrepareConfig, resolve) -> dict:
    """The stage: the configured source -> shards, index files and prepare_report.json."""
    stages = {"bdd": prepare_bdd, "composites": prepare_composites, "pairs": prepare_pairs, "folder": prepare_folder,
              "shards": prepare_shards}  # fmt: skip
    return stages[config.source](config, resolve)


def _finish(out: Path, report: dict, skipped: list[str], found: int, where: Path) -> dict:
    """Write the report (also when nothing was usable, so that it says why), then judge."""
    report["skipped_items"] = skipped[:1000]
    write_json_atomic(out / "prepare_report.json", report)
    for message in skipped[:20]:
        log.warning("prepare: skipped %s", message)
    if report["rows_written"] == 0:
        raise NothingUsable(f"prepare: no usable rows out of {found} items in {where}; see {out}/prepare_report.json")
    log.info("prepare: %d rows in %d shards, %d skipped", report["rows_written"], len(report["shards"]),
             sum(report["skipped"].values()))  # fmt: skip
    return report


def prepare_composites(config: PrepareConfig, resolve) -> dict:
    """Composites (built from groups, or existing) -> shards with their layout, plus the built
    composites as `composites/<id>.png` + `.txt` and `index_composites.jsonl`."""
    c = config.composites
    out = resolve(config.output)
    folder = resolve(c.images) if c.images else resolve(c.bdd.images) if c.bdd else None
    if folder is not None and not folder.is_dir():
        field = "images" if c.images else "bdd.images"
        raise FileNotFoundError(f"prepare.composites.{field}: {folder} is not a folder")
    skips = Skips()
    index = []
    # Shards and composites are staged and swapped in together, and only when rows came out:
    # a failed rerun leaves the previous good output as it was.
    with replace_dir(out / "shards") as shards_tmp, replace_dir(out / "composites") as images_out:
        def rows():
            for row in composite_rows(c, resolve, skips, None if c.groups == "existing" else images_out,
                                      config.max_image_pixels):
                index.append({"id": row["id"], "caption": row["caption"], "layout": row["layout"],
                              "panels": row.pop("panels")})  # fmt: skip
                if len(index) % 200 == 0:
                    log.info("prepare: %d composites", len(index))
                yield row

        shards = write_shards(rows(), shards_tmp, config.rows_per_shard)
        report = {
            "source": f"composites:{c.groups}",
            "layout": c.layout,
            "rows_written": len(index),
            "skipped": skips.reasons,
            "shards": [p.name for p in shards],
        }
        _finish(out, report, skips.items, len(index) + len(skips.items), folder or resolve(c.list_file))
    write_text_atomic(out / "index_composites.jsonl", "".join(json.dumps(r) + "\n" for r in index))
    return report


def prepare_pairs(config: PrepareConfig, resolve) -> dict:
    """Image + conditioning pairs (folders or source 4's CSV) -> shards + index_controlnet.jsonl."""
    c = config.pairs
    out = resolve(config.output)
    for field in ("images", "conditioning", "captions"):
        value = getattr(c, field)
        if value is not None and not c.csv and not resolve(value).is_dir():
            raise FileNotFoundError(f"prepare.pairs.{field}: {resolve(value)} is not a folder")
    skips, index = Skips(), []
    with replace_dir(out / "shards") as shards_tmp:
        shards = write_shards(pair_rows(c, resolve, skips, index, config.max_image_pixels), shards_tmp,
                              config.rows_per_shard)
        report = {"source": "pairs:csv" if c.csv else "pairs:folders", "rows_written": len(index),
                  "skipped": skips.reasons, "shards": [p.name for p in shards]}  # fmt: skip
        _finish(out, report, skips.items, len(index) + len(skips.items), resolve(c.csv or c.images))
    write_text_atomic(out / "index_controlnet.jsonl", "".join(json.dumps(r) + "\n" for r in index))
    return report


def prepare_folder(config: PrepareConfig, resolve) -> dict:
    """Images with captions (.txt files or metadata.jsonl) -> shards + index_lora.jsonl."""
    out = resolve(config.output)
    skips, index, seen, duplicates = Skips(), [], {}, Duplicates()

    def rows():
        for path, caption in captioned_images(config.folder, resolve, skips):
            try:
                data, width, height = _check_image(path, config.max_image_pixels)
            except BadImage as err:
                skips.add(str(err), path.name)
                continue
            if path.stem in seen:
                skips.add(f"duplicate name (as {seen[path.stem]})", str(path))
                continue
            first = duplicates.seen(data, path.name)
            if first:
                skips.add(f"duplicate image (same content as {first})", path.name)
                continue
            seen[path.stem] = str(path)
            caption = config.caption_prefix + caption
            index.append({"image": str(path), "caption": caption})
            if len(index) % 500 == 0:
                log.info("prepare: %d images", len(index))
            yield {"id": path.stem, "image": data, "caption": caption, "width": width, "height": height,
                   "source": "folder"}  # fmt: skip

    with replace_dir(out / "shards") as shards_tmp:
        shards = write_shards(rows(), shards_tmp, config.rows_per_shard)
        report = {"source": "folder", "rows_written": len(index), "skipped": skips.reasons,
                  "shards": [p.name for p in shards]}  # fmt: skip
        _finish(out, report, skips.items, len(index) + len(skips.items), resolve(config.folder.images))
    write_text_atomic(out / "index_lora.jsonl", "".join(json.dumps(r) + "\n" for r in index))
    return report


def prepare_shards(config: PrepareConfig, resolve) -> dict:
    """Another run's shards -> this run's: every image decoded and checked again, duplicates
    dropped, rows_per_shard applied; rows keep their captions, maps and layouts."""
    from diffplat.data.images import decode_image
    from diffplat.data.shards import iter_rows

    source = resolve(config.shards.path)
    out = resolve(config.output)
    skips, duplicates, count = Skips(), Duplicates(), [0]

    def rows():
        for row in iter_rows(source):
            try:
                decode_image(row["image"] or b"", config.max_image_pixels)
            except BadImage as err:
                skips.add(str(err), str(row["id"]))
                continue
            first = duplicates.seen(row["image"], str(row["id"]))
            if first:
                skips.add(f"duplicate image (same content as {first})", str(row["id"]))
                continue
            count[0] += 1
            yield row

    with replace_dir(out / "shards") as shards_tmp:
        shards = write_shards(rows(), shards_tmp, config.rows_per_shard)
        report = {"source": "shards", "rows_written": count[0], "skipped": skips.reasons,
                  "shards": [p.name for p in shards]}  # fmt: skip
        _finish(out, report, skips.items, count[0] + len(skips.items), source)
    return report


def prepare_bdd(config: PrepareConfig, resolve) -> dict:
    """BDD images + labels + masks -> shards. `resolve` turns config paths into real paths."""
    src = config.bdd
    images_dir = resolve(src.images)
    masks_dir = resolve(src.seg_masks) if src.seg_masks else None
    out = resolve(config.output)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"prepare.bdd.images: {images_dir} is not a folder")

    frames: dict[str, bdd.FrameLabels] = {}
    skipped: list[str] = []
    for label_file in src.labels:
        found, bad = bdd.load_label_file(resolve(label_file))
        frames.update(found)
        skipped.extend(bad)
    unknown = Counter(c for f in frames.values() for c in f.unknown_categories)

    images = list_images(images_dir)
    reasons: Counter[str] = Counter({"bad label record": len(skipped)} if skipped else {})
    sources: Counter[str] = Counter()
    lora_index, controlnet_index, exports, duplicates = [], [], [], Duplicates()

    def rows():
        for n, path in enumerate(images, 1):
            if n % 500 == 0:
                log.info("prepare: %d/%d images", n, len(images))
            try:
                data, width, height = _check_image(path, config.max_image_pixels)
            except BadImage as err:
                skipped.append(f"{path.name}: {err}")
                reasons[err.reason] += 1
                continue
            first = duplicates.seen(data, path.name)
            if first:
                skipped.append(f"{path.name}: duplicate image (same content as {first})")
                reasons["duplicate image"] += 1
                continue
            frame = frames.get(path.name)
            mask_path = bdd.find_mask(masks_dir, path.name)
            try:
                mask = bdd.read_mask(mask_path) if mask_path else None
            except bdd.MaskError as err:
                skipped.append(str(err))
                reasons["bad mask"] += 1
                mask = None
            if mask is not None and mask.shape[:2] != (height, width):
                skipped.append(f"{mask_path.name}: mask is {mask.shape[1]}x{mask.shape[0]}, image {width}x{height}")
                reasons["mask size differs from image"] += 1
                mask = None
            if frame is not None:
                caption, source = bdd.caption_from_labels(frame, config.caption_prefix, src.caption_template), "bdd:labels"
            elif mask is not None:
                caption, source = bdd.caption_from_mask(mask, config.caption_prefix), "bdd:mask"
            else:
                skipped.append(f"{path.name}: no label record and no mask, so no caption")
                reasons["no caption source"] += 1
                continue
            conditioning = _png_bytes(bdd.colorize_mask(mask)) if mask is not None else None
            sources[source] += 1
            exports.append(Labelled(path, caption, width, height, mask_path if conditioning is not None else None,
                                    frame.boxes if frame is not None else ()))  # fmt: skip
            lora_index.append({"image": str(path), "caption": caption})
            if mask_path is not None and conditioning is not None:
                controlnet_index.append({"image": str(path), "conditioning": str(mask_path), "caption": caption})
            yield {
                "id": path.stem,
                "image": data,
                "caption": caption,
                "conditioning": conditioning,
                "width": width,
                "height": height,
                "source": source,
            }

    with replace_dir(out / "shards") as shards_tmp:
        shards = write_shards(rows(), shards_tmp, config.rows_per_shard)
        total = sum(sources.values())
        report = {
            "source": "bdd",
            "images_found": len(images),
            "rows_written": total,
            "rows_by_caption_source": dict(sources),
            "with_conditioning": len(controlnet_index),
            "skipped": dict(reasons),
            "unknown_categories": dict(unknown),
            "shards": [p.name for p in shards],
        }
        _finish(out, report, skipped, len(images), images_dir)
    write_text_atomic(out / "index_lora.jsonl", "".join(json.dumps(r) + "\n" for r in lora_index))
    write_text_atomic(out / "index_controlnet.jsonl", "".join(json.dumps(r) + "\n" for r in controlnet_index))
    write_source4_exports(out, exports)
    return report
