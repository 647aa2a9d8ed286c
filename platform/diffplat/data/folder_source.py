"""The `folder` prepare source: images with captions, for text-to-image LoRA.

Two layouts, as users bring them: a caption per image in a same-named `.txt` (sources 1, 3 and
5; kohya), or the `metadata.jsonl` of diffusers' image folders, one JSON object per line with
`file_name` and a caption field (source 2's `--train_data_dir`, `--caption_column`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from diffplat.config import FolderSource
from diffplat.data.composite_source import Skips, read_caption
from diffplat.data.composites import CompositeError
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


def _from_text_files(folder: Path, captions: Path | None, skips: Skips) -> Iterator[tuple[Path, str]]:
    for image in list_images(folder):
        try:
            yield image, read_caption(captions / f"{image.stem}.txt" if captions else image)
        except CompositeError as err:
            skips.add(str(err), image.name)


def captioned_images(c: FolderSource, resolve: Callable, skips: Skips) -> Iterator[tuple[Path, str]]:
    """(image, caption) for every usable item; the others go to `skips`, named."""
    folder = resolve(c.images)
    if not folder.is_dir():
        raise FileNotFoundError(f"prepare.folder.images: {folder} is not a folder")
    captions = resolve(c.captions) if c.captions else None
    if captions is not None and not captions.is_dir():
        raise FileNotFoundError(f"prepare.folder.captions: {captions} is not a folder")
    if (folder / METADATA).is_file() and captions is None:
        return _from_metadata(folder, c.caption_column, skips)
    return _from_text_files(folder, captions, skips)
