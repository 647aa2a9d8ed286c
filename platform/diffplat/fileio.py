"""Writes that never leave a half-written file or folder where a good one was."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from diffplat.config import ConfigError

MARKER = ".diffplat"  # in every folder diffplat replaces whole: the kind of output it is


class NotOurs(ConfigError):
    """An output path holding something diffplat did not write: it is never replaced."""


def check_ours(final: Path, kind: str, signs: tuple[str, ...] = ()) -> None:
    """Refuse to replace `final` unless it is absent, empty, or diffplat's own output: it holds
    the marker, or one of `signs` (a file, relative to it, that such an output written before the
    marker existed always has). Raised before any work starts, naming the path and one file."""
    final = Path(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise NotOurs(f"{final} is a file, not a {kind} folder diffplat wrote; give an empty or new folder")
    first = next(final.iterdir(), None)
    if first is None or (final / MARKER).is_file() or any((final / sign).is_file() for sign in signs):
        return
    raise NotOurs(f"{final} is not empty and is not a {kind} diffplat wrote (it holds {first.name!r}, and no "
                  f"{MARKER} marker): diffplat replaces only its own outputs; give an empty or new folder")  # fmt: skip


@contextmanager
def replace_dir(final: Path, kind: str, signs: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    `final` is replaced only if it is absent, empty or diffplat's own (check_ours: the marker,
    written into every folder made here, or one of `signs`). On error the temporary folder is
    removed and whatever was at `final` is untouched.
    """
    final = Path(final)
    check_ours(final, kind, signs)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mark(tmp, kind)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, final)


def mark(folder: Path, kind: str) -> None:
    """Say in `folder` that diffplat made it, and as what (check_ours reads it)."""
    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind}) + "\n")


def swap_in(ready: Path, final: Path) -> None:
    """Put the finished folder `ready` where `final` is, the old one removed after."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    ready.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no second copy of a large dataset where the file system
    allows it), else a copy; whatever was at `dst` is replaced. A file a trainer would rewrite in
    place is always copied, so the original cannot be changed through the link."""
    Path(dst).unlink(missing_ok=True)
    if rewritten_in_place(src):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def rewritten_in_place(path: Path) -> bool:
    """Whether a trainer may re-save this image where it is: a JPEG (by its content) that does
    not end with its end-of-image marker, which ultralytics "restores" when it checks a dataset."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return False
            f.seek(-2, os.SEEK_END)
            return f.read() != b"\xff\xd9"
    except OSError:  # shorter than two bytes, or unreadable: a copy is the safe side
        return True


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of a .jsonl file, one a line; a torn or foreign line (a run killed
    mid-write) is passed over. Nothing if there is no file."""
    path = Path(path)
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # torn, foreign, or nested past reading
            continue
        if isinstance(record, dict):
            yield record
