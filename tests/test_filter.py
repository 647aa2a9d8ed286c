"""YOLO filtering with a real ultralytics model on Ray Data; the keep/reject rules on their own.

The detector is yolov8n built from its yaml with random weights (nothing may be downloaded), so
what it finds in an image is not known in advance: the stage's verdicts are checked against the
same model run one image at a time in this process, and each rule against detections made up
for it."""

import json
from collections import Counter

import numpy as np
import pytest
import yaml
from PIL import Image

from diffplat.config import FilterConfig, FilterRules
from diffplat.filter.rules import Detection, decide, touches_edge
from diffplat.filter.yolo import _detections, _label_lines, load_detector, run_filter


def _det(name, conf, cls=0, box=(0.5, 0.5, 0.2, 0.1)):
    return Detection(name, cls, conf, box)


EDGE = (0.05, 0.5, 0.1, 0.2)  # a box from x=0 to x=0.1: touches the left edge


@pytest.mark.parametrize("rules, detections, keep, reason", [
    (FilterRules(), [], True, None),
    (FilterRules(min_count=2), [_det("car", 0.9), _det("car", 0.1)], False, "1 detections at confidence >= 0.25, need 2"),
    (FilterRules(required_classes=["car", "person"]), [_det("car", 0.9)], False, "missing required class: person"),
    (FilterRules(required_classes=["car"], min_confidence=0.5), [_det("car", 0.4)], False, "missing required class: car"),
    (FilterRules(required_classes=["car"], min_count=1), [_det("car", 0.6)], True, None),
    (FilterRules(class_min_confidence={"person": 0.8}, required_classes=["person"]), [_det("person", 0.7)], False,
     "missing required class: person"),
    (FilterRules(class_min_confidence={"person": 0.1}, required_classes=["person"]), [_det("person", 0.2)], True, None),
    (FilterRules(max_count=1), [_det("car", 0.9), _det("car", 0.8)], False, "2 detections, at most 1"),
    (FilterRules(max_count=1), [_det("car", 0.9), _det("car", 0.1)], True, None),
    (FilterRules(max_edge_share=0.5), [_det("car", 0.9, box=EDGE), _det("car", 0.9, box=EDGE), _det("car", 0.9)],
     False, "67% of boxes touch the image edge, at most 50%"),
    (FilterRules(max_edge_share=0.5), [_det("car", 0.9, box=EDGE), _det("car", 0.9)], True, None),
])  # fmt: skip
def test_rules(rules, detections, keep, reason):
    kept, reasons = decide(detections, rules)
    assert kept is keep
    assert (reasons == []) if reason is None else (reason in reasons)


def test_edge_contact():
    assert touches_edge(_det("car", 1, box=EDGE), 0.01)
    assert not touches_edge(_det("car", 1), 0.01)
    assert touches_edge(_det("car", 1, box=(0.5, 0.9, 0.2, 0.19)), 0.01)  # bottom at 0.995


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


def test_filter_with_a_real_yolo_writes_labels_report_and_dataset(images, local_ray):
    config = FilterConfig(imgsz=128, rules=FilterRules(min_confidence=0.0, min_count=0))
    report = run_filter(config, images, "yolov8n.yaml")
    # (besides the .diffplat marker that says diffplat wrote the folder)
    assert sorted(p.name for p in (images / "labels").glob("[!.]*")) == ["000000.txt", "000001.txt", "000002.txt"]
    assert sorted(p.name for p in (images / "annotated").glob("[!.]*")) == ["000000.png", "000001.png", "000002.png"]
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
    assert data["train"] == "images/train" and "path" not in data  # read against data.yaml's own folder
    assert len(list((images / "dataset" / "images" / "train").iterdir())) == report["kept"]


def test_filter_rejects_by_rule(images, local_ray):
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


