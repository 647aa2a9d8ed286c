"""prepare's parallel half: work items -> Parquet shards, one task per shard (Ray Data in a job).

A source lists its items on the driver (paths and captions: cheap); a row maker turns one item
into a row in the task (reads, checks, decodes, encodes: the costly part). Each shard file
carries in its footer the hash of its inputs and a summary of its rows, so

- a rerun reuses every shard whose inputs and settings are unchanged (a stopped run goes on);
- the driver builds index files, exports and the report from the footers, never reading an
  image again;
- images with the same content are kept once: within a shard by the task, across shards by the
  driver afterwards (the later shard is rewritten without them).

Shards are built in `.shards.partial` beside the output and swapped in whole once rows came out,
so a failed run leaves the previous good shards as they were.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffplat.console import Ticker
from diffplat.data.shards import read_shard_meta, write_shard
from diffplat.fileio import check_ours, link_or_copy, mark, swap_in, write_json_atomic

log = logging.getLogger("diffplat")

MANIFEST = "_manifest.json"  # "_": Arrow and Spark pass over it when reading the folder as a dataset


class Skip(Exception):
    """An item left out: `reason` is its class (counted), `name` says which item."""

    def __init__(self, reason: str, name: str):
        super().__init__(f"{name}: {reason}")
        self.reason, self.name = reason, name


RowMaker = Callable[[dict], dict]  # item -> shard row; raises Skip


def _inputs_hash(items: Sequence[dict], settings: str) -> str:
    """What a shard is made from: the settings, its items, and each input file's size and
    modification time (an edited image or caption makes its shard again)."""
    h = hashlib.blake2b(settings.encode(), digest_size=16)
    for item in items:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        for name in item.get("files", ()):
            try:
                st = os.stat(name)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()


def _downscale(row: dict, max_side: int) -> dict:
    """The row with its image (and map) scaled so the longer side is at most max_side."""
    if max(row["width"], row["height"]) <= max_side:
        return row
    scale = max_side / max(row["width"], row["height"])
    size = (max(1, round(row["width"] * scale)), max(1, round(row["height"] * scale)))

    def encode(data: bytes, resample) -> bytes:
        with Image.open(io.BytesIO(data)) as img:
            fmt = "JPEG" if img.format == "JPEG" else "PNG"
            small = img.convert("RGB").resize(size, resample)
        buf = io.BytesIO()
        small.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()

    row = {**row, "image": encode(row["image"], Image.LANCZOS), "width": size[0], "height": size[1]}
    if row.get("conditioning"):  # nearest-neighbour: a segmentation map keeps its palette
        row["conditioning"] = encode(row["conditioning"], Image.NEAREST)
    return row


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def build_shard(plan: dict, make_row: RowMaker, folder: str, max_side: int | None) -> dict:
    """One task: the plan's items -> `shard-NNNNN.parquet` (written whole), and its summary."""
    rows, summaries, skipped, seen, started = [], [], [], {}, time.time()
    for n, item in enumerate(plan["items"], plan["first"]):
        try:
            row = make_row(item)
        except Skip as skip:
            skipped.append([skip.name, skip.reason])
            continue
        except Exception as err:  # one bad item must not fail the stage, nor every rerun of it
            log.warning("prepare: %s: unexpected error", item.get("name", item.get("id")), exc_info=True)
            skipped.append([item.get("name", str(item.get("id"))), f"unexpected error ({type(err).__name__}: {err})"])
            continue
        skipped.extend(row.pop("warnings", ()))  # parts of an item left out (a bad mask), the row kept
        digest = content_hash(row["image"])  # of the image as found, before any downscale
        if digest in seen:
            skipped.append([item.get("name", row["id"]), f"duplicate image (same content as {seen[digest]})"])
            continue
        seen[digest] = item.get("name", row["id"])
        found = [row["width"], row["height"]]
        if max_side:
            row = _downscale(row, max_side)
        rows.append(row)
        summaries.append({"n": n, "id": row["id"], "name": seen[digest], "caption": row["caption"], "hash": digest,
                          "width": row["width"], "height": row["height"], "found": found, "source": row.get("source"),
                          "layout": row.get("layout"), "conditioning": row.get("conditioning") is not None})  # fmt: skip
    meta = {"inputs": plan["inputs"], "rows": summaries, "skipped": skipped}
    path = Path(folder) / plan["file"]
    write_shard(rows, path, meta)
    return {"shard": plan["shard"], "file": plan["file"], "bytes": path.stat().st_size, "started": started,
            "seconds": time.time() - started, "items": len(plan["items"]), **meta}  # fmt: skip


def _build_shard_row(row: dict, **kwargs) -> dict:
    """Ray Data's map: one row holds one plan (as JSON: items are free-form)."""
    result = build_shard(json.loads(row["plan"]), **kwargs)
    return {"result": json.dumps(result)}


@dataclass
class Built:
    """The shards of one prepare run, in order, as their footers describe them."""

    staging: Path
    shards: list[dict] = field(default_factory=list)
    reused: int = 0

    def rows(self):
        for shard in self.shards:
            yield from shard["rows"]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(name, reason) for shard in self.shards for name, reason in shard["skipped"]]

    @property
    def row_count(self) -> int:
        return sum(len(s["rows"]) for s in self.shards)


