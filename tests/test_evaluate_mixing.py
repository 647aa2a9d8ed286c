"""The evaluate stage's training sets: real images plus seeded synthetic ones, as YOLO datasets.

Small YOLO datasets are drawn with PIL in tmp_path (every image a different colour, so no two
files have the same content unless a test makes them so); no Ray, no training."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from PIL import Image

from diffplat.data.bdd import DETECTION_CLASSES
from diffplat.evaluate.mixing import YoloSet, class_map, mix, rewrite_labels

CAR_AND_PERSON = "0 0.500000 0.500000 0.200000 0.100000\n1 0.250000 0.250000 0.100000 0.300000\n"
_colours = iter(range(1, 1 << 24))  # a new colour for every image drawn in this module


def make_set(root: Path, names, n: int, *, split: str = "train", label=CAR_AND_PERSON, unlabelled=(),
             val: str | None = None) -> Path:  # fmt: skip
    """A YOLO dataset like the filter stage writes: images/<split>, labels/<split>, data.yaml
    (no `path:`); `unlabelled` image numbers get no label file."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour = next(_colours)
        Image.new("RGB", (16, 16), (colour >> 16, (colour >> 8) & 255, colour & 255)).save(root / "images" / split / f"{i:06d}.png")
        if i not in unlabelled:
            (root / "labels" / split / f"{i:06d}.txt").write_text(label)
    data = {"train": f"images/{split}", "val": val or f"images/{split}", "names": names}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root


@pytest.fixture
def real(tmp_path) -> YoloSet:
    """BDD's 10 classes as a list; 10 training images (one without labels), 4 validation images."""
    root = make_set(tmp_path / "real", list(DETECTION_CLASSES), 10, label="2 0.5 0.5 0.2 0.2\n", unlabelled={3},
                    val="images/val")  # fmt: skip
    make_set(tmp_path / "real_val_only", list(DETECTION_CLASSES), 4, split="val")
    shutil.move(tmp_path / "real_val_only/images/val", root / "images/val")
    shutil.move(tmp_path / "real_val_only/labels/val", root / "labels/val")
    return YoloSet.load(root)


@pytest.fixture
def gen_a(tmp_path) -> YoloSet:
    """A filtered generation (detector names car, person); 12 images, one without labels."""
    return YoloSet.load(make_set(tmp_path / "gen_a" / "dataset", {0: "car", 1: "person"}, 12, unlabelled={5}), name="gen_a")


@pytest.fixture
def gen_b(tmp_path) -> YoloSet:
    """BDD's 2018 names; the same file names (000000.png, ...) as gen_a."""
    return YoloSet.load(make_set(tmp_path / "gen_b", ["bike", "motor"], 8))


def _record(mixed) -> dict:
    return json.loads((mixed.folder / "mix.json").read_text())


def _picked(mixed, source: str) -> list[str]:
    return [f["image"] for f in _record(mixed)["files"] if f["source"] == source]


def test_ratio_counts_and_layout(tmp_path, real, gen_a):
    mixed = mix(real, [(gen_a, 0.5)], tmp_path / "mixes" / "half", seed=0)
    images = sorted(p.name for p in (mixed.folder / "images/train").iterdir())
    labels = sorted(p.name for p in (mixed.folder / "labels/train").iterdir())
    assert mixed.images == {"real": 10, "gen_a": 5} and len(images) == 15  # 0.5 x 10 real images
    assert len(labels) == 15 - 1 - _picked(mixed, "gen_a").count(str(gen_a.splits["train"][0] / "000005.png"))
    assert sum(n.startswith("real__") for n in images) == 10 and sum(n.startswith("gen_a__") for n in images) == 5
    record = _record(mixed)
    assert len({f["image"] for f in record["files"]}) == len(record["files"]) == 15  # no file twice
    assert len({f["to_image"] for f in record["files"]}) == 15
    assert all(os.path.samefile(f["image"], mixed.folder / f["to_image"]) for f in record["files"])  # hard links here
    assert next(f for f in record["files"] if f["image"].endswith("real/images/train/000003.png"))["to_label"] is None
    data = yaml.safe_load(mixed.data_yaml.read_text())
    assert "path" not in data and data["train"] == "images/train"
    assert data["val"] == str(real.splits["val"][0]) and Path(data["val"]).is_absolute()
    assert data["names"] == dict(enumerate(DETECTION_CLASSES))
    assert record["synthetic"][0]["asked"] == 5 and record["synthetic"][0]["holds"] == 12
    assert mix(real, [(gen_a, 0.25)], tmp_path / "mixes" / "quarter", seed=0).images["gen_a"] == 3  # 2.5: halves up


