"""Captions from BDD labels and masks; the prepare stage on a synthetic BDD layout."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffplat.config import ConfigError, PrepareConfig
from diffplat.data import bdd
from diffplat.data.prepare import NothingUsable, prepare, prepare_bdd


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
    assert caption == "[BDD] a driving scene on a highway, at night, in the rain, with 1 pedestrian, 3 cars and 1 bus"


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


def test_prepare_writes_what_source_4_wrote_and_a_yolo_dataset(bdd_dir, tmp_path, monkeypatch):
    import csv

    import yaml

    report = _prepare(bdd_dir, tmp_path / "data")
    data = tmp_path / "data"
    captions = {p.stem: p.read_text().strip() for p in (data / "captions").glob("*.txt")}
    assert len(captions) == report["rows_written"]
    with open(data / "bdd_hf_dataset_lora_train.csv") as f:
        lora = list(csv.DictReader(f))
    assert len(lora) == report["rows_written"] and lora[0]["text"] == captions[Path(lora[0]["image"]).stem]
    with open(data / "bdd_hf_dataset_controlnet_train.csv") as f:
        controlnet = list(csv.DictReader(f))
    assert len(controlnet) == report["with_conditioning"] and set(controlnet[0]) == {"image", "conditioning_image", "text"}
    spec = yaml.safe_load((data / "yolo" / "data.yaml").read_text())
    assert spec["names"] == dict(enumerate(bdd.DETECTION_CLASSES)) and "path" not in spec
    frames = {name: f for p in (bdd_dir / "labels").glob("*.json") for name, f in bdd.load_label_file(p)[0].items()}
    assert len(list((data / "yolo" / "labels" / "train").glob("*.txt"))) > 3
    for label in (data / "yolo" / "labels" / "train").glob("*.txt"):
        frame = frames[label.stem + ".jpg"]
        lines = label.read_text().splitlines()
        assert len(lines) == len(frame.boxes) and (data / "yolo" / "images" / "train" / f"{label.stem}.jpg").is_file()
        cls, cx, cy, w, h = lines[0].split()
        name, x1, y1, x2, y2 = frame.boxes[0]
        assert bdd.DETECTION_CLASSES[int(cls)] == name
        assert float(cx) == pytest.approx((x1 + x2) / 2 / 256, abs=1e-5) and float(h) == pytest.approx((y2 - y1) / 144, abs=1e-5)
    # the CSV index is source 4's, which the pairs source reads back
    from diffplat.config import PairsSource
    from diffplat.data.composite_source import Skips
    from diffplat.data.pairs_source import pair_items, pair_row

    source = PairsSource(csv=str(data / "bdd_hf_dataset_controlnet_train.csv"))
    rows = [pair_row(item, source, "") for item in pair_items(source, Path, Skips())]
    assert len(rows) == report["with_conditioning"]
    # and the LoRA CSV index, which the folder source reads back
    again = prepare(PrepareConfig(source="folder", folder={"csv": str(data / "bdd_hf_dataset_lora_train.csv")},
                                  output=str(data.parent / "again")), Path)  # fmt: skip
    assert again["rows_written"] == report["rows_written"] and again["source"] == "folder:csv"


def test_where_keeps_the_frames_of_one_time_of_day(bdd_dir, tmp_path):
    report = _prepare(bdd_dir, tmp_path / "data", where={"timeofday": ["night"]})
    rows = pq.read_table(sorted((tmp_path / "data" / "shards").glob("*.parquet"))).to_pylist()
    assert rows and all(", at night," in r["caption"] for r in rows)
    assert report["left_out_by_where"] == report["images_found"] - len(rows) > 0
    with pytest.raises(ConfigError, match=r"where keeps no image: timeofday is one of \['nite'\], but the labels "
                                          r"have dawn/dusk, daytime, night"):  # fmt: skip
        _prepare(bdd_dir, tmp_path / "other", where={"timeofday": ["nite"]})


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


@pytest.mark.parametrize("scene, time, weather, caption", [
    ("gas stations", "dawn/dusk", "partly cloudy", "a driving scene at a gas station, at dawn or dusk, under a partly cloudy sky"),
    ("residential", "daytime", "foggy", "a driving scene in a residential area, in daytime, in fog"),
    ("parking lot", None, "snowy", "a driving scene in a parking lot, in the snow"),
    ("tunnel", "night", "overcast", "a driving scene in a tunnel, at night, under an overcast sky"),
    ("city street", "daytime", "clear", "a driving scene on a city street, in daytime, in clear weather"),
    (None, None, None, "a driving scene"),
])  # fmt: skip
def test_every_bdd_value_reads_as_english(scene, time, weather, caption):
    frame = bdd.FrameLabels(name="x.jpg", scene=scene, timeofday=time, weather=weather)
    assert bdd.caption_from_labels(frame) == caption


def test_caption_template_from_the_job():
    frame = bdd.FrameLabels(name="x.jpg", scene="highway", timeofday="night", weather="rainy", counts={"car": 2})
    assert bdd.caption_from_labels(frame, template="dashcam photo {time} {scene}, {weather}, {objects}") == (
        "dashcam photo at night on a highway, in the rain, 2 cars")
    no_objects = bdd.FrameLabels(name="y.jpg", scene="highway")
    assert bdd.caption_from_labels(no_objects, template="dashcam photo {scene}, {weather}, {objects}") == (
        "dashcam photo on a highway")


def _records(n: int) -> list[dict]:
    return [{"name": f"f{i:06d}.jpg", "attributes": {"weather": "clear", "scene": "highway", "timeofday": "night"},
             "labels": [{"category": "car", "box2d": {"x1": 1, "y1": 2, "x2": 30.5, "y2": 40}}] * (i % 3)}
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("layout", ["list", "frames", "folder"])
def test_label_files_stream_in_every_layout(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(bdd, "CHUNK", 64)  # records cross chunk boundaries
    records = _records(30)
    if layout == "list":
        path = tmp_path / "labels.json"
        path.write_text(json.dumps(records, indent=1))
    elif layout == "frames":
        path = tmp_path / "scalabel.json"
        path.write_text(json.dumps({"frames": records, "config": {"x": 1}}))
    else:
        path = tmp_path / "per_image"
        path.mkdir()
        for r in records:
            (path / r["name"].replace(".jpg", ".json")).write_text(json.dumps(r))
    frames, skipped = bdd.load_label_file(path)
    assert sorted(frames) == [r["name"] for r in records] and skipped == []
    assert frames["f000002.jpg"].counts == {"car": 2} and frames["f000002.jpg"].boxes[0] == ("car", 1.0, 2.0, 30.5, 40.0)


def test_a_label_file_broken_part_way_keeps_what_came_before(tmp_path, monkeypatch):
    monkeypatch.setattr(bdd, "CHUNK", 64)
    text = json.dumps(_records(5))
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index('{"name": "f000003')] + '{"name": "f000003.jpg", "attr')
    frames, skipped = bdd.load_label_file(path)
    assert sorted(frames) == ["f000000.jpg", "f000001.jpg", "f000002.jpg"]
    assert len(skipped) == 1 and "cut.json: malformed JSON after record 3" in skipped[0]
    (tmp_path / "not.json").write_text('"just a string"')
    with pytest.raises(bdd.LabelFileError, match="expected a list of label records or one record"):
        bdd.load_label_file(tmp_path / "not.json")


def test_crlf_bom_and_bad_per_image_files(tmp_path):
    records = _records(3)
    crlf = tmp_path / "crlf.json"
    crlf.write_bytes(b"\xef\xbb\xbf\r\n" + json.dumps({"frames": records}, indent=1).replace("\n", "\r\n").encode())
    frames, skipped = bdd.load_label_file(crlf)
    assert sorted(frames) == [r["name"] for r in records] and skipped == []
    folder = tmp_path / "per_image"
    folder.mkdir()
    for r in records:
        (folder / r["name"].replace(".jpg", ".json")).write_text(json.dumps(r))
    (folder / "f000001.json").write_text('{"name": "f000001.jpg", "attri')
    (folder / "zz.json").write_text(json.dumps({"name": "zz.jpg", "labels": [{"category": "car", "box2d":
                                                {"x1": None, "y1": 0, "x2": 1, "y2": 1}}]}))  # fmt: skip
    frames, skipped = bdd.load_label_file(folder)
    assert sorted(frames) == ["f000000.jpg", "f000002.jpg"] and len(skipped) == 2
    assert any("f000001.json" in s for s in skipped) and any("a car box has a coordinate" in s for s in skipped)
