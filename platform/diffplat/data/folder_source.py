"""The `folder` prepare source: images with captions, for text-to-image LoRA.

Three layouts, as users bring them: a caption per image in a same-named `.txt` (sources 1, 3
and 5; kohya), the `metadata.jsonl` of diffusers' image folders, one JSON object per line with
`file_name` and a caption field (source 2's `--train_data_dir`, `--caption_column`), or source
4's LoRA CSV index (`image`, `text`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Iterator

from diffplat.config import FolderSource
from diffplat.data.composite_source import Skips, read_caption
from diffplat.data.composites import CompositeError
from diffplat.data.images import BadImage, read_image
from diffplat.data.shard_job import Skip
from diffplat.pictures import list_images

METADATA = "metadata.jsonl"


def _from_metadata(folder: Path, column: str, skips: Skips) -> Iterator[tuple[Path, str]]:
    with open(folder / METADATA, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{METADATA} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                skips.add(f"not JSON ({err.msg})", where)
                continue
            except RecursionError:
                skips.add("nested too deep to read", where)
                continue
            if not isinstance(record, dict):
                skips.add(f"not a JSON object ({type(record).__name__})", where)
                continue
            name, caption = record.get("file_name"), record.get(column)
            if not isinstance(name, str) or not name:
                skips.add("no file_name", where)
            elif not isinstance(caption, str) or not caption.strip():
                skips.add(f"no caption in field {column!r}", f"{where} ({name})")
            elif Path(name).is_absolute() or ".." in Path(name).parts:
                skips.add("file_name leaves the folder", f"{where} ({name})")
            elif not (folder / name).is_file():
                skips.add("no such image", f"{where} ({name})")
            else:
                yield folder / name, caption.strip()


def _from_text_files(folder: Path, captions: Path | None, skips: Skips) -> Iterator[tuple[Path, Path]]:
    """(image, its caption file): the file is read in the shard task, which skips a bad one."""
    for image in list_images(folder):
        yield image, (captions / f"{image.stem}.txt" if captions else image.with_suffix(".txt"))


def csv_rows(index: Path, columns: tuple[str, ...], field: str, skips: Skips) -> Iterator[tuple[str, dict]]:
    """(where, row) for every line of a CSV index (source 4's), its columns checked first; a
    line the csv module cannot read (an over-long field, a stray quote) is skipped with its
    reason, and the reading goes on at the next line."""
    if not index.is_file():
        raise FileNotFoundError(f"{field}: {index} is not a file")
    with open(index, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = [name for name in columns if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{field}: {index.name} has no column {missing[0]!r} "
                             f"(columns: {', '.join(reader.fieldnames or [])})")  # fmt: skip
        while True:
            where = f"{index.name} line {reader.line_num + 1}"
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                skips.add(f"unreadable CSV line ({err})", where)
                continue
            yield where, {name: row.get(name) if isinstance(row.get(name), str) else "" for name in columns}


def is_file(path: Path) -> bool:
    """Whether `path` is a file; False, not an error, for a name no file can have (a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _from_csv(index: Path, c: FolderSource, skips: Skips) -> Iterator[tuple[Path, str]]:
    for where, row in csv_rows(index, (c.image_column, c.caption_column), "prepare.folder.csv", skips):
        path = Path(row[c.image_column])
        path = path if path.is_absolute() else index.parent / path
        caption = row[c.caption_column].strip()
        if not caption:
            skips.add("missing caption", where)
        elif not is_file(path):
            skips.add(f"no image ({path.name})", where)
        else:
            yield path, caption


def folder_items(c: FolderSource, resolve: Callable, skips: Skips) -> list[dict]:
    """One work item per image: its path, and its caption or the file that holds it. Two images
    with one base name (a.jpg, a.png) would be one row id: the second is named and skipped."""
    if c.csv:
        return _items(((p, {"caption": t}) for p, t in _from_csv(resolve(c.csv), c, skips)), skips)
    folder = resolve(c.images)
    if not folder.is_dir():
        raise FileNotFoundError(f"prepare.folder.images: {folder} is not a folder")
    captions = resolve(c.captions) if c.captions else None
    if captions is not None and not captions.is_dir():
        raise FileNotFoundError(f"prepare.folder.captions: {captions} is not a folder")
    if (folder / METADATA).is_file() and captions is None:
        found = ((path, {"caption": caption}) for path, caption in _from_metadata(folder, c.caption_column, skips))
    else:
        found = ((path, {"caption_file": str(text)}) for path, text in _from_text_files(folder, captions, skips))
    return _items(found, skips)


def _items(found, skips: Skips) -> list[dict]:
    items, seen = [], {}
    for path, caption in found:
        if path.stem in seen:
            skips.add(f"duplicate name (as {seen[path.stem]})", str(path))
            continue
        seen[path.stem] = str(path)
        files = [str(path)] + ([caption["caption_file"]] if "caption_file" in caption else [])
        items.append({"id": path.stem, "name": path.name, "image": str(path), **caption, "files": files})
    return items


def folder_row(item: dict, prefix: str, max_pixels: int) -> dict:
    """One image and its caption -> its shard row (in a shard task)."""
    caption = item.get("caption")
    if caption is None:
        try:
            caption = read_caption(Path(item["caption_file"]))
        except CompositeError as err:
            raise Skip(str(err), item["name"]) from None
    try:
        data, image = read_image(Path(item["image"]), max_pixels)
    except BadImage as err:
        raise Skip(str(err), item["name"]) from None
    return {"id": item["id"], "image": data, "caption": prefix + caption, "width": image.width,
            "height": image.height, "source": "folder"}  # fmt: skip