def test_count_two_sets_same_file_names(tmp_path, real, gen_a, gen_b):
    mixed = mix(real, [(gen_a, 7), (gen_b, 8)], tmp_path / "mix", seed=3, by="count")
    assert mixed.images == {"real": 10, "gen_a": 7, "gen_b": 8}
    names = [p.name for p in (mixed.folder / "images/train").iterdir()]
    assert len(names) == 25
    in_a, in_b = ({n.split("__", 1)[1] for n in names if n.startswith(f"{s}__")} for s in ("gen_a", "gen_b"))
    assert len(in_b) == 8 and in_a & in_b  # the same file names from both sets, side by side
    assert mix(real, [], tmp_path / "baseline", seed=3).images == {"real": 10}  # the real-only variant


def test_labels_rewritten_to_real_ids_by_name(tmp_path, real, gen_a, gen_b):
    assert class_map(gen_a, real) == {0: 2, 1: 0}  # car -> car, person -> pedestrian
    assert class_map(gen_b, real) == {0: 7, 1: 6}  # bike -> bicycle, motor -> motorcycle
    mixed = mix(real, [(gen_a, 12), (gen_b, 8)], tmp_path / "mix", seed=0, by="count")
    for f in _record(mixed)["files"]:
        if f["to_label"] is None:
            continue
        text = (mixed.folder / f["to_label"]).read_text()
        if f["source"] == "gen_a":
            assert text == "2 0.500000 0.500000 0.200000 0.100000\n0 0.250000 0.250000 0.100000 0.300000\n"
        elif f["source"] == "gen_b":
            assert text == "7 0.500000 0.500000 0.200000 0.100000\n6 0.250000 0.250000 0.100000 0.300000\n"
        else:
            assert text == "2 0.5 0.5 0.2 0.2\n"  # the real set's own labels, as they are
    assert (gen_a.splits["train"][0].parent.parent / "labels/train/000000.txt").read_text() == CAR_AND_PERSON  # source untouched
    assert mixed.dropped_boxes == {"gen_a": 0, "gen_b": 0}
    assert rewrite_labels("1 0.1 0.2 0.3 0.4\n\n0.0 0.5 0.5 0.1 0.1\n", {0: 2, 1: None}, "x") == ("2 0.5 0.5 0.1 0.1\n", 1)


def test_unmappable_names_are_listed_or_dropped(tmp_path, real):
    pets = YoloSet.load(make_set(tmp_path / "pets", {0: "car", 1: "dog"}, 4))
    with pytest.raises(ValueError) as err:
        mix(real, [(pets, 2)], tmp_path / "mix", seed=0, by="count")
    message = str(err.value)
    assert "pets: classes ['dog'] have no match" in message
    assert "pets names: ['car', 'dog']" in message and "'pedestrian'" in message and "'traffic sign'" in message
    assert not (tmp_path / "mix").exists()
    mixed = mix(real, [(pets, 2)], tmp_path / "mix", seed=0, by="count", drop_unmapped=True)
    assert mixed.dropped_boxes == {"pets": 2}  # one dog box in each of the 2 images
    entry = _record(mixed)["synthetic"][0]
    assert entry["dropped_boxes"] == 2 and entry["class_map"] == {"car": "car", "dog": None}
    assert "pedestrian" in entry["real_classes_it_does_not_name"]
    pets_labels = [f["to_label"] for f in _record(mixed)["files"] if f["source"] == "pets"]
    assert [(mixed.folder / p).read_text() for p in pets_labels] == ["2 0.500000 0.500000 0.200000 0.100000\n"] * 2


