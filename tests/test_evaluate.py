"""The evaluate stage end to end: real ultralytics training in parallel Ray tasks, validation on
one real set, the report, MLflow; and its bad input refused before anything trains.

The sets are drawn so that yolov8n, from scratch, learns something within 20 epochs at 64 px
(one large red or blue box per image): a report of all zeros would make "equals ultralytics'
own validation" an empty check."""

import json

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from diffplat.config import ConfigError, EvaluateConfig, parse_config
from diffplat.evaluate.stage import run_evaluate
from diffplat.runner import run_job

RED, BLUE = (230, 40, 40), (40, 40, 230)


def draw_set(root, n, seed, names, class_of, split="train"):
    """`n` 64x64 images, each one large box, red (car) or blue (pedestrian) in turn; labels in
    the set's own class ids (`class_of`: colour -> id)."""
    rng = np.random.default_rng(seed)
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i in range(n):
        pixels = np.full((64, 64, 3), 30, np.uint8) + rng.integers(0, 20, (64, 64, 3), dtype=np.uint8)
        w, h = rng.integers(24, 44, 2)
        x, y = rng.integers(0, 64 - w), rng.integers(0, 64 - h)
        colour = RED if i % 2 == 0 else BLUE
        pixels[y:y + h, x:x + w] = colour
        Image.fromarray(pixels).save(root / "images" / split / f"{i:03d}.png")
        (root / "labels" / split / f"{i:03d}.txt").write_text(f"{class_of[colour]} {(x + w / 2) / 64} {(y + h / 2) / 64} {w / 64} {h / 64}\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": f"images/{split}", "names": names}))
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """real (car, pedestrian), val (the same ids), kept (a detector's names and order: person, car)."""
    root = tmp_path_factory.mktemp("evaluate")
    draw_set(root / "real", 24, 0, ["car", "pedestrian"], {RED: 0, BLUE: 1})
    draw_set(root / "val", 12, 1, ["car", "pedestrian"], {RED: 0, BLUE: 1}, split="val")
    draw_set(root / "kept", 16, 2, {0: "person", 1: "car"}, {RED: 1, BLUE: 0})
    return root


DETECTOR = {"model": "yolov8n.yaml", "epochs": 20, "imgsz": 64, "batch": 8, "workers": 0, "device": "cpu",
            # from scratch on 24 images: no warm-up, a step per batch, boxes not shrunk by mosaic
            "train_args": {"warmup_epochs": 0, "nbs": 8, "mosaic": 0.0}}  # fmt: skip


def _job(root, **evaluate):
    section = {"real": str(root / "real"), "val": str(root / "val"), "synthetic": {"kept": str(root / "kept")},
               # two identical mixes: trained in two processes, they must give the same numbers
               "mixes": [{"name": "kept-a", "add": {"kept": 8}}, {"name": "kept-b", "add": {"kept": 8}}],
               "by": "count", "detector": DETECTOR, "output": "evaluation", **evaluate}  # fmt: skip
    return parse_config({"name": "eval", "ray": {"num_cpus": 2}, "evaluate": section})


