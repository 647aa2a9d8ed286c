"""Parquet shards: the one format between `prepare` and everything that reads training data.

Rows are `{id, image, caption, conditioning, layout, width, height, source}`; `image` and
`conditioning` hold encoded image bytes (JPEG/PNG as found), so any Arrow tool can read them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("conditioning", pa.binary()),  # null unless the source has a conditioning image
        ("layout", pa.string()),  # null unless a composite ("2x2", "1x3", ...)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source", pa.string()),
    ]
)


META_KEY = b"diffplat"  # the footer entry where prepare describes a shard (shard_job.py)


def write_shard(rows: list[dict], path: Path, meta: dict | None = None) -> Path:
    """One shard file, whole or not at all; `meta` goes into its footer as JSON."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        writer.write_table(table)
        if meta is not None:  # in the file's footer only (schema metadata would also be copied into ARROW:schema)
            writer.add_key_value_metadata({META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def read_shard_meta(path: Path) -> dict | None:
    """The footer description of a shard prepare wrote (None: no file, or not one of ours)."""
    try:
        raw = (pq.read_metadata(path).metadata or {}).get(META_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def write_shards(rows: Iterable[dict], folder: Path, rows_per_shard: int = 256) -> list[Path]:
    """Write rows as `shard-00000.parquet`, ...; each file appears whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("shard-*.parquet"):
        stale.unlink()
    written: list[Path] = []
    batch: list[dict] = []

    def flush() -> None:
        written.append(write_shard(batch, folder / f"shard-{len(written):05d}.parquet"))
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= rows_per_shard:
            flush()
    if batch:
        flush()
    return written


def shard_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("shard-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no shard-*.parquet files (run a `prepare` stage first)")
    return files


def iter_rows(folder: Path, columns: list[str] | None = None) -> Iterator[dict]:
    for path in shard_files(folder):
        yield from pq.read_table(path, columns=columns).to_pylist()