def test_errors_name_the_set_and_the_reason(tmp_path, real, gen_a):
    empty = make_set(tmp_path / "empty", ["car"], 0)
    with pytest.raises(ValueError, match=r"^empty: no images in .*empty/images/train$"):
        mix(real, [(YoloSet.load(empty), 0.5)], tmp_path / "mix", seed=0)
    with pytest.raises(FileNotFoundError, match=r"nowhere: no data.yaml at .*nowhere/data.yaml"):
        YoloSet.load(tmp_path / "nowhere")
    broken = make_set(tmp_path / "broken", ["car"], 1)
    shutil.rmtree(broken / "images")
    with pytest.raises(FileNotFoundError, match=r"broken: train folder .*broken/images/train \(from .*data.yaml\) does not exist"):
        YoloSet.load(broken)
    with pytest.raises(ValueError, match=r"gen_a: 13 images asked for \(count 13\), it holds 12"):
        mix(real, [(gen_a, 13)], tmp_path / "mix", seed=0, by="count")
    with pytest.raises(ValueError, match=r"gen_a: 20 images asked for \(ratio 2 x 10 real images\), it holds 12"):
        mix(real, [(gen_a, 2)], tmp_path / "mix", seed=0)
    with pytest.raises(ValueError, match="more than one set is named"):
        mix(real, [(gen_a, 1), (gen_a, 1)], tmp_path / "mix", seed=0, by="count")
    with pytest.raises(ValueError, match=r"the output folder .* holds .*/real, which writing it would remove"):
        mix(real, [], tmp_path, seed=0)
    with pytest.raises(ValueError, match=r"the output folder .* is inside image folder .*gen_a/dataset/images/train"):
        mix(real, [(gen_a, 1)], gen_a.splits["train"][0] / "mix", seed=0, by="count")
    with pytest.raises(ValueError, match="by must be 'ratio' or 'count'"):
        mix(real, [(gen_a, 1)], tmp_path / "mix", seed=0, by="share")
    assert not (tmp_path / "mix").exists()


def test_validation_images_never_train(tmp_path, real, gen_a):
    # a real validation picture smuggled into the synthetic set under another name
    shutil.copy2(real.splits["val"][0] / "000002.png", gen_a.splits["train"][0] / "zz_smuggled.png")
    gen_a = YoloSet.load(gen_a.data_yaml, name="gen_a")
    with pytest.raises(ValueError, match=r"gen_a: .*zz_smuggled.png is the same picture as real validation image .*images/val/000002.png"):
        mix(real, [(gen_a, 13)], tmp_path / "mix", seed=0, by="count")
    assert not (tmp_path / "mix").exists()
    # the real set's own val: images/train (as the filter and BDD exports write it)
    same = make_set(tmp_path / "same", ["car"], 3)
    with pytest.raises(ValueError, match=r"same: validation folder .*same/images/train is also its training folder"):
        mix(YoloSet.load(same), [], tmp_path / "mix", seed=0)
    ok = mix(YoloSet.load(same), [], tmp_path / "mix", seed=0, val=real.splits["val"][0])  # a separate val folder
    assert yaml.safe_load(ok.data_yaml.read_text())["val"] == str(real.splits["val"][0])


