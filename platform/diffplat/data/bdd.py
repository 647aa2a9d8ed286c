"""BDD100K: label JSON and segmentation masks -> one caption per image.

Facts of the data this encodes:
- the 2018 label files name classes `person`, `bike`, `motor`; the 2020 `det_20` files name them
  `pedestrian`, `bicycle`, `motorcycle`: both map onto one set of 10 detection classes;
- semantic masks hold train ids 0-18 (255 = ignore) and belong to the 10K set, which is not a
  subset of the 100K set, so an image may have a mask and no detection labels: its caption then
  comes from what the mask shows.
"""

from __future__ import annotations

import io
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

DETECTION_CLASSES = (
    "pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "traffic light", "traffic sign",
)  # fmt: skip

# 2018 names -> the det_20 names above.
CATEGORY_ALIASES = {"person": "pedestrian", "bike": "bicycle", "motor": "motorcycle"}
# Categories in the 2018 files that are not objects to count.
_NOT_OBJECTS = {"drivable area", "lane", "area/drivable", "area/alternative", "area/unknown"}

# Train ids 0-18 of BDD100K / Cityscapes semantic segmentation.
SEG_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
SEG_IGNORE = 255
# The Cityscapes palette, which BDD's colour masks use: the ControlNet conditioning image.
SEG_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
        (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
        (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],  # fmt: skip
    dtype=np.uint8,
)

_PLURALS = {"pedestrian": "pedestrians", "bus": "buses", "traffic light": "traffic lights"}


class LabelError(ValueError):
    """One label record that cannot be used; the message names it."""


class LabelFileError(LabelError):
    """A label file that cannot be read at all."""


@dataclass(frozen=True)
class FrameLabels:
    name: str  # the image file name, e.g. "b1c66a42-6f7d68ca.jpg"
    weather: str | None = None
    scene: str | None = None
    timeofday: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # detection class -> count
    boxes: tuple[tuple[str, float, float, float, float], ...] = ()  # (class, x1, y1, x2, y2)
    unknown_categories: tuple[str, ...] = ()


def _attr(attributes: dict, key: str, name: str) -> str | None:
    value = attributes.get(key)
    if value is None or value in ("", "undefined"):
        return None
    if not isinstance(value, str):
        raise LabelError(f"{name}: attribute `{key}` must be text, got {type(value).__name__}")
    return value


def parse_frame(record: dict, where: str = "") -> FrameLabels:
    """One image's record, in either the 2018 or the det_20 format."""
    if not isinstance(record, dict):
        raise LabelError(f"{where}: a label record must be an object, got {type(record).__name__}")
    name = record.get("name")
    if not isinstance(name, str) or not name:
        raise LabelError(f"{where}: label record has no `name`")
    attributes = record.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise LabelError(f"{name}: `attributes` must be an object")
    objects = record.get("labels") or []
    if not isinstance(objects, list):
        raise LabelError(f"{name}: `labels` must be a list")
    counts: dict[str, int] = {}
    boxes = []
    unknown = []
    for obj in objects:
        category = obj.get("category") if isinstance(obj, dict) else None
        if not isinstance(category, str):
            raise LabelError(f"{name}: an object has no `category`")
        category = CATEGORY_ALIASES.get(category, category)
        if category in _NOT_OBJECTS:
            continue
        if category not in DETECTION_CLASSES:
            unknown.append(category)
            continue
        counts[category] = counts.get(category, 0) + 1
        box = obj.get("box2d")
        if isinstance(box, dict) and all(k in box for k in ("x1", "y1", "x2", "y2")):
            try:
                corners = tuple(float(box[k]) for k in ("x1", "y1", "x2", "y2"))
            except (TypeError, ValueError, OverflowError):
                raise LabelError(f"{name}: a {category} box has a coordinate that is not a number") from None
            if not all(math.isfinite(v) for v in corners):  # NaN or infinity: no box at all
                raise LabelError(f"{name}: a {category} box has a coordinate that is not finite ({corners})")
            boxes.append((category, *corners))
    return FrameLabels(
        name=name,
        weather=_attr(attributes, "weather", name),
        scene=_attr(attributes, "scene", name),
        timeofday=_attr(attributes, "timeofday", name),
        counts=counts,
        boxes=tuple(boxes),
        unknown_categories=tuple(unknown),
    )