def _run(todo: list[dict], task: Callable, use_ray: bool):
    """Each plan's result as it finishes: Ray Data tasks inside a job, this process otherwise."""
    if not use_ray or not todo:
        for plan in todo:
            yield task(plan)
        return
    import ray.data

    from diffplat.data.pipeline import dataset_settings

    with dataset_settings(op_resource_reservation_enabled=False):  # every shard task starts at once
        ds = ray.data.from_items([{"plan": json.dumps(p)} for p in todo], override_num_blocks=len(todo))
        ds = ds.map(_build_shard_row, fn_kwargs=task.keywords, num_cpus=1)
    for row in ds.iter_rows():
        yield json.loads(row["result"])


def build_shards(items: Sequence[dict], make_row: RowMaker, final: Path, rows_per_shard: int, settings: dict,
                 max_side: int | None = None, use_ray: bool | None = None) -> Built:  # fmt: skip
    """Build (or reuse) the shards for `items` in final's staging folder; the caller judges the
    result and calls `finish` to swap it in. `settings` is everything else that shapes a row."""
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    final = Path(final)
    check_ours(final, "shards folder", (MANIFEST,))
    staging = final.with_name(f".{final.name}.partial")
    staging.mkdir(parents=True, exist_ok=True)
    mark(staging, "shards folder")
    settings_text = json.dumps(settings, sort_keys=True, default=str)
    plans = []
    for k, first in enumerate(range(0, len(items), rows_per_shard)):
        chunk = list(items[first : first + rows_per_shard])
        # the offset too: rows are indexed by their place in the whole list of items
        plans.append({"shard": k, "file": f"shard-{k:05d}.parquet", "first": first, "items": chunk,
                      "inputs": _inputs_hash(chunk, f"{settings_text}@{first}")})  # fmt: skip
    wanted = {p["file"] for p in plans}
    for stale in [*staging.glob("*.parquet"), *staging.glob(".*.tmp-*")]:  # temp files of killed tasks too
        if stale.name not in wanted:
            stale.unlink()
    results: dict[int, dict] = {}
    now = {p["file"]: p["inputs"] for p in plans}
    for plan in plans:
        for place in (staging, final):
            meta = read_shard_meta(place / plan["file"])
            # unchanged, and so are the shards that hold the first copies of pictures it dropped
            if meta is not None and meta["inputs"] == plan["inputs"] and all(
                    now.get(f) == h for f, h in meta.get("depends_on", {}).items()):  # fmt: skip
                if place != staging:
                    link_or_copy(place / plan["file"], staging / plan["file"])
                size = (staging / plan["file"]).stat().st_size
                results[plan["shard"]] = {"shard": plan["shard"], "file": plan["file"], "bytes": size, **meta}
                break
    built = Built(staging, reused=len(results))
    todo = [p for p in plans if p["shard"] not in results]
    if results:
        log.info("prepare: %d of %d shards unchanged since the last run, reused", len(results), len(plans))
    task = functools.partial(build_shard, make_row=make_row, folder=str(staging), max_side=max_side)
    start, done, total, ticker = time.perf_counter(), 0, sum(len(p["items"]) for p in todo), Ticker()
    for n, result in enumerate(_run(todo, task, use_ray), 1):
        results[result["shard"]] = result
        done += result["items"]
        if ticker.due(last_one=n == len(todo)):
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info("prepare: %d/%d shards built (%d/%d items, %.0f items/s, ETA %.0f s)", n, len(todo), done,
                     total, rate, max(total - done, 0) / max(rate, 1e-9))  # fmt: skip
    built.shards = [results[k] for k in sorted(results)]
    _drop_duplicates_across_shards(built)
    return built


def _drop_duplicates_across_shards(built: Built) -> None:
    """A picture in an earlier shard is dropped from later ones (their file rewritten)."""
    first: dict[str, tuple[str, dict]] = {}  # picture hash -> (name, shard holding it)
    for shard in built.shards:
        kept, dropped, depends_on = [], [], dict(shard.get("depends_on", {}))
        for i, row in enumerate(shard["rows"]):  # summaries are in file order
            if row["hash"] in first:
                name, holder = first[row["hash"]]
                dropped.append([row["name"], f"duplicate image (same content as {name})"])
                depends_on[holder["file"]] = holder["inputs"]
            else:
                first[row["hash"]] = row["name"], shard
                kept.append(i)
        if not dropped:
            continue
        path = built.staging / shard["file"]
        rows = pq.read_table(path).take(pa.array(kept, pa.int64())).to_pylist()  # by position: ids need not be unique
        shard["rows"] = [shard["rows"][i] for i in kept]
        shard["skipped"] = shard["skipped"] + dropped
        # Its content now depends on the shards holding the first copies: a rerun reuses it only
        # while they are unchanged too (a first copy edited since, and the second comes back).
        shard["depends_on"] = depends_on
        write_shard(rows, path, {k: shard[k] for k in ("inputs", "rows", "skipped", "depends_on")})
        shard["bytes"] = path.stat().st_size


def finish(built: Built, final: Path, source: str) -> dict:
    """Write the manifest and swap the staging folder in as `final`; the manifest's summary."""
    manifest = {
        "source": source,
        "rows": built.row_count,
        "bytes": sum(s["bytes"] for s in built.shards),
        "inputs": hashlib.blake2b("".join(s["inputs"] for s in built.shards).encode(), digest_size=16).hexdigest(),
        "shards_reused": built.reused,
        "shards": [{"file": s["file"], "rows": len(s["rows"]), "bytes": s["bytes"], "inputs": s["inputs"],
                    "skipped": len(s["skipped"])} for s in built.shards],  # fmt: skip
    }
    write_json_atomic(built.staging / MANIFEST, manifest)
    swap_in(built.staging, Path(final))
    return manifest