def test_same_seed_same_selection(tmp_path, real, gen_a):
    first = _picked(mix(real, [(gen_a, 0.5)], tmp_path / "m1", seed=7), "gen_a")
    again = _picked(mix(real, [(gen_a, 0.5)], tmp_path / "m2", seed=7), "gen_a")
    other = _picked(mix(real, [(gen_a, 0.5)], tmp_path / "m3", seed=8), "gen_a")
    more = _picked(mix(real, [(gen_a, 0.8)], tmp_path / "m4", seed=7), "gen_a")
    assert first == again
    assert set(first) != set(other)  # 792 ways to pick 5 of 12: a different seed picks differently
    assert set(first) < set(more)  # a larger share keeps the smaller one's images


def test_failed_mix_leaves_the_previous_one(tmp_path, real, gen_a):
    good = mix(real, [(gen_a, 3)], tmp_path / "mix", seed=0, by="count")
    before = _record(good)
    bad_labels = YoloSet.load(make_set(tmp_path / "bad", ["car"], 2, label="5 0.5 0.5 0.1 0.1\n"))
    with pytest.raises(ValueError, match=r"bad: .*bad/labels/train/00000[01].txt line 1: class '5' is not one of"):
        mix(real, [(bad_labels, 2)], tmp_path / "mix", seed=0, by="count")
    assert _record(good) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mix")] == []  # no temporary folder left


def test_path_key_and_names_dict(tmp_path, real):
    root = make_set(tmp_path / "elsewhere", {0: "Traffic_Light", 1: "car"}, 3)
    (tmp_path / "yamls").mkdir()
    data = {"path": str(root), "train": "images/train", "val": "images/train", "names": {0: "Traffic_Light", 1: "car"}}
    (tmp_path / "yamls/lights.yaml").write_text(yaml.safe_dump(data))
    lights = YoloSet.load(tmp_path / "yamls/lights.yaml")
    assert lights.name == "yamls" and lights.splits["train"] == (root.resolve() / "images/train",)
    assert len(lights.samples()) == 3 and class_map(lights, real) == {0: 8, 1: 2}


def test_ultralytics_accepts_the_mix(tmp_path, real, gen_a, gen_b):
    mixed = mix(real, [(gen_a, 5), (gen_b, 3)], tmp_path / "mix", seed=0, by="count")
    # In a child process, so ultralytics' settings live in tmp_path and this session keeps its own.
    # check_det_dataset downloads nothing for a dataset whose folders exist; its last step,
    # check_font, would fetch Arial.ttf (for plotting, not the dataset) when it is not in the config
    # folder, so that is stubbed out, and any other connection attempt fails the check.
    script = textwrap.dedent("""
        import json, socket, sys
        def refuse(self, address):
            raise OSError(f"ultralytics tried to reach {address}")
        socket.socket.connect = refuse
        import ultralytics.data.utils as du
        du.check_font = lambda *a, **k: None
        data = du.check_det_dataset(sys.argv[1])
        images = sorted(str(p) for p in __import__("pathlib").Path(data["train"]).iterdir())
        checked = [du.verify_image_label((im, lb, "", False, data["nc"], 0, 0, False))
                   for im, lb in zip(images, du.img2label_paths(images))]
        print(json.dumps({"train": data["train"], "val": data["val"], "nc": data["nc"], "names": data["names"],
                          "boxes": sum(len(c[1]) for c in checked), "missing": sum(c[5] for c in checked),
                          "corrupt": sum(c[8] for c in checked)}))
    """)
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "ultralytics_config"),
           "YOLO_VERBOSE": "False"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, str(mixed.data_yaml)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["train"] == str(mixed.folder / "images/train") and found["val"] == str(real.splits["val"][0])
    assert found["nc"] == 10 and found["names"] == {str(i): n for i, n in enumerate(DETECTION_CLASSES)}
    assert found["corrupt"] == 0
    record = _record(mixed)
    assert found["missing"] == sum(f["to_label"] is None for f in record["files"])
    assert found["boxes"] == sum(len((mixed.folder / f["to_label"]).read_text().splitlines())
                                 for f in record["files"] if f["to_label"])  # fmt: skip