CHUNK = 1 << 20  # bytes read at a time from a label file
MAX_RECORD = 64 << 20  # no BDD record comes near this: past it, the JSON is broken, not long


def _json_values(f, where: str) -> Iterator[tuple[int, object]]:
    """(index, value) of each element of the JSON array `f` is positioned in, one at a time:
    a 100,000-frame label file is never held whole. Raises LabelError on malformed JSON."""
    decoder = json.JSONDecoder()
    buffer, offset, index, ended = "", 0, 0, False
    while True:
        while offset < len(buffer) and buffer[offset] in " \t\r\n,":
            offset += 1
        if offset < len(buffer) and buffer[offset] == "]":
            return
        try:
            value, end = decoder.raw_decode(buffer, offset)
        except RecursionError:  # nested deeper than Python's JSON reader goes: step over the record
            end = _value_end(buffer, offset)
            if end is None:  # its end is in a later chunk
                if ended or len(buffer) - offset > MAX_RECORD:
                    raise LabelError(f"{where}: record {index} is nested too deep and never ends; the rest is "
                                     "skipped") from None  # fmt: skip
                chunk = f.read(CHUNK)
                ended = not chunk
                buffer, offset = buffer[offset:] + chunk, 0
                continue
            value = LabelError(f"{where}[{index}]: the record is nested too deep to read")
        except json.JSONDecodeError as err:
            if ended or len(buffer) - offset > MAX_RECORD:
                raise LabelError(f"{where}: malformed JSON after record {index} ({err.msg}); the rest is skipped") from None
            chunk = f.read(CHUNK)
            ended = not chunk
            buffer, offset = buffer[offset:] + chunk, 0
            if ended and not buffer.strip():
                raise LabelError(f"{where}: the list of label records is not closed") from None
            continue
        if end == len(buffer) and not ended:  # a number or literal may go on in the next chunk
            chunk = f.read(CHUNK)
            ended = not chunk
            buffer, offset = buffer[offset:] + chunk, 0
            continue
        yield index, value
        index, offset = index + 1, end
        if offset > CHUNK:
            buffer, offset = buffer[offset:], 0


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON array or object at `start` ends (past its closing bracket), found without
    recursion; None when it does not end within `text`."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


ARRAY_START = re.compile(rb'(?:\xef\xbb\xbf)?\s*(\[|\{\s*"frames"\s*:\s*\[|\{)')


def _open_records(path: Path):
    """(text stream, whether it is positioned inside a list of records): past the `[` of a bare
    list or of Scalabel's `{"frames": [`, or at the start of one record (BDD's per-image label
    files). Offsets are found in bytes, so CRLF line ends and a BOM do not shift them."""
    raw = open(path, "rb")
    head = raw.read(1 << 16)
    match = ARRAY_START.match(head)
    if not match:
        raw.close()
        raise LabelFileError(f"{path}: expected a list of label records or one record, got {head.lstrip()[:20]!r}")
    in_list = match.group(1) != b"{"
    raw.seek(match.end() if in_list else match.start(1))
    return io.TextIOWrapper(raw, encoding="utf-8", newline=""), in_list


def iter_label_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of a label file, read as a stream; a folder is read as
    BDD's per-image label files (`*.json`, one record each; an unreadable one is one bad record)."""
    path = Path(path)
    if path.is_dir():
        for file in sorted(path.glob("*.json")):
            try:
                yield from iter_label_records(file)
            except LabelFileError as err:
                yield file.name, err
        return
    try:
        f, in_list = _open_records(path)
        records = None if in_list else [(path.name, json.load(f))]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise LabelFileError(f"{path}: cannot read label JSON: {err}") from None
    with f:
        if records:
            yield records[0]
            return
        try:
            for i, record in _json_values(f, path.name):
                yield f"{path.name}[{i}]", record
        except UnicodeDecodeError as err:
            raise LabelError(f"{path.name}: not UTF-8 part-way ({err.reason}); the rest is skipped") from None


