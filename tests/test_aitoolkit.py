"""ai-toolkit's job files run as diffplat jobs: the In-Context LoRA paper's `movie-shots.yml`,
as published (tests/data/movie-shots.yml), with only paths and sizes changed, trains a FLUX
LoRA on the tiny FLUX (2 workers, ZeRO-2) into ai-toolkit's output layout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffplat.aitoolkit import to_job
from diffplat.config import ConfigError, load_config

PAPER_FILE = Path(__file__).parent / "data" / "movie-shots.yml"


def test_the_papers_file_maps_key_for_key(tmp_path, caplog):
    data = yaml.safe_load(PAPER_FILE.read_text())
    assert data["config"]["process"][0]["train"]["lr"] == "1e-4"  # YAML 1.1 reads it as a string
    job, notes = to_job(data, PAPER_FILE, cwd=tmp_path)
    train = job["train"]
    assert train["learning_rate"] == 1e-4 and train["max_train_steps"] == 5000 and train["train_batch_size"] == 4
    assert (train["lora"]["rank"], train["lora"]["alpha"]) == (16, 16.0)
    assert (train["checkpointing_steps"], train["checkpoints_total_limit"]) == (250, 4)
    assert train["use_ema"] and train["ema_decay"] == 0.99 and train["mixed_precision"] == "bf16"
    assert train["gradient_checkpointing"] and train["proportion_empty_prompts"] == 0.05
    assert train["base_model"] == "black-forest-labs/FLUX.1-dev" and train["resume_from_checkpoint"] == "latest"
    assert train["output"] == str(tmp_path / "output" / "movie-shots")
    assert job["prepare"]["folder"]["images"] == str(tmp_path / "data" / "movie-shots")
    v = train["validation"]
    assert (v["every_n_steps"], v["num_inference_steps"], v["guidance_scale"], v["seed"]) == (250, 20, 3.5, 42)
    assert v["resolution"] == [1024, 1536] and len(v["prompts"]) == 2 and v["prompts"][0].startswith("[MOVIE-SHOTS]")
    assert v["before_training"]  # ai-toolkit samples the base first unless train.skip_first_sample
    data["config"]["process"][0]["train"]["skip_first_sample"] = True
    assert not to_job(data, PAPER_FILE, cwd=tmp_path)[0]["train"]["validation"]["before_training"]
    assert train["flow"] == {"guidance_scale": 1.0, "timestep_sampling": "sigmoid"}  # ai-toolkit's cfg_scale default
    assert train["ai_toolkit_layout"] == {"name": "movie-shots", "job_file": str(PAPER_FILE.resolve()), "dtype": "float16"}
    said = "\n".join(notes)
    for what in ("model.quantize", "adamw8bit", "resolution [512, 768, 1024, 1280, 1536]", "cache_latents_to_disk"):
        assert what in said, what
    if not torch.cuda.is_available():
        assert "device cuda:0: no GPU here" in said and train["scaling"]["use_gpu"] is False
    assert all("\n" not in n for n in notes)  # one line each


def test_placeholders_unknown_keys_and_refusals(tmp_path, monkeypatch):
    data = yaml.safe_load(PAPER_FILE.read_text())
    process = data["config"]["process"][0]
    process["training_folder"] = "${RUNS}/[name]"
    process["flux_magic"] = True
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    job, notes = to_job(data, PAPER_FILE, cwd=tmp_path)
    assert job["train"]["output"] == str(tmp_path / "runs" / "movie-shots" / "movie-shots")
    assert any("config.process[0].flux_magic: not an ai-toolkit key diffplat knows" in n for n in notes)
    monkeypatch.delenv("RUNS")
    with pytest.raises(ConfigError, match=r"\$\{RUNS\} is not set"):
        to_job(data, PAPER_FILE, cwd=tmp_path)
    process["training_folder"] = "output"
    process["network"]["type"] = "lokr"
    with pytest.raises(ConfigError, match="network.type is 'lokr'; diffplat trains LoRAs"):
        to_job(data, PAPER_FILE, cwd=tmp_path)


def _movie_shots(folder: Path, bdd_dir: Path, count: int = 4) -> None:
    """The paper's data at toy size: three frames stacked top to bottom, not all of one height, a
    multi-scene caption each."""
    frames = sorted((bdd_dir / "images").glob("*.jpg"))
    folder.mkdir(parents=True)
    for n in range(count):
        stack, top = Image.new("RGB", (32, 48)), 0
        for i, height in enumerate((16, 14 + n % 3, 18 - n % 3)):
            with Image.open(frames[(3 * n + i) % len(frames)]) as img:
                stack.paste(img.convert("RGB").resize((32, height)), (0, top))
            top += height
        stack.save(folder / f"{n + 1:04d}.jpg")
        (folder / f"{n + 1:04d}.txt").write_text(f"[MOVIE-SHOTS] a drive, [SCENE-1] <Ann> at a crossing {n}, "
                                                 "[SCENE-2] a bus passes, [SCENE-3] the road at dusk\n")  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_papers_file_trains_a_flux_lora_into_ai_toolkits_layout(tmp_path, tiny_flux, bdd_dir):
    text = PAPER_FILE.read_text()
    for old, new in [('"black-forest-labs/FLUX.1-dev"', f'"{tiny_flux}"'),  # paths
                     ("[ 512, 768, 1024, 1280, 1536 ]", "[ 64 ]"), ("batch_size: 4", "batch_size: 1"),  # sizes
                     ("steps: 5000", "steps: 4"), ("save_every: 250", "save_every: 2"),
                     ("sample_every: 250", "sample_every: 2"), ("width: 1024", "width: 32"),
                     ("height: 1536", "height: 48"), ("sample_steps: 20", "sample_steps: 2")]:
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "movie-shots.yml").write_text(text)
    _movie_shots(tmp_path / "data" / "movie-shots", bdd_dir)
    # two workers under ZeRO-2 (a size: ai-toolkit trains on one device), from the command line
    command = [sys.executable, "-m", "diffplat", "run", "movie-shots.yml", "--set", "train.scaling.num_workers=2",
               "--set", "train.scaling.cpus_per_worker=0.5", "--set", "train.deepspeed.zero_stage=2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=800, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "model.quantize: 8-bit quantization" in first.stderr
    assert "2 workers on 1 node, ZeRO 2, bf16, EMA" in first.stdout + first.stderr  # the file's dtype and ema_config
    out = tmp_path / "output" / "movie-shots"
    names = sorted(p.name for p in out.iterdir())
    assert {"movie-shots.safetensors", "movie-shots_000000002.safetensors", "config.yaml", "samples",
            "adapter_info.json"} <= set(names), names  # fmt: skip
    assert yaml.safe_load((out / "config.yaml").read_text())["meta"]["name"] == "movie-shots"  # [name] replaced
    samples = sorted((out / "samples").glob("*.jpg"))
    assert {p.name.split("__")[1] for p in samples} == {f"{step:09d}_{i}.jpg" for step in (0, 2, 4) for i in (0, 1)}
    from safetensors import safe_open

    with safe_open(str(out / "movie-shots.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["training_info"])["step"] == 4
        assert all(k.startswith("transformer.") for k in f.keys())
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # save.dtype

    # stock diffusers loads it; it changes the image, and at scale 0 the image is the base's exactly
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_flux), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return np.asarray(pipe("[MOVIE-SHOTS] a drive", height=48, width=32, num_inference_steps=2,
                               max_sequence_length=64, generator=torch.Generator().manual_seed(0)).images[0])  # fmt: skip

    base = image()
    pipe.load_lora_weights(str(out), weight_name="movie-shots.safetensors", adapter_name="shots")
    assert not np.array_equal(image(), base)
    pipe.set_adapters(["shots"], adapter_weights=[0.0])
    assert np.array_equal(image(), base)

    # source 1's fill command with that LoRA on a movie shot of the data (frames 16, 14 and 18 rows
    # tall): the third frame painted anew, the first two kept pixel for pixel
    shot = tmp_path / "data" / "movie-shots" / "0001.jpg"
    fill = subprocess.run([sys.executable, "-m", "diffplat", "ic-lora-infer", "--lora_path", str(out), "--input_image",
                           str(shot), "--prompt", (shot.with_suffix(".txt")).read_text(), "--layout", "3x1",
                           "--panel_heights", "16", "14", "18", "--panels_to_inpaint", "2", "--num_inference_steps", "2",
                           "--seed", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert fill.returncode == 0, fill.stderr[-3000:]
    filled = np.asarray(Image.open(tmp_path / "inference_output" / "0001_output_0.png"), dtype=np.int16)
    with Image.open(shot) as original:
        original = np.asarray(original.convert("RGB"), dtype=np.int16)
    assert np.array_equal(filled[:30], original[:30]) and np.abs(filled[30:] - original[30:]).mean() > 1

    # running the file again goes on from the newest save: ai-toolkit's way, as resume_from_checkpoint
    # latest (whose resume is checked step for step in test_train.py)
    assert load_config(tmp_path / "movie-shots.yml").train.resume_from_checkpoint == "latest"
