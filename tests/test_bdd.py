"""Captions from BDD labels and masks; the prepare stage on a synthetic BDD layout."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffplat.config import PrepareConfig
from diffplat.data import bdd
from diffplat.data.prepare import NothingUsable, prepare_bdd


def test_2018_and_det20_names_map_to_one_class_set():
    old = bdd.parse_frame({"name": "a.jpg", "labels": [{"category": c} for c in ("person", "bike", "motor", "car")]})
    new = bdd.parse_frame({"name": "b.jpg", "labels": [{"category": c} for c in ("pedestrian", "bicycle", "motorcycle", "car")]})
    assert old.counts == new.counts == {"pedestrian": 1, "bicycle": 1, "motorcycle": 1, "car": 1}


def test_caption_from_labels_counts_and_attributes():
    frame = bdd.parse_frame({
        "name": "a.jpg",
        "attributes": {"weather": "rainy", "scene": "highway", "timeofday": "night"},
        "labels": [{"category": "car"}] * 3 + [{"category": "person"}, {"category": "drivable area"}, {"category": "bus"}],
    })
    caption = bdd.caption_from_labels(frame, prefix="[BDD]")
    assert caption == "[BDD] a driving scene on a highway, night, rainy weather, with 1 pedestrian, 3 cars and 1 bus"


def test_undefined_attributes_are_left_out():
    frame = bdd.parse_frame({"name": "a.jpg", "attributes": {"weather": "undefined", "scene": "undefined"}})
    assert bdd.caption_from_labels(frame) == "a driving scene"


def test_unknown_categories_are_counted_not_fatal():
    frame = bdd.parse_frame({"name": "a.jpg", "labels": [{"category": "car"}, {"category": "unicorn"}]})
    assert frame.counts == {"car": 1} and frame.unknown_categories == ("unicorn",)


@pytest.mark.parametrize("record, message", [
    ({"labels": []}, "no `name`"),
    ({"name": "x.jpg", "labels": "car"}, "x.jpg: `labels` must be a list"),
    ({"name": "x.jpg", "labels": [{"box2d": {}}]}, "x.jpg: an object has no `category`"),
    ("just a string", "must be an object"),
])
def test_bad_records_name_the_item(record, message):
    with pytest.raises(bdd.LabelError, match=message):
        bdd.parse_frame(record, where="labels.json[3]")


def test_caption_from_mask_lists_what_it_shows():
    mask = np.full((10, 10), bdd.SEG_CLASSES.index("road"), np.uint8)
    mask[:4] = bdd.SEG_CLASSES.index("sky")
    mask[9, 9] = bdd.SEG_CLASSES.index("car")  # 1%: counts
    mask[0, 0] = bdd.SEG_IGNORE
    assert bdd.caption_from_mask(mask) == "a driving scene showing road, sky and car"


def test_colorize_mask_uses_palette_and_blacks_out_ignore():
    mask = np.array([[0, 13], [255, 10]], np.uint8)
    rgb = bdd.colorize_mask(mask)
    assert tuple(rgb[0, 0]) == (128, 64, 128) and tuple(rgb[0, 1]) == (0, 0, 142) and tuple(rgb[1, 0]) == (0, 0, 0)


def _prepare(bdd_dir, out, **bdd_overrides):
    source = {
        "images": str(bdd_dir / "images"),
        "labels": [str(p) for p in sorted((bdd_dir / "labels").glob("*.json"))],
        "seg_masks": str(bdd_dir / "masks"),
        **bdd_overrides,
    }
    config = PrepareConfig(bdd=source, output=str(out), rows_per_shard=5)
    return prepare_bdd(config, lambda p: __import__("pathlib").Path(p))


def test_prepare_writes_shards_index_and_report(bdd_dir, tmp_path):
    report = _prepare(bdd_dir, tmp_path / "data")
    images = len(list((bdd_dir / "images").glob("*.jpg")))
    assert report["images_found"] == images
    assert report["skipped"] == {"corrupt image": 1}
    assert report["rows_written"] == images - 1
    # every sixth synthetic image has only a mask: its caption comes from the mask
    assert report["rows_by_caption_source"]["bdd:mask"] == 2
    shards = sorted((tmp_path / "data" / "shards").glob("shard-*.parquet"))
    assert len(shards) == 3  # 11 rows, 5 per shard
    table = pq.read_table(shards)
    assert table.num_rows == report["rows_written"]
    rows = table.to_pylist()
    assert all(r["image"][:2] == b"\xff\xd8" and r["width"] == 256 and r["height"] == 144 for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id["synth-00005"]["source"] == "bdd:mask" and "showing" in by_id["synth-00005"]["caption"]
    assert by_id["synth-00001"]["conditioning"][:4] == b"\x89PNG"
    assert by_id["synth-00000"]["conditioning"] is None
    lora_index = [json.loads(l) for l in (tmp_path / "data" / "index_lora.jsonl").read_text().splitlines()]
    cn_index = [json.loads(l) for l in (tmp_path / "data" / "index_controlnet.jsonl").read_text().splitlines()]
    assert len(lora_index) == report["rows_written"]
    assert len(cn_index) == report["with_conditioning"] > 0
    assert all(set(r) == {"image", "conditioning", "caption"} for r in cn_index)
    saved = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert saved["rows_written"] == report["rows_written"]


def test_prepare_fails_when_nothing_is_usable(bdd_dir, tmp_path):
    with pytest.raises(NothingUsable, match="no usable rows"):
        _prepare(bdd_dir, tmp_path / "data", labels=[], seg_masks=None)
    # the report is still written, saying why
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert report["skipped"]["no caption source"] == report["images_found"] - 1


def test_prepare_rejects_unreadable_label_file(bdd_dir, tmp_path):
    bad = tmp_path / "labels.json"
    bad.write_text("{not json")
    with pytest.raises(bdd.LabelError, match="labels.json: cannot read label JSON"):
        _prepare(bdd_dir, tmp_path / "data", labels=[str(bad)])
