"""Source 2's inference YAML and source 5's generation flags, run as they are written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import make_lora

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SOURCE2_YAML = """\
paths:
  base_model_path: "{base}"
  lora_weights_path: "runs/integration_test_sdxl_lora_train/checkpoint-2"   # an output_dir or a checkpoint-N folder
  pretrained_vae_model_name_or_path: "{base}/vae"
  infer_path: "inference_outputs"
prompt: "High resolution, 4k Traffic scene. Pedestrians walking."
negative_prompt: "blurry, low quality, distortion"
adapter_scale: 0.8
resolution:
  width: 1280
  height: 720
num_generations: 5
guidance_scale: 7.5
"""


def _diffplat(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "diffplat", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=800)  # fmt: skip


def test_source2_infer_config_as_written(tmp_path, tiny_sdxl, monkeypatch):
    make_lora(tiny_sdxl, tmp_path / "runs" / "integration_test_sdxl_lora_train" / "checkpoint-2")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "lora_infer.yaml").write_text(SOURCE2_YAML.format(base=tiny_sdxl))
    # The YAML as written; on 2 CPU cores, 2 steps instead of the pipeline's 50 (a field it has no key for)
    fast = ("--set", "generate.num_inference_steps=2")
    proc = _diffplat(tmp_path, "infer", "--infer_config", "config/lora_infer.yaml", *fast)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = tmp_path / "inference_outputs" / "batch_001"
    records = [json.loads(line) for line in (batch / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 5 and len(list((batch / "images").glob("*.png"))) == 5
    first = records[0]
    assert first["prompt"] == "High resolution, 4k Traffic scene. Pedestrians walking."
    assert (first["width"], first["height"], first["guidance_scale"], first["adapter_scale"]) == (1280, 720, 7.5, 0.8)
    assert first["negative_prompt"] == "blurry, low quality, distortion" and first["steps"] == 2
    assert first["adapter"].endswith("checkpoint-2")
    # a second run is the next generation batch (the job it would run, built here: the run itself is the one above)
    from diffplat.infer.commands import infer_config_job

    monkeypatch.chdir(tmp_path)  # source 2's paths are relative to where its command runs
    again = infer_config_job(tmp_path / "config" / "lora_infer.yaml", ["generate.num_inference_steps=2"])
    assert again.generate.output == str((tmp_path / "inference_outputs" / "batch_002").resolve())


def test_source2_infer_config_with_a_key_it_does_not_have_is_refused_by_name(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"paths": {"base_model_path": "m", "infer_path": "o"},
                                                       "prompt": "p", "num_images": 3}))  # fmt: skip
    proc = _diffplat(tmp_path, "infer", "--infer_config", "bad.yaml")
    assert proc.returncode == 2 and "num_images" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_source5_generation_flags(tmp_path, tiny_sdxl, monkeypatch, capsys):
    make_lora(tiny_sdxl, tmp_path / "lora")
    (tmp_path / "prompts.txt").write_text("a car at night\na bus in rain\n")
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    proc = _diffplat(tmp_path, "generate", "--base-model", str(tiny_sdxl), "--lora-checkpoint", str(lora_file),
                     "--prompt-file", "prompts.txt", "--num-images", "2", "--batch-size", "2", "--image-size", "64",
                     "--output-dir", "out", "--num-gpus", "1", "--output-format", "simple", "--scheduler", "ddim",
                     "--num-inference-steps", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert names == ["a_bus_in_rain_2.png", "a_bus_in_rain_3.png", "a_car_at_night_0.png", "a_car_at_night_1.png"]
    (tmp_path / "model.pt").write_bytes(b"pickle")
    # refused before anything starts (in this process: the command's own code path, without a second start-up)
    from diffplat.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--base-model", str(tiny_sdxl), "--lora-checkpoint", "model.pt", "--prompt", "x"]) == 2
    refused = capsys.readouterr().err
    assert "a pickled LoRA (.pt) is refused" in refused and "save_file" in refused


def test_source2_defaults_are_the_pipeline_s(tmp_path, monkeypatch):
    from diffplat.infer.commands import infer_config_job

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(SOURCE2_YAML.format(base="stabilityai/stable-diffusion-xl-base-1.0"))
    g = infer_config_job("c.yaml").generate
    assert g.num_inference_steps == 50 and g.vae == "stabilityai/stable-diffusion-xl-base-1.0/vae"
    assert g.resolution == (1280, 720) and g.num_generations == 5 and g.output == str(tmp_path / "inference_outputs" / "batch_001")