def test_ray_data_verdicts_equal_the_model_one_image_at_a_time(tmp_path, local_ray):
    """2 detector replicas on Ray Data, batches of 3; every rule on; the same model run here on
    each image alone gives the same verdicts, labels and COCO boxes."""
    folder = tmp_path / "gens"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / "images" / f"{i:06d}.png")
    (folder / "images" / "000007.png").write_bytes(b"not a png")  # named in the report, not fatal
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"images/{i:06d}.png", "prompt": f"street {i}",
                                                              "seed": 100 + i}) + "\n" for i in range(7)))  # fmt: skip
    # A random yolov8n finds nothing (its class biases start far below zero); with class 0's
    # bias at 0 it sees class 0 at confidence 0.5 in ~40 places an image, each image its own.
    model = load_detector("yolov8n.yaml")
    for branch in model.model.model[-1].cv3:
        branch[-1].bias.data[0] = 0.0
    weights = tmp_path / "detector.pt"
    model.save(str(weights))
    found = {p.name: _detections(model.predict(str(p), imgsz=128, conf=0.001, verbose=False)[0])
             for p in sorted((folder / "images").glob("0*.png"))[:7]}  # fmt: skip
    counts = sorted(len(ds) for ds in found.values())
    assert counts[0] > 0, "the detector must see something"
    shares = sorted(sum(touches_edge(d, 0.01) for d in ds) / len(ds) for ds in found.values())
    rules = FilterRules(min_confidence=0.25, class_min_confidence={"1": 0.9}, required_classes=["0"],
                        max_count=counts[len(counts) // 2], max_edge_share=shares[-2])  # fmt: skip
    config = FilterConfig(imgsz=128, rules=rules, replicas=2, batch_size=3, cpus_per_replica=0.5)
    report = run_filter(config, folder, str(weights))
    assert report["images"] == 8 and "000007.png" in report["errors"][0]
    saved = json.loads((folder / "filter_report.json").read_text())
    for name, detections in found.items():
        keep, why = decide(detections, rules)
        assert (saved["per_image"][name]["kept"], saved["per_image"][name]["reasons"]) == (keep, why), name
    assert 0 < report["kept"] < 7, "the rules must keep some images and reject others"
    coco = json.loads((folder / "coco_annotations.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == sorted(found)
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    for image in coco["images"]:
        lines = (folder / "labels" / image["file_name"].replace(".png", ".txt")).read_text().splitlines()
        assert per_image.get(image["id"], 0) == len(lines) and (image["width"], image["height"]) == (128, 96)
    gallery = (folder / "gallery" / "index.html").read_text()
    assert all(name in gallery for name in found) and "street 3" in gallery and "seed: 104" in gallery
    assert f"{report['kept']} kept" in gallery


def test_kept_dataset_trains_in_ultralytics_from_another_folder_after_a_move(images, tmp_path, local_ray, monkeypatch):
    import shutil

    from ultralytics import YOLO

    run_filter(FilterConfig(imgsz=128, rules=FilterRules(min_confidence=0.0)), images, "yolov8n.yaml")
    moved = tmp_path / "moved" / "dataset"
    shutil.copytree(images / "dataset", moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    results = YOLO("yolov8n.yaml").train(data=str(moved / "data.yaml"), epochs=1, imgsz=64, batch=2, workers=0,
                                         device="cpu", plots=False, project=str(tmp_path / "runs"), name="t",
                                         exist_ok=True, verbose=False)  # fmt: skip
    assert (tmp_path / "runs" / "t" / "weights" / "last.pt").is_file() and results is not None


def test_two_images_with_one_base_name_keep_their_own_labels(tmp_path, local_ray):
    """x.jpg and x.png would share labels/x.txt: the second (in name order) is left out, named."""
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(1)
    for name in ("x.jpg", "x.png", "y.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    report = run_filter(FilterConfig(imgsz=64, save_annotated=False), tmp_path, "yolov8n.yaml")
    assert report["images"] == 3 and report["rejection_reasons"]["same base name as another image"] == 1
    assert report["per_image"]["x.png"]["reasons"][0].startswith("same base name as x.jpg")
    assert sorted(p.name for p in (tmp_path / "labels").glob("[!.]*")) == ["x.txt", "y.txt"]