@pytest.mark.slow
def test_variants_train_in_parallel_and_the_report_is_ultralytics_own_validation(sets, tmp_path, local_ray):
    from ultralytics import YOLO

    work = tmp_path / "work"
    result = run_job(_job(sets), work)
    out = work / "evaluation"
    report = json.loads((out / "report.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["real", "kept-a", "kept-b"] and report["failed"] == {}
    assert variants["real"]["train_images"] == {"real": 24}
    assert variants["kept-a"]["train_images"] == {"real": 24, "kept": 8}
    assert report["val"]["images"] == 12 and report["val"]["instances_per_class"] == {"car": 6, "pedestrian": 6}

    # A detector learnt something, so the comparisons below are not all of zeros.
    assert max(v["map50"] for v in variants.values()) > 0.1, report
    # Repeatable: the same mix and seed in another process give the same numbers.
    a, b = variants["kept-a"]["runs"][0], variants["kept-b"]["runs"][0]
    assert (a["map50"], a["map50_95"], a["per_class"]) == (b["map50"], b["map50_95"], b["per_class"])
    # Trained in parallel: two of the three ran at the same time, in different processes.
    runs = [v["runs"][0] for v in variants.values()]
    assert any(r["pid"] != s["pid"] and r["started"] < s["finished"] and s["started"] < r["finished"]
               for r in runs for s in runs)  # fmt: skip

    # Every number of the report is what ultralytics' own `val` says for those weights.
    for name, v in variants.items():
        run = v["runs"][0]
        data_yaml = out / "variants" / name / "seed-0" / "data" / "data.yaml"
        own = YOLO(run["weights"]).val(data=str(data_yaml), imgsz=64, batch=8, device="cpu", plots=False,
                                       project=str(tmp_path / "val"), name=name)  # fmt: skip
        assert v["map50"] == pytest.approx(own.box.map50, abs=1e-9)
        assert v["map50_95"] == pytest.approx(own.box.map, abs=1e-9)
        for row in own.summary():
            assert v["per_class"][row["Class"]]["map50"] == pytest.approx(row["mAP50"], abs=1e-5)
            assert v["per_class"][row["Class"]]["map50_95"] == pytest.approx(row["mAP50-95"], abs=1e-5)
        if name != "real":
            assert v["delta"]["map50"] == pytest.approx(v["map50"] - variants["real"]["map50"])

    # The validation images are never trained on; the synthetic labels were mapped to the real ids.
    mix_record = json.loads((out / "variants/kept-a/seed-0/data/mix.json").read_text())
    assert mix_record["synthetic"][0]["class_map"] == {"person": "pedestrian", "car": "car"}
    trained = {f["image"] for f in mix_record["files"]}
    assert not trained & {str(p) for p in (sets / "val/images/val").iterdir()}

    # The table, the chart, and MLflow: one nested run per variant, the chart as an artifact.
    text = (out / "report.txt").read_text()
    assert "kept-a" in text and "mAP50 per class" in text and "pedestrian" in text
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mlflow.set_tracking_uri(result.tracking_uri)
    children = mlflow.search_runs(experiment_names=["diffplat"], filter_string="tags.`diffplat.stage` = 'evaluate'",
                                  output_format="list")  # fmt: skip
    by_variant = {r.data.tags.get("diffplat.variant"): r for r in children}
    assert set(by_variant) == {None, "real", "kept-a", "kept-b"}
    assert by_variant["kept-a"].data.metrics["map50"] == pytest.approx(variants["kept-a"]["map50"])
    assert "delta_map50" in by_variant["kept-b"].data.metrics and "map50/car" in by_variant["real"].data.metrics
    stage_run = by_variant[None]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(stage_run.info.run_id)}
    assert {"comparison.png", "report.json", "report.txt"} <= artifacts

    # A rerun trains nothing: every variant is unchanged, its result reused.
    before = {n: v["runs"][0]["finished"] for n, v in variants.items()}
    run_job(_job(sets), work)
    again = {v["name"]: v["runs"][0]["finished"] for v in json.loads((out / "report.json").read_text())["variants"]}
    assert again == before


def _evaluate(sets, **changes):
    data = {"real": str(sets / "real"), "val": str(sets / "val"), "synthetic": {"kept": str(sets / "kept")},
            "mixes": [{"name": "m", "add": {"kept": 4}}], "by": "count", "detector": DETECTOR, **changes}  # fmt: skip
    return EvaluateConfig.model_validate(data)


def test_class_names_that_do_not_match_are_refused_with_the_names(sets, tmp_path):
    other = draw_set(tmp_path / "dogs", 4, 3, ["dog", "car"], {RED: 1, BLUE: 0})
    config = _evaluate(sets, synthetic={"dogs": str(other)}, mixes=[{"name": "m", "add": {"dogs": 2}}])
    with pytest.raises(ValueError, match=r"dogs: classes \['dog'\] have no match by name in real.*'pedestrian'"):
        run_evaluate(config, lambda p: tmp_path / p)
    assert not (tmp_path / "evaluation/variants").exists()


def test_an_empty_set_is_named(sets, tmp_path):
    empty = tmp_path / "empty"
    (empty / "images/train").mkdir(parents=True)
    (empty / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": ["car"]}))
    with pytest.raises(ValueError, match=r"kept: no images in .*empty"):
        run_evaluate(_evaluate(sets, synthetic={"kept": str(empty)}), lambda p: tmp_path / p)


def test_a_validation_set_with_other_class_ids_is_refused(sets, tmp_path):
    flipped = draw_set(tmp_path / "val2", 4, 4, ["pedestrian", "car"], {RED: 1, BLUE: 0})
    with pytest.raises(ValueError, match=r"evaluate.val: its class ids \['pedestrian', 'car'\] are not the real set's"):
        run_evaluate(_evaluate(sets, val=str(flipped)), lambda p: tmp_path / p)


def test_unknown_train_args_are_named(sets, tmp_path):
    config = _evaluate(sets, detector={**DETECTOR, "train_args": {"lr0": 0.01, "mosiac": 0.0}})
    with pytest.raises(ValueError, match=r"train_args: \['mosiac'\] are not ultralytics train arguments"):
        run_evaluate(config, lambda p: tmp_path / p)


@pytest.mark.parametrize("change, message", [
    ({"mixes": [{"name": "m", "add": {"nope": 1}}]}, r"adds \['nope'\], not among synthetic: \['kept'\]"),
    ({"mixes": [{"name": "real", "add": {"kept": 1}}]}, "names must be unique .* and not 'real'"),
    ({"by": "count", "mixes": [{"name": "m", "add": {"kept": 0.5}}]}, "whole numbers of images"),
    ({"seeds": [1, 1]}, "each seed once"),
    ({"detector": {"train_args": {"epochs": 3}}}, r"\['epochs'\] are set by the stage"),
    ({"mixes": []}, "evaluate.mixes"),
])  # fmt: skip
def test_config_errors_name_the_field(change, message):
    data = {"name": "e", "evaluate": {"real": "r", "val": "v", "synthetic": {"kept": "k"},
                                      "mixes": [{"name": "m", "add": {"kept": 1}}], **change}}  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_a_bdd_split_becomes_a_yolo_set(bdd_dir, tmp_path):
    from diffplat.data.bdd_exports import bdd_split_to_yolo
    from diffplat.evaluate.mixing import YoloSet

    labels = sorted((bdd_dir / "labels").glob("*.json"))
    made = bdd_split_to_yolo(bdd_dir / "images", labels, tmp_path / "val", "val")
    data = YoloSet.load(tmp_path / "val")
    samples = data.samples("val")
    # every image with a label record (both formats), boxes or not; the corrupt file and the
    # mask-only images (no record) left out and counted
    records = sum(len(json.loads(p.read_text())) for p in labels)
    assert made["images"] == len(samples) == records
    assert made["no_label_record"] + len(made["unreadable"]) == len(list((bdd_dir / "images").iterdir())) - records
    assert data.names[2] == "car" and all(s.label is not None for s in samples)


def test_shipped_evaluate_jobs_name_real_ultralytics_arguments():
    from test_config import SHIPPED

    from diffplat.config import load_config
    from diffplat.evaluate.stage import check_train_args

    configs = [c for c in map(load_config, SHIPPED) if c.evaluate]
    assert {c.name for c in configs} >= {"demo", "bdd-evaluate"}
    for config in configs:
        check_train_args(config.evaluate)


def _run(seed, map50, per_class=None):
    per_class = per_class or {"car": {"map50": map50, "map50_95": map50 / 2, "instances": 3}}
    return {"seed": seed, "map50": map50, "map50_95": map50 / 2, "precision": 0.5, "recall": 0.5, "per_class": per_class}


def test_differences_pair_each_seed_with_the_same_seed_of_real_only():
    from diffplat.evaluate.report import build_report, table

    report = build_report([
        {"name": "real", "train_images": {"real": 10}, "runs": [_run(0, 0.2), _run(1, 0.6)]},
        # seed 0 failed for the mix: its difference is against real's seed 1 only, not real's mean
        {"name": "real+kept", "train_images": {"real": 10, "kept": 5}, "runs": [_run(1, 0.7)]},
    ], {"images": 4}, {})  # fmt: skip
    real, mixed = report["variants"]
    assert real["map50"] == pytest.approx(0.4) and real["map50_std"] == pytest.approx(0.2828, abs=1e-4)
    assert mixed["delta"]["map50"] == pytest.approx(0.1) and mixed["delta"]["per_class"]["car"]["map50"] == pytest.approx(0.1)
    assert "+0.100" in table(report) and "std over seeds" in table(report)


def test_a_changed_label_or_validation_set_is_a_new_key(tmp_path):
    from diffplat.evaluate.mixing import list_samples
    from diffplat.evaluate.stage import _fingerprint, _key

    root = draw_set(tmp_path / "s", 4, 0, ["car", "pedestrian"], {RED: 0, BLUE: 1})
    train = root / "images/train"
    detector = {"model": "yolov8n.yaml"}
    first = _key(train, "val-1", detector, 0)
    assert _key(train, "val-1", detector, 0) == first
    assert _key(train, "val-2", detector, 0) != first and _key(train, "val-1", detector, 1) != first
    label = root / "labels/train/000.txt"
    label.write_text(label.read_text().replace("0 ", "1 ", 1))
    assert _key(train, "val-1", detector, 0) != first
    assert _fingerprint(list_samples([train], "s")) == _fingerprint(list_samples([train], "s"))


@pytest.mark.parametrize("evaluate, message", [
    ({"synthetic": {"kept+25": "k"}}, "synthetic.kept\\+25"),
    ({"mixes": [{"name": "a+b", "add": {"kept": 1}}, {"name": "a_b", "add": {"kept": 2}}]}, "with \\+ read as _"),
])  # fmt: skip
def test_names_that_mlflow_would_refuse_or_merge_are_refused(evaluate, message):
    data = {"real": "r", "val": "v", "synthetic": {"kept": "k"}, "mixes": [{"name": "m", "add": {"kept": 1}}], **evaluate}
    with pytest.raises(ConfigError, match=message):
        parse_config({"name": "e", "evaluate": data})
