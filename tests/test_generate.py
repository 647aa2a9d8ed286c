"""The generate stage on Ray Data, with the tiny SDXL and a LoRA, checked against stock diffusers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffplat.config import parse_config
from diffplat.runner import run_job
from helpers import make_lora

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_sdxl, local_ray):
    work = tmp_path_factory.mktemp("gen")
    make_lora(tiny_sdxl, work / "lora")
    (work / "prompts.txt").write_text("# a comment\na bus at night\n\n")
    config = parse_config({
        "name": "gen-test",
        "generate": {
            "base_model": str(tiny_sdxl), "lora": "lora", "prompts": ["a car on a road"],
            "prompts_file": "prompts.txt", "num_generations": 2, "resolution": [128, 64],
            "num_inference_steps": 3, "adapter_scale": 0.7, "seed": 10, "batch_size": 2,
            "scheduler": "ddim", "negative_prompt": "blurry",
        },
    })
    result = run_job(config, work)
    return work, result


def test_writes_numbered_images_and_metadata(generated):
    work, result = generated
    out = work / "generations"
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png"]
    meta = {m["file_name"]: m for m in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}
    assert set(meta) == {f"images/{n}" for n in names}
    first = meta["images/000000.png"]
    assert first["prompt"] == "a car on a road" and first["seed"] == 10
    assert meta["images/000003.png"]["prompt"] == "a bus at night" and meta["images/000003.png"]["seed"] == 13
    assert first["adapter_scale"] == 0.7 and first["adapter"] == str(work / "lora")
    assert (first["width"], first["height"], first["scheduler"]) == (128, 64, "ddim")
    assert first["seconds"] > 0
    assert Image.open(out / "images" / "000000.png").size == (128, 64)
    assert result.outputs["generate"]["images"] == 4
    # one picture of all four, 128x64 thumbnails scaled to 256 wide, 4 px gaps
    assert Image.open(out / "contact_sheet.png").size == (4 * 260 + 4, 128 + 8)


def test_matches_stock_diffusers_with_the_same_settings(generated, tiny_sdxl):
    """The Ray Data replica does exactly what a hand-written diffusers call does."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    work, _ = generated
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(work / "lora")
    image = pipe("a car on a road", negative_prompt="blurry", width=128, height=64, num_inference_steps=3,
                 generator=torch.Generator().manual_seed(10), cross_attention_kwargs={"scale": 0.7}).images[0]
    ours = np.asarray(Image.open(work / "generations" / "images" / "000000.png"), dtype=np.int16)
    assert np.abs(ours - np.asarray(image, dtype=np.int16)).max() <= 2
    other = np.asarray(Image.open(work / "generations" / "images" / "000001.png"), dtype=np.int16)
    assert np.abs(ours - other).max() > 10  # another seed is another image


def test_prompts_come_from_list_and_file_and_missing_file_is_named(tmp_path):
    from diffplat.config import GenerateConfig
    from diffplat.infer.generate import generation_requests, read_prompts

    (tmp_path / "p.txt").write_text("one\n# skipped\n\ntwo\n")
    config = GenerateConfig(base_model="m", prompts=["zero"], prompts_file=str(tmp_path / "p.txt"), num_generations=2,
                            seed=5)  # fmt: skip
    prompts = read_prompts(config)
    assert prompts == ["zero", "one", "two"]
    rows = generation_requests(config, prompts)
    assert [(r["index"], r["prompt"], r["seed"]) for r in rows[:3]] == [(0, "zero", 5), (1, "zero", 6), (2, "one", 7)]
    with pytest.raises(FileNotFoundError, match="generate.prompts_file: .*nope.txt is not a file"):
        read_prompts(config.model_copy(update={"prompts_file": str(tmp_path / "nope.txt")}))