def iter_label_file(path: Path) -> Iterator[FrameLabels | LabelError]:
    """Every frame of a label file (or folder), or the error of a record that cannot be used;
    a file that breaks off mid-way yields its error last."""
    try:
        for where, record in iter_label_records(path):
            if isinstance(record, LabelError):  # a per-image file that cannot be read
                yield LabelError(str(record))
                continue
            try:
                yield parse_frame(record, where=where)
            except LabelError as err:
                yield err
    except LabelError as err:
        yield err


def load_label_file(path: Path) -> tuple[dict[str, FrameLabels], list[str]]:
    """All usable frames of one label JSON (streamed), and a message for each record skipped.
    A file that cannot be read at all raises LabelError."""
    frames, skipped = {}, []
    for item in iter_label_file(path):
        if isinstance(item, LabelFileError):
            raise item
        if isinstance(item, LabelError):
            skipped.append(str(item))
        else:
            frames[item.name] = item
    return frames, skipped


def _count_phrase(cls: str, n: int) -> str:
    return f"{n} {cls}" if n == 1 else f"{n} {_PLURALS.get(cls, cls + 's')}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# Every value BDD100K uses, as a phrase that reads in a sentence; "undefined" says nothing.
SCENE_PHRASES = {"city street": "on a city street", "highway": "on a highway", "residential": "in a residential area",
                 "parking lot": "in a parking lot", "gas stations": "at a gas station", "tunnel": "in a tunnel"}  # fmt: skip
TIME_PHRASES = {"daytime": "in daytime", "night": "at night", "dawn/dusk": "at dawn or dusk"}
WEATHER_PHRASES = {"clear": "in clear weather", "overcast": "under an overcast sky",
                   "partly cloudy": "under a partly cloudy sky", "rainy": "in the rain", "snowy": "in the snow",
                   "foggy": "in fog"}  # fmt: skip
CAPTION_TEMPLATE = "a driving scene {scene}, {time}, {weather}, with {objects}"


def frames_by_stem(label_files) -> dict[str, "FrameLabels"]:
    """The usable frames of several label files, keyed by image stem (the name a mask or a
    generated image carries); records a file skips are left out."""
    frames = {}
    for path in label_files:
        found, _ = load_label_file(Path(path))
        frames.update({Path(name).stem: frame for name, frame in found.items()})
    return frames


def caption_from_labels(frame: FrameLabels, prefix: str = "", template: str = CAPTION_TEMPLATE) -> str:
    """e.g. "a driving scene on a city street, in daytime, in clear weather, with 3 cars and 1
    pedestrian". `template` is cut at ", ": a part whose fields all came out empty is left out
    (the first part stays), so a frame without weather or objects still reads as a sentence."""
    def phrase(table: dict, value: str | None) -> str:
        return "" if value is None else table.get(value, value)

    fields = {
        "scene": phrase(SCENE_PHRASES, frame.scene),
        "time": phrase(TIME_PHRASES, frame.timeofday),
        "weather": phrase(WEATHER_PHRASES, frame.weather),
        "objects": _join([_count_phrase(c, frame.counts[c]) for c in DETECTION_CLASSES if frame.counts.get(c)] or [""]),
    }
    kept = []
    for i, part in enumerate(template.split(", ")):
        named = [f for _, f, _, _ in string.Formatter().parse(part) if f]
        if i == 0 or not named or any(fields[f] for f in named):
            kept.append(" ".join(part.format(**fields).split()))
    text = ", ".join(kept)
    return (prefix + " " + text).strip() if prefix else text


def mask_classes(mask: np.ndarray, min_fraction: float = 0.01) -> list[str]:
    """Classes covering at least `min_fraction` of the labelled pixels, largest first."""
    valid = mask[mask != SEG_IGNORE]
    if valid.size == 0:
        return []
    ids, counts = np.unique(valid, return_counts=True)
    ids_counts = [(int(i), int(c)) for i, c in zip(ids, counts) if i < len(SEG_CLASSES)]
    ids_counts.sort(key=lambda ic: -ic[1])
    return [SEG_CLASSES[i] for i, c in ids_counts if c / valid.size >= min_fraction]


