"""Every parser survives every input: generated JSON (random nesting, types and numbers, NaN and
infinities included) fed to the BDD label readers and the metadata readers. A bad record is
skipped with a reason, never raised; no label line ever holds a number that is not finite."""

import json
import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffplat.data.bdd import FrameLabels, LabelError, iter_label_file, parse_frame
from diffplat.data.bdd_exports import Labelled, yolo_lines
from diffplat.fileio import read_jsonl

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=4), max_leaves=20)  # fmt: skip
NUMBER = st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(10**400), max_value=10**400) | st.text(max_size=4)
# records shaped like BDD's, with every field free to be of the wrong type
BOX = st.fixed_dictionaries({"x1": NUMBER, "y1": NUMBER, "x2": NUMBER, "y2": NUMBER}) | JSON
OBJECT = st.fixed_dictionaries({"category": st.sampled_from(["car", "person", "bike", "traffic sign"]) | JSON},
                               optional={"box2d": BOX})  # fmt: skip
RECORD = st.fixed_dictionaries({"name": st.text(min_size=1, max_size=8) | JSON},
                               optional={"attributes": st.dictionaries(st.sampled_from(["weather", "scene", "timeofday"]),
                                                                       JSON | st.text(max_size=8)) | JSON,
                                         "labels": st.lists(OBJECT, max_size=4) | JSON}) | JSON  # fmt: skip
DEEP = "[" * 100_000 + "]" * 100_000


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECORD)
def test_a_label_record_parses_or_is_refused_by_name(record):
    try:
        frame = parse_frame(record, where="file.json[0]")
    except LabelError:
        return
    assert isinstance(frame, FrameLabels) and isinstance(frame.name, str)
    assert all(math.isfinite(v) for box in frame.boxes for v in box[1:])
    for line in yolo_lines(Labelled(Path("x.jpg"), "", 1280, 720, None, frame.boxes)).splitlines():
        numbers = [float(v) for v in line.split()[1:]]
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in numbers), line


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(RECORD, max_size=5), st.integers(0, 5))
def test_a_label_file_yields_frames_and_reasons_never_an_exception(tmp_path, records, deep_at):
    """A list file with generated records, one of them nested 100,000 levels deep: every record
    is a frame or a LabelError, and the records after the deep one are still read."""
    texts = [_dumps(r) for r in records]
    texts.insert(min(deep_at, len(texts)), DEEP)
    path = tmp_path / "labels.json"
    path.write_text("[" + ",".join(texts) + "]")
    items = list(iter_label_file(path))
    assert all(isinstance(i, (FrameLabels, LabelError)) for i in items)
    assert len(items) == len(texts)
    assert any("nested too deep" in str(i) for i in items if isinstance(i, LabelError))
    single = tmp_path / "one.json"  # BDD's per-image label files: one record a file
    single.write_text(DEEP)
    assert all(isinstance(i, LabelError) for i in iter_label_file(single))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(JSON | RECORD, max_size=6))
def test_metadata_lines_are_objects_or_passed_over(tmp_path, values):
    from diffplat.data.composite_source import Skips
    from diffplat.data.folder_source import _from_metadata

    lines = [_dumps(v) for v in values] + [DEEP, "{torn", ""]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert all(isinstance(r, dict) for r in read_jsonl(tmp_path / "metadata.jsonl"))
    skips = Skips()
    found = list(_from_metadata(tmp_path, "text", skips))  # every line either an item or a counted skip
    assert len(found) + sum(skips.reasons.values()) == sum(1 for line in lines if line.strip())


CELL = st.text(max_size=12) | st.sampled_from(['"', '""', "\x00", "\r", "a\nb", "x" * 140_000, "../x.png", "good.png"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(CELL, max_size=4), max_size=6), st.integers(0, 6))
def test_csv_index_lines_are_items_or_skips_with_reasons(tmp_path, rows, bad_at):
    """Source 4's CSV indexes with generated cells (quotes, NUL bytes, over-long fields, short
    and long rows): every line is an item or a counted skip, and the lines after a line the csv
    module cannot read are still read."""
    import csv
    import io

    from diffplat.config import FolderSource, PairsSource
    from diffplat.data.composite_source import Skips
    from diffplat.data.folder_source import _from_csv
    from diffplat.data.pairs_source import _csv_pairs

    (tmp_path / "good.png").write_bytes(b"not read here")
    (tmp_path / "map.png").write_bytes(b"not read here")
    def line(row: list[str]) -> str:  # quoted as csv writes it: an open quote would run to the end
        out = io.StringIO()
        csv.writer(out, lineterminator="").writerow(row)
        return out.getvalue()

    lines = [line(row) for row in rows]
    lines.insert(min(bad_at, len(lines)), '"' + "y" * (csv.field_size_limit() + 10) + '",caption')  # over the limit
    lines.append("good.png,a caption,map.png")
    index = tmp_path / "index.csv"
    index.write_text("image,text,conditioning_image\n" + "\n".join(lines) + "\n", encoding="utf-8")
    skips = Skips()
    found = list(_from_csv(index, FolderSource(csv=str(index)), skips))
    assert (tmp_path / "good.png", "a caption") in found  # the last line, after the unreadable one
    assert any(reason.startswith("unreadable CSV line") for reason in skips.reasons)
    pairs = Skips()
    matched = list(_csv_pairs(PairsSource(csv=str(index)), lambda p: Path(p), pairs))
    assert (tmp_path / "good.png", tmp_path / "map.png", "a caption") in matched
