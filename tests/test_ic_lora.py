"""In-Context LoRA end to end: composites -> Ray Train (2 workers, both modes) -> panel filling,
in bulk on Ray Data and through `diffplat ic-lora-infer` with source 1's flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from diffplat.config import parse_config
from diffplat.data.composites import Layout, make_composite
from diffplat.runner import run_job
from helpers import make_lora


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]


def _bdd(bdd_dir: Path) -> dict:
    return {"images": str(bdd_dir / "images"), "labels": [str(p) for p in sorted((bdd_dir / "labels").glob("*.json"))]}


def _lora_b(folder: Path) -> list:
    weights = load_file(folder / "pytorch_lora_weights.safetensors")
    return [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]


def test_composite_mode_trains_a_plain_lora(tmp_path, tiny_sdxl, bdd_dir, local_ray):
    config = parse_config({
        "name": "ic-composite-test",
        "prepare": {"source": "composites", "output": "data", "composites": {
            "groups": "consecutive", "images": str(bdd_dir / "images"), "layout": "1x3", "panel_size": [32, 32]}},
        "train": {
            "kind": "ic_lora", "base_model": str(tiny_sdxl), "data": "data/shards", "resolution": [96, 32],
            "ic_lora": {"mode": "composite"}, "lora": {"rank": 4, "alpha": 4}, "max_train_steps": 2,
            "train_batch_size": 1, "learning_rate": 1e-3, "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        },
    })  # fmt: skip
    # the synthetic images carry no .txt captions: give every one a caption first
    images = tmp_path / "panels"
    images.mkdir()
    for n, path in enumerate(sorted((bdd_dir / "images").glob("synth-0*.jpg"))[:9]):
        (images / path.name).write_bytes(path.read_bytes())
        (images / f"{path.stem}.txt").write_text(f"frame {n}\n")
    config = config.model_copy(update={"prepare": config.prepare.model_copy(update={
        "composites": config.prepare.composites.model_copy(update={"images": str(images)})})})  # fmt: skip
    run_job(config, tmp_path)
    adapter = tmp_path / "adapters" / "lora"
    assert any(v.abs().max() > 0 for v in _lora_b(adapter))
    info = json.loads((adapter / "adapter_info.json").read_text())
    assert info["ic_lora"]["mode"] == "composite" and info["inpainting_unet"] is False


def test_resolution_that_splits_a_panel_is_refused_before_training(tmp_path, tiny_sdxl_inpaint, local_ray):
    from diffplat.config import ConfigError

    folder = tmp_path / "existing"
    folder.mkdir()
    make_composite([Image.new("RGB", (8, 8), c) for c in COLOURS], Layout(2, 2), (32, 32)).save(folder / "a.png")
    (folder / "a.txt").write_text("[SCENE-1] a [SCENE-2] b [SCENE-3] c [SCENE-4] d\n")
    config = parse_config({
        "name": "bad-res",
        "prepare": {"source": "composites", "composites": {"groups": "existing", "images": str(folder)}},
        "train": {"kind": "ic_lora", "base_model": str(tiny_sdxl_inpaint), "data": "data/shards",
                  "resolution": [72, 64], "max_train_steps": 1},
    })  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.resolution \[72, 64\]: a 72x64 composite does not divide into layout 2x2"):
        run_job(config, tmp_path)
    assert not (tmp_path / "adapters").exists()


# --- `diffplat ic-lora-infer`: source 1's command line ---------------------------------------------


@pytest.fixture(scope="module")
def source1_folder(tmp_path_factory, tiny_sdxl_inpaint):
    """A folder laid out as source 1's users have it: ./output/lora_model/final_model and input.png."""
    folder = tmp_path_factory.mktemp("source1")
    make_lora(tiny_sdxl_inpaint, folder / "output" / "lora_model" / "final_model",
              info={"base_model": str(tiny_sdxl_inpaint)})  # fmt: skip
    make_composite([Image.new("RGB", (8, 8), c) for c in COLOURS], Layout(2, 2), (64, 64)).save(folder / "input.png")
    return folder


def _infer(folder: Path, *flags: str):
    return subprocess.run([sys.executable, "-m", "diffplat", "ic-lora-infer", *flags], cwd=folder, capture_output=True,
                          text=True, timeout=300, env=os.environ.copy())  # fmt: skip


def test_source_1_example_command_runs_as_written(source1_folder):
    # The README example of source 1, only the prompt's "..." filled in.
    proc = _infer(source1_folder, "--lora_path", "./output/lora_model/final_model", "--input_image", "input.png",
                  "--prompt", "four panels of one street", "--panels_to_inpaint", "2", "3", "--num_images", "3",
                  "--save_comparison", "--seed", "42")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = source1_folder / "inference_output"
    original = np.asarray(Image.open(source1_folder / "input.png"), dtype=np.int16)
    outputs = [np.asarray(Image.open(out / f"input_output_{i}.png"), dtype=np.int16) for i in range(3)]
    for image in outputs:
        assert np.array_equal(image[:64], original[:64])  # panels 0 and 1: pixel for pixel
        assert np.abs(image[64:] - original[64:]).mean() > 5  # panels 2 and 3: painted anew
    assert np.abs(outputs[0][64:] - outputs[1][64:]).max() > 0  # seeds 42, 43, 44 differ
    for i in range(3):
        with Image.open(out / f"input_comparison_{i}.png") as comparison:
            assert comparison.size == (3 * 128 + 2 * 8, 128)
            strip = np.asarray(comparison.convert("RGB"), dtype=np.int16)
            assert np.array_equal(strip[:, :128], original)  # input
            assert (strip[:64, 136:264] == 0).all() and (strip[64:, 136:264] == 255).all()  # the mask
            assert np.array_equal(strip[:, 272:], outputs[i])  # output
    meta = [json.loads(l) for l in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in meta] == [42, 43, 44] and meta[0]["panels"] == [2, 3]


def test_gradient_mask_blends_only_inside_filled_panels(source1_folder, tmp_path):
    proc = _infer(source1_folder, "--lora_path", "./output/lora_model/final_model", "--input_image", "input.png",
                  "--prompt", "x", "--panels_to_inpaint", "3", "--use_gradient_mask", "--gradient_width", "16",
                  "--num_inference_steps", "3", "--seed", "1", "--output_dir", str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    mask = np.asarray(Image.open(tmp_path / "input_mask.png"))
    assert (mask[:64] == 0).all() and (mask[:, :64] == 0).all()
    assert 0 < mask[64, 100] < 64 and mask[100, 100] == 255  # the ramp starts at the seam


@pytest.mark.parametrize("changes, message", [
    ({"--panels_to_inpaint": ["2", "4"]}, "--panels_to_inpaint 2 4: panel 4 is outside layout 2x2"),
    ({"--layout": ["1x3"]}, "input.png: a 128x128 composite does not divide into layout 1x3"),
    ({"--lora_path": ["weights.pt"]}, "weights.pt: a pickled LoRA (.pt) is refused"),
    ({"--input_image": ["missing.png"]}, "--input_image missing.png: cannot read the image"),
])  # fmt: skip
def test_bad_input_is_named_and_nothing_is_written(source1_folder, tmp_path, changes, message):
    flags = {"--lora_path": ["./output/lora_model/final_model"], "--input_image": ["input.png"], "--prompt": ["x"],
             "--output_dir": [str(tmp_path / "out")], **changes}  # fmt: skip
    proc = _infer(source1_folder, *[a for flag, values in flags.items() for a in (flag, *values)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
