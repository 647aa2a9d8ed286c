"""The `prepare` stage: a source dataset -> Parquet shards, index files and a report.

Bad items are skipped and counted, each with a message naming it; the stage fails only when
nothing usable is left.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from functools import lru_cache, partial
from pathlib import Path

from diffplat.config import PrepareConfig
from diffplat.data.bdd_exports import Labelled, write_source4_exports
from diffplat.data.bdd_source import bdd_items, bdd_row, list_bdd, select_frames
from diffplat.data.composite_source import Skips, composite_items, composite_row
from diffplat.data.folder_source import folder_items, folder_row
from diffplat.data.images import BadImage
from diffplat.data.pairs_source import pair_items, pair_row
from diffplat.data.shard_job import Built, Skip, build_shards, finish
from diffplat.data.shards import iter_rows
from diffplat.fileio import replace_dir, write_json_atomic, write_text_atomic

log = logging.getLogger("diffplat")

class NothingUsable(RuntimeError):
    pass


def prepare(config: PrepareConfig, resolve) -> dict:
    """The stage: the configured source -> shards, index files and prepare_report.json."""
    stages = {"bdd": prepare_bdd, "composites": prepare_composites, "pairs": prepare_pairs, "folder": prepare_folder,
              "shards": prepare_shards}  # fmt: skip
    return stages[config.source](config, resolve)


def _finish(out: Path, report: dict, skipped: list[str], found: int, where: Path) -> dict:
    """Write the report (also when nothing was usable, so that it says why), then judge."""
    report["skipped_items"] = skipped[:1000]
    write_json_atomic(out / "prepare_report.json", report)
    if report["rows_written"] == 0:
        for message in skipped[:1]:
            log.warning("prepare: skipped %s", message)
        raise NothingUsable(f"prepare: no usable rows out of {found} items in {where}; see {out}/prepare_report.json")
    # one line: the count, the first item skipped and why; each of them is named in the report
    more = f" and {len(skipped) - 1} more, each named in {out / 'prepare_report.json'}" if len(skipped) > 1 else ""
    log.info("prepare: %d rows in %d shards, %d skipped%s", report["rows_written"], len(report["shards"]),
             sum(report["skipped"].values()), f" ({skipped[0]}{more})" if skipped else "")  # fmt: skip
    return report


def prepare_composites(config: PrepareConfig, resolve) -> dict:
    """Composites (built from groups, or existing) -> shards with their layout, plus the built
    composites as `composites/<id>.png` + `.txt` (the layout source 1's scripts read) and
    `index_composites.jsonl`."""
    c = config.composites
    out = resolve(config.output)
    folder = resolve(c.images) if c.images else resolve(c.bdd.images) if c.bdd else None
    if folder is not None and not folder.is_dir():
        field = "images" if c.images else "bdd.images"
        raise FileNotFoundError(f"prepare.composites.{field}: {folder} is not a folder")
    skips = Skips()
    items = composite_items(c, resolve, skips)
    found = len(items) + len(skips.items)
    built = _build(config, out, items, partial(composite_row, c=c, max_pixels=config.max_image_pixels), skips)
    report = _publish(config, out, built, {"source": f"composites:{c.groups}", "layout": c.layout}, skips, found,
                      folder or resolve(c.list_file))  # fmt: skip
    index = [{"id": r["id"], "caption": r["caption"], "layout": r["layout"],
              "panels": [Path(p).name for p in items[r["n"]].get("panels", ())] or None} for r in built.rows()]  # fmt: skip
    if c.groups != "existing":
        with replace_dir(out / "composites", "composites folder", ("../prepare_report.json",)) as images_out:
            for row in iter_rows(out / "shards", columns=["id", "image", "caption"]):
                (images_out / f"{row['id']}.png").write_bytes(row["image"])
                (images_out / f"{row['id']}.txt").write_text(row["caption"] + "\n")
    write_text_atomic(out / "index_composites.jsonl", "".join(json.dumps(r) + "\n" for r in index))
    return report


def _settings(config: PrepareConfig) -> dict:
    """What shapes a shard's rows besides its items: a change makes every shard again."""
    return {"version": 1, **config.model_dump(mode="json", exclude={"output", "rows_per_shard"})}


def _build(config: PrepareConfig, out: Path, items: list[dict], make_row, skips: Skips) -> Built:
    """The items -> shards (in parallel on the job's Ray), their skips added to `skips`."""
    built = build_shards(items, make_row, out / "shards", config.rows_per_shard, _settings(config),
                         config.max_image_side)  # fmt: skip
    for name, reason in built.skipped:
        skips.add(reason, name)
    return built


def _publish(config: PrepareConfig, out: Path, built: Built, report: dict, skips: Skips, found: int, where: Path) -> dict:
    """Report, judge (nothing usable: the previous shards stay), then swap the new shards in."""
    report.update(rows_written=built.row_count, skipped=skips.reasons, shards_reused=built.reused,
                  shards=[s["file"] for s in built.shards])  # fmt: skip
    _finish(out, report, skips.items, found, where)
    manifest = finish(built, out / "shards", report["source"])
    report["bytes_written"] = manifest["bytes"]
    write_json_atomic(out / "prepare_report.json", report)
    return report


def prepare_pairs(config: PrepareConfig, resolve) -> dict:
    """Image + conditioning pairs (folders or source 4's CSV) -> shards + index_controlnet.jsonl."""
    c = config.pairs
    out = resolve(config.output)
    for field in ("images", "conditioning", "captions"):
        value = getattr(c, field)
        if value is not None and not c.csv and not resolve(value).is_dir():
            raise FileNotFoundError(f"prepare.pairs.{field}: {resolve(value)} is not a folder")
    skips = Skips()
    items = pair_items(c, resolve, skips)
    found = len(items) + len(skips.items)
    built = _build(config, out, items, partial(pair_row, c=c, prefix=config.caption_prefix,
                                                max_pixels=config.max_image_pixels), skips)  # fmt: skip
    report = _publish(config, out, built, {"source": "pairs:csv" if c.csv else "pairs:folders"}, skips, found,
                      resolve(c.csv or c.images))  # fmt: skip
    index = [{"image": items[r["n"]]["image"], "conditioning": items[r["n"]]["map"], "caption": r["caption"]}
             for r in built.rows()]  # fmt: skip
    write_text_atomic(out / "index_controlnet.jsonl", "".join(json.dumps(r) + "\n" for r in index))
    return report


def prepare_folder(config: PrepareConfig, resolve) -> dict:
    """Images with captions (.txt files, metadata.jsonl or source 4's LoRA CSV) -> shards +
    index_lora.jsonl."""
    out = resolve(config.output)
    skips = Skips()
    items = folder_items(config.folder, resolve, skips)
    found = len(items) + len(skips.items)
    built = _build(config, out, items, partial(folder_row, prefix=config.caption_prefix,
                                                max_pixels=config.max_image_pixels), skips)  # fmt: skip
    report = _publish(config, out, built, {"source": "folder:csv" if config.folder.csv else "folder"}, skips, found,
                      resolve(config.folder.csv or config.folder.images))  # fmt: skip
    index = [{"image": items[r["n"]]["image"], "caption": r["caption"]} for r in built.rows()]
    write_text_atomic(out / "index_lora.jsonl", "".join(json.dumps(r) + "\n" for r in index))
    return report


@lru_cache(maxsize=1)
def _source_table(path: str, mtime_ns: int):  # the file's time in the key: a rewritten file is read again
    import pyarrow.parquet as pq

    return pq.read_table(path)


def shard_row(item: dict, max_pixels: int) -> dict:
    """A row of another run's shards, its image decoded and checked again (in a shard task)."""
    from diffplat.data.images import decode_image

    row = _source_table(item["file"], os.stat(item["file"]).st_mtime_ns).slice(item["row"], 1).to_pylist()[0]
    try:
        decode_image(row["image"] or b"", max_pixels)
    except BadImage as err:
        raise Skip(str(err), item["name"]) from None
    return row


def prepare_shards(config: PrepareConfig, resolve) -> dict:
    """Another run's shards -> this run's: every image decoded and checked again, duplicates
    dropped, rows_per_shard applied; rows keep their captions, maps and layouts."""
    import pyarrow.parquet as pq

    from diffplat.data.shards import shard_files

    source = resolve(config.shards.path)
    skips = Skips()
    items = [{"id": row_id, "name": f"{path.name}[{i}] ({row_id})", "file": str(path), "row": i, "files": [str(path)]}
             for path in shard_files(source)
             for i, row_id in enumerate(pq.read_table(path, columns=["id"]).column("id").to_pylist())]  # fmt: skip
    out = resolve(config.output)
    built = _build(config, out, items, partial(shard_row, max_pixels=config.max_image_pixels), skips)
    return _publish(config, out, built, {"source": "shards"}, skips, len(items), source)


def prepare_bdd(config: PrepareConfig, resolve) -> dict:
    """BDD images + labels + masks -> shards, index files and source 4's exports."""
    out = resolve(config.output)
    images, frames, bad_records = list_bdd(config, resolve)
    found = len(images)
    images = select_frames(images, frames, config.bdd.where)
    skips = Skips()
    for message in bad_records:
        skips.add("bad label record", message)
    unknown = Counter(c for f in frames.values() for c in f.unknown_categories)
    masks = resolve(config.bdd.seg_masks) if config.bdd.seg_masks else None
    items = bdd_items(images, frames, masks, config)
    built = _build(config, out, items, partial(bdd_row, prefix=config.caption_prefix,
                                                max_pixels=config.max_image_pixels), skips)  # fmt: skip
    rows = list(built.rows())
    report = {
        "source": "bdd",
        "images_found": found,
        **({"left_out_by_where": found - len(images)} if config.bdd.where else {}),
        "rows_by_caption_source": dict(Counter(r["source"] for r in rows)),
        "with_conditioning": sum(r["conditioning"] for r in rows),
        "unknown_categories": dict(unknown),
    }
    _publish(config, out, built, report, skips, len(images), resolve(config.bdd.images))
    lora_index, controlnet_index, exports = [], [], []
    for r in rows:
        item = items[r["n"]]
        frame = frames.get(item["name"])
        mask = Path(item["mask"]) if r["conditioning"] else None
        # the YOLO export links the original image: its boxes are in the size it was found at
        exports.append(Labelled(Path(item["image"]), r["caption"], *r["found"], mask, frame.boxes if frame else ()))
        lora_index.append({"image": item["image"], "caption": r["caption"]})
        if mask is not None:
            controlnet_index.append({"image": item["image"], "conditioning": item["mask"], "caption": r["caption"]})
    write_text_atomic(out / "index_lora.jsonl", "".join(json.dumps(r) + "\n" for r in lora_index))
    write_text_atomic(out / "index_controlnet.jsonl", "".join(json.dumps(r) + "\n" for r in controlnet_index))
    write_source4_exports(out, exports)
    return report
