"""YOLO filtering with a real ultralytics model; the keep/reject rules on their own."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from diffplat.config import FilterConfig, FilterRules
from diffplat.filter.rules import Detection, decide
from diffplat.filter.yolo import _label_lines, run_filter


def _det(name, conf, cls=0):
    return Detection(name, cls, conf, (0.5, 0.5, 0.2, 0.1))


@pytest.mark.parametrize("rules, detections, keep, reason", [
    (FilterRules(), [], True, None),
    (FilterRules(min_count=2), [_det("car", 0.9), _det("car", 0.1)], False, "1 detections at confidence >= 0.25, need 2"),
    (FilterRules(required_classes=["car", "person"]), [_det("car", 0.9)], False, "missing required class: person"),
    (FilterRules(required_classes=["car"], min_confidence=0.5), [_det("car", 0.4)], False, "missing required class: car"),
    (FilterRules(required_classes=["car"], min_count=1), [_det("car", 0.6)], True, None),
])
def test_rules(rules, detections, keep, reason):
    kept, reasons = decide(detections, rules)
    assert kept is keep
    assert (reasons == []) if reason is None else (reason in reasons)


def test_label_lines_are_yolo_format():
    assert _label_lines([_det("car", 0.9, cls=2)]) == "2 0.500000 0.500000 0.200000 0.100000\n"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gens")
    (folder / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(folder / "images" / f"{i:06d}.png")
    return folder


def test_filter_with_a_real_yolo_writes_labels_report_and_dataset(images):
    config = FilterConfig(imgsz=128, rules=FilterRules(min_confidence=0.0, min_count=0))
    report = run_filter(config, images, "yolov8n.yaml")
    assert sorted(p.name for p in (images / "labels").iterdir()) == ["000000.txt", "000001.txt", "000002.txt"]
    assert sorted(p.name for p in (images / "annotated").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    saved = json.loads((images / "filter_report.json").read_text())
    assert saved["images"] == 3 and saved["kept"] + saved["rejected"] == 3
    assert set(saved["per_image"]) == {"000000.png", "000001.png", "000002.png"}
    for name, item in saved["per_image"].items():
        lines = (images / "labels" / name.replace(".png", ".txt")).read_text().splitlines()
        assert len(lines) == item["detections"]
        for line in lines:
            cls, *box = line.split()
            assert int(cls) >= 0 and all(0 <= float(v) <= 1 for v in box)
    data = yaml.safe_load((images / "dataset" / "data.yaml").read_text())
    # yolov8n.yaml has an 80-class head; without weights, ultralytics names the classes by number
    assert data["names"] == {i: str(i) for i in range(80)}
    assert data["train"] == "images/train" and data["path"] == "."
    assert len(list((images / "dataset" / "images" / "train").iterdir())) == report["kept"]


def test_filter_rejects_by_rule(images):
    config = FilterConfig(imgsz=128, save_annotated=False, rules=FilterRules(required_classes=["car"]))
    report = run_filter(config, images, "yolov8n.yaml")
    # an untrained detector finds no car at confidence 0.25 in noise
    assert report["kept"] == 0 and report["rejection_reasons"] == {"missing required class: car": 3}
    assert not list((images / "dataset" / "images" / "train").iterdir())


def test_filter_names_a_missing_weights_file(images):
    with pytest.raises(FileNotFoundError, match="filter.model: .*nope.pt is not a file"):
        run_filter(FilterConfig(), images, str(images / "nope.pt"))


def test_filter_names_a_folder_without_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="filter: no images in .*images"):
        run_filter(FilterConfig(), tmp_path, "yolov8n.yaml")