def caption_from_mask(mask: np.ndarray, prefix: str = "") -> str:
    """For an image with a mask and no detection labels: what the mask shows."""
    classes = mask_classes(mask)
    text = "a driving scene" + (" showing " + _join(classes) if classes else "")
    return (prefix + " " + text).strip() if prefix else text


def colorize_mask(mask: np.ndarray) -> np.ndarray:
    """Train-id mask (H, W) -> the palette image (H, W, 3); ignore pixels are black."""
    return _PALETTE_LUT[mask.astype(np.uint8, copy=False)]  # one table lookup: 5x a masked assignment


_PALETTE_LUT = np.zeros((256, 3), np.uint8)  # every uint8 id -> colour; ignore and unknown ids black
_PALETTE_LUT[: len(SEG_PALETTE)] = SEG_PALETTE


class MaskError(ValueError):
    """A segmentation mask that cannot be used; the message names the file and the reason."""


# Palette colour (packed as 0xRRGGBB) -> train id; black is BDD's colour for "ignore".
_COLOUR_IDS = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(SEG_PALETTE)}
_COLOUR_IDS[0] = SEG_IGNORE
_PALETTE_GREYS = {0} | {int(r) for r, g, b in SEG_PALETTE if r == g == b}


def mask_to_ids(array: np.ndarray, name: str) -> np.ndarray:
    """Train ids (H, W) from either form BDD ships: a grey train-id mask (0-18, 255 = ignore), or
    a colour map in the Cityscapes palette (black = ignore). An RGB image whose three channels are
    equal and hold only train ids is a grey mask saved as RGB."""
    if array.ndim == 3:
        rgb = array[..., :3]
        grey = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        # Equal channels are a grey mask saved as RGB, unless they hold only the palette's greys
        # (building, pole, black): a colour map of just those classes.
        if grey and not np.isin(rgb[..., 0], list(_PALETTE_GREYS)).all():
            array = rgb[..., 0]
        else:
            packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
            colours, inverse = np.unique(packed, return_inverse=True)
            unknown = [c for c in colours.tolist() if c not in _COLOUR_IDS]
            if unknown:
                shown = ", ".join(f"#{c:06x}" for c in unknown[:3])
                raise MaskError(f"{name}: colour map has colours outside the BDD palette ({len(unknown)}: {shown})")
            ids = np.array([_COLOUR_IDS[c] for c in colours.tolist()], dtype=np.uint8)
            return ids[inverse.reshape(packed.shape)]
    values = np.unique(array)
    bad = [int(v) for v in values if not (0 <= v < len(SEG_CLASSES) or v == SEG_IGNORE)]
    if bad:
        raise MaskError(f"{name}: mask has ids outside 0-18 and 255 ({', '.join(map(str, bad[:5]))})")
    return array.astype(np.uint8)


def read_mask(path: Path, max_pixels: int = 80_000_000) -> np.ndarray:
    """A mask file (grey train ids or colour map) as train ids; MaskError names what is wrong.
    The size is checked from the header first, as for images (decompression bombs)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise MaskError(f"{Path(path).name}: mask over the pixel limit ({img.width}x{img.height} > {max_pixels} pixels)")
            img.load()
            array = np.asarray(img.convert("RGB") if img.mode in ("P", "RGBA", "LA") else img)
    except (OSError, Image.DecompressionBombError) as err:
        raise MaskError(f"{Path(path).name}: cannot read the mask ({err})") from None
    return mask_to_ids(array, Path(path).name)


def find_mask(folder: Path | None, image_name: str) -> Path | None:
    """BDD names masks `<stem>_train_id.png` (10K release) or `<stem>.png` (sem_seg masks)."""
    if folder is None:
        return None
    stem = Path(image_name).stem
    for candidate in (folder / f"{stem}_train_id.png", folder / f"{stem}.png"):
        if candidate.is_file():
            return candidate
    return None
