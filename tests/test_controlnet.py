"""ControlNet end to end: pairs in (folders, source 4's CSV, BDD), grey and colour masks, training
on Ray Train with 2 workers, the saved folder in stock diffusers, generation from maps."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffplat.config import PrepareConfig, parse_config
from diffplat.data import bdd
from diffplat.data.prepare import prepare
from diffplat.runner import run_job


ROAD, SKY, CAR = (bdd.SEG_CLASSES.index(c) for c in ("road", "sky", "car"))


def _mask(size=(32, 16), car=True) -> np.ndarray:
    width, height = size
    mask = np.full((height, width), ROAD, np.uint8)
    mask[: height // 2] = SKY
    if car:
        mask[height // 2 : height // 2 + 4, 4:12] = CAR
    mask[0, 0] = bdd.SEG_IGNORE
    return mask


# --- masks ------------------------------------------------------------------------------------


def test_grey_and_colour_masks_are_told_apart_and_read_as_the_same_ids(tmp_path):
    ids = _mask()
    Image.fromarray(ids).save(tmp_path / "grey.png")
    Image.fromarray(bdd.colorize_mask(ids)).save(tmp_path / "colour.png")
    Image.fromarray(np.stack([ids] * 3, -1)).save(tmp_path / "grey_as_rgb.png")
    for name in ("grey.png", "colour.png", "grey_as_rgb.png"):
        assert np.array_equal(bdd.read_mask(tmp_path / name), ids), name


def test_bad_masks_are_named():
    with pytest.raises(bdd.MaskError, match=r"m.png: mask has ids outside 0-18 and 255 \(19, 40\)"):
        bdd.mask_to_ids(np.array([[0, 19], [40, 255]], np.uint8), "m.png")
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (1, 2, 3)
    with pytest.raises(bdd.MaskError, match=r"c.png: colour map has colours outside the BDD palette \(1: #010203\)"):
        bdd.mask_to_ids(colour, "c.png")


# --- a new ControlNet's conditioning embedding ---------------------------------------------------


def test_kaiming_conditioning_init_carries_the_map_and_still_starts_as_a_no_op():
    """Under torch's default init two different maps reach the conditioning embedding's last
    convolution nearly alike (the demo's measure: 1000x closer than the maps); under kaiming they
    stay apart. Either way the last convolution is zero: the ControlNet adds nothing at first."""
    import torch

    from diffplat.models.families.sdxl import SDXL
    from diffplat.models.tiny import tiny_unet

    unet = tiny_unet()
    maps = torch.stack([torch.tensor(bdd.colorize_mask(_mask((64, 32), car=car))).permute(2, 0, 1) / 255.0
                        for car in (True, False)])  # fmt: skip
    map_gap = float((maps[0] - maps[1]).abs().mean() / maps.abs().mean())  # relative, as the features'

    def feature_gap(init: str):
        torch.manual_seed(0)
        net = SDXL().new_controlnet(unet, None, conditioning_init=init)
        embedding = net.controlnet_cond_embedding
        assert not embedding.conv_out.weight.any() and not embedding.conv_out.bias.any()
        assert all(not block.weight.any() for block in net.controlnet_down_blocks)  # zero convolutions
        with torch.no_grad():
            x = torch.nn.functional.silu(embedding.conv_in(maps))
            for conv in embedding.blocks:
                x = torch.nn.functional.silu(conv(x))
        return float((x[0] - x[1]).abs().mean() / x.abs().mean())

    default, kaiming = feature_gap("default"), feature_gap("kaiming")
    assert default < map_gap / 10 < kaiming / 10  # measured: 0.0003, 0.01 and 0.07


# --- pairs in ---------------------------------------------------------------------------------


@pytest.fixture()
def pair_folders(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    images.mkdir()
    maps.mkdir()
    for i in range(5):
        Image.new("RGB", (32, 16), (10 * i, 100, 200)).save(images / f"f{i}.jpg")
        (images / f"f{i}.txt").write_text(f"frame {i}\n")
    Image.fromarray(_mask()).save(maps / "f0_train_id.png")  # BDD's name for a grey mask
    Image.fromarray(bdd.colorize_mask(_mask(car=False))).save(maps / "f1.png")  # a colour map
    Image.fromarray(_mask((64, 32))).save(maps / "f2.png")  # another size than its image
    Image.fromarray(np.full((16, 32), 77, np.uint8)).save(maps / "f3.png")  # ids outside 0-18
    # f4 has no map; this map has no image
    Image.fromarray(_mask()).save(maps / "orphan.png")
    return tmp_path


def test_folders_pair_by_base_name_and_unpaired_files_are_named(pair_folders):
    config = PrepareConfig(source="pairs", output=str(pair_folders / "data"),
                           pairs={"images": str(pair_folders / "images"), "conditioning": str(pair_folders / "maps")})  # fmt: skip
    report = prepare(config, Path)
    assert report["rows_written"] == 2
    assert report["skipped"] == {"no conditioning image": 1, "conditioning image without an image": 1,
                                 "map size differs from image": 1, "mask has ids outside 0-18 and 255": 1}  # fmt: skip
    items = report["skipped_items"]
    assert "f4.jpg: no conditioning image" in items and "orphan.png: conditioning image without an image" in items
    assert "f2.png: map size differs from image (map 64x32, image 32x16)" in items
    assert "f3.png: mask has ids outside 0-18 and 255 (77)" in items
    rows = {r["id"]: r for r in pq.read_table(pair_folders / "data" / "shards").to_pylist()}
    assert set(rows) == {"f0", "f1"} and rows["f0"]["caption"] == "frame 0"
    # both forms are stored as the palette map
    for row_id, car in (("f0", True), ("f1", False)):
        stored = np.asarray(Image.open(__import__("io").BytesIO(rows[row_id]["conditioning"])))
        assert np.array_equal(stored, bdd.colorize_mask(_mask(car=car)))
    index = (pair_folders / "data" / "index_controlnet.jsonl").read_text().splitlines()
    assert [json.loads(l)["caption"] for l in index] == ["frame 0", "frame 1"]


def test_source_4_controlnet_csv(pair_folders):
    index = pair_folders / "bdd_hf_dataset_controlnet_train.csv"
    with open(index, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "conditioning_image", "text"])
        writer.writerow(["images/f0.jpg", "maps/f0_train_id.png", "a road under the sky"])
        writer.writerow(["images/f1.jpg", "maps/f1.png", ""])
        writer.writerow(["images/missing.jpg", "maps/f1.png", "x"])
    config = PrepareConfig(source="pairs", output=str(pair_folders / "data"), pairs={"csv": str(index)})
    report = prepare(config, Path)
    assert report["rows_written"] == 1 and report["source"] == "pairs:csv"
    assert report["skipped"] == {"missing caption": 1, "no image": 1}
    assert "bdd_hf_dataset_controlnet_train.csv line 4: no image (missing.jpg)" in report["skipped_items"]
    # column names of another export, given in the job file
    renamed = pair_folders / "other.csv"
    renamed.write_text("img,cond,caption\nimages/f0.jpg,maps/f0_train_id.png,hello\n")
    config = PrepareConfig(source="pairs", output=str(pair_folders / "data2"), pairs={
        "csv": str(renamed), "image_column": "img", "conditioning_column": "cond", "caption_column": "caption"})  # fmt: skip
    assert prepare(config, Path)["rows_written"] == 1
    with pytest.raises(ValueError, match="other.csv has no column 'image'"):
        prepare(PrepareConfig(source="pairs", output=str(pair_folders / "d3"), pairs={"csv": str(renamed)}), Path)


def test_bdd_colour_masks_and_bad_masks_in_prepare(bdd_dir, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    originals = sorted((bdd_dir / "masks").glob("*_train_id.png"))
    for path in originals:  # the same masks as colour maps
        Image.fromarray(bdd.colorize_mask(np.asarray(Image.open(path)))).save(masks / path.name)
    bad = np.asarray(Image.open(originals[0])).copy()
    bad[0, 0] = 99
    Image.fromarray(bad).save(masks / originals[0].name)
    config = PrepareConfig(output=str(tmp_path / "data"), bdd={
        "images": str(bdd_dir / "images"), "seg_masks": str(masks),
        "labels": [str(p) for p in sorted((bdd_dir / "labels").glob("*.json"))]})  # fmt: skip
    report = prepare(config, Path)
    assert report["skipped"]["bad mask"] == 1
    assert f"{originals[0].name}: bad mask (mask has ids outside 0-18 and 255 (99))" in report["skipped_items"]
    assert report["with_conditioning"] == len(originals) - 1
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "data" / "shards").to_pylist()}
    stem = originals[1].name.removesuffix("_train_id.png")
    stored = np.asarray(Image.open(__import__("io").BytesIO(rows[stem]["conditioning"])))
    assert np.array_equal(stored, bdd.colorize_mask(np.asarray(Image.open(originals[1]))))


# --- training and generation --------------------------------------------------------------------


# Training on 2 workers is the demo's ControlNet leg (demo_controlnet.yaml), tested in test_demo.py
# with the rest of what the demo writes; generation from maps runs here, on an untrained ControlNet.


@pytest.fixture(scope="module")
def from_maps(tmp_path_factory, tiny_sdxl, bdd_dir, local_ray):
    """generate from BDD masks (one bad map among them) with a ControlNet made from the base
    UNet, then the filter."""
    import shutil

    from diffusers import ControlNetModel, UNet2DConditionModel

    work = tmp_path_factory.mktemp("cn")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    ControlNetModel.from_unet(unet).save_pretrained(work / "controlnet", safe_serialization=True)
    labels = [str(p) for p in sorted((bdd_dir / "labels").glob("*.json"))]
    # the masks to generate from, and one bad map among them: it must be skipped, not end the run
    shutil.copytree(bdd_dir / "masks", work / "maps")
    Image.fromarray(np.full((144, 256), 77, np.uint8)).save(work / "maps" / "zzz-bad_train_id.png")
    config = parse_config({
        "name": "cn-test",
        "generate": {
            "kind": "controlnet", "base_model": str(tiny_sdxl), "prompts": ["a driving scene"],
            "controlnet": {"model": "controlnet", "maps": "maps", "bdd_labels": labels},
            "resolution": [64, 64], "num_inference_steps": 3, "seed": 5, "output": "from-maps",
        },
        "filter": {"images": "from-maps", "imgsz": 64},
    })  # fmt: skip
    return work, run_job(config, work)


def test_generation_from_maps_is_named_after_them_and_filtered(from_maps):
    work, result = from_maps
    out = work / "from-maps"
    meta = [json.loads(l) for l in (out / "metadata.jsonl").read_text().splitlines()]
    masks = sorted((work / "maps").glob("synth-*.png"))
    assert len(meta) == len(masks) == result.outputs["generate"]["images"]
    assert [m["file_name"] for m in meta] == [f"images/{p.name.removesuffix('_train_id.png')}.png" for p in masks]
    assert [m["map"] for m in meta] == [str(p) for p in masks]
    # prompts: from the frame's BDD labels; a mask-only frame (synth-00005) gets the job's prompt
    assert [m["prompt"] == "a driving scene" for m in meta[:3]] == [False, False, True]
    assert all(m["prompt"].startswith("a driving scene ") and ", with " in m["prompt"] for m in meta[:2])
    # the bad map was skipped, counted and named
    assert result.outputs["generate"]["skipped"] == 1
    assert "zzz-bad_train_id.png: mask has ids outside 0-18 and 255 (77)" in (out / "skipped.txt").read_text()
    assert (out / "comparisons" / Path(meta[0]["file_name"]).name).is_file()
    assert result.outputs["filter"]["images"] == len(masks)
