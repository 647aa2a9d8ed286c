"""The generate stage on Ray Data, with the tiny SDXL and a LoRA, checked against stock diffusers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffplat.config import parse_config
from diffplat.runner import run_job
from helpers import make_lora



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


def test_templates_shards_and_simple_names(tmp_path, bdd_dir):
    from diffplat.config import GenerateConfig, PrepareConfig
    from diffplat.data.prepare import prepare
    from diffplat.infer.generate import generation_requests, read_prompts

    template = {"text": "a {weather} street at {time}", "values": {"weather": ["rainy", "clear"], "time": ["dawn", "night"]}}
    config = GenerateConfig(base_model="m", prompt_template=template, output_format="simple", seed=3)
    prompts = read_prompts(config)
    assert prompts == ["a rainy street at dawn", "a rainy street at night", "a clear street at dawn",
                       "a clear street at night"]  # fmt: skip
    assert generation_requests(config, prompts)[1]["name"] == "a_rainy_street_at_night_4.png"
    with pytest.raises(ValueError, match="the template names \\['time', 'weather'\\] and values are given for \\['weather'\\]"):
        GenerateConfig(base_model="m", prompt_template={"text": template["text"], "values": {"weather": ["x"]}})
    paths = {"images": str(bdd_dir / "images"), "labels": [str(p) for p in (bdd_dir / "labels").glob("*.json")]}
    report = prepare(PrepareConfig(bdd=paths, output=str(tmp_path / "data")), lambda v: tmp_path / v)
    captions = read_prompts(GenerateConfig(base_model="m", prompts_from_shards=str(tmp_path / "data" / "shards")))
    index = [json.loads(line)["caption"] for line in (tmp_path / "data" / "index_lora.jsonl").read_text().splitlines()]
    assert len(captions) == report["rows_written"] > 0 and sorted(captions) == sorted(index)


def test_several_loras_each_with_its_scale_as_stock_diffusers_mixes_them(tmp_path, tiny_sdxl, local_ray):
    from diffusers import StableDiffusionXLPipeline

    make_lora(tiny_sdxl, tmp_path / "a", seed=1)
    make_lora(tiny_sdxl, tmp_path / "b", seed=2)
    run_job(parse_config({"name": "mix", "generate": {
        "base_model": str(tiny_sdxl), "loras": [{"path": "a", "scale": 0.8}, {"path": "b", "scale": 0.3}],
        "prompts": ["a car on a road"], "resolution": [64, 64], "num_inference_steps": 3, "seed": 4}}), tmp_path)  # fmt: skip
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "a"), adapter_name="x")
    pipe.load_lora_weights(str(tmp_path / "b"), adapter_name="y")
    pipe.set_adapters(["x", "y"], adapter_weights=[0.8, 0.3])
    image = pipe("a car on a road", width=64, height=64, num_inference_steps=3, generator=torch.Generator().manual_seed(4)).images[0]
    ours = np.asarray(Image.open(tmp_path / "generations" / "images" / "000000.png"), dtype=np.int16)
    assert np.abs(ours - np.asarray(image, dtype=np.int16)).max() <= 2
    record = json.loads((tmp_path / "generations" / "metadata.jsonl").read_text().splitlines()[0])
    assert record["adapters"] == [{"path": str(tmp_path / "a"), "scale": 0.8}, {"path": str(tmp_path / "b"), "scale": 0.3}]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_bulk_run_killed_midway_goes_on_where_it_stopped(tmp_path, tiny_sdxl):
    """2 replicas, 16 images; the whole process group killed once images appear; the same
    command again makes only the missing ones: every index exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "bulk", "ray": {"num_cpus": 2}, "generate": {
        "base_model": str(tiny_sdxl), "prompts": [f"a street, scene {i}" for i in range(8)], "num_generations": 2,
        "resolution": [64, 64], "num_inference_steps": 2, "replicas": 2, "cpus_per_replica": 1, "batch_size": 2}}))  # fmt: skip
    command = [sys.executable, "-m", "diffplat", "run", str(job), "--workdir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    images = tmp_path / "generations" / "images"
    metadata = tmp_path / "generations" / "metadata.jsonl"

    def recorded() -> int:  # what a rerun counts as done: images whose metadata line is written
        return len(metadata.read_text().splitlines()) if metadata.is_file() else 0

    deadline = time.time() + 1200  # a hang guard: a busy machine takes minutes to start Ray and two replicas
    while time.time() < deadline and first.poll() is None and recorded() < 4:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = len((tmp_path / "generations" / "metadata.jsonl").read_text().splitlines())
    assert 0 < done_before < 16, f"{done_before} images before the kill: the test needs the run stopped midway"
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{done_before} of 16 images are already in" in second.stderr
    records = [json.loads(line) for line in (tmp_path / "generations" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(16))  # none twice, none lost
    assert all(r["seed"] == r["index"] for r in records)
    assert len(list(images.glob("*.png"))) == 16 and not list(images.glob(".*"))
    coco = json.loads((tmp_path / "generations" / "coco_images.json").read_text())
    assert len(coco["images"]) == 16 and coco["images"][0] == {"id": 1, "file_name": "images/000000.png", "width": 64,
                                                               "height": 64, "diffplat_index": 0}  # fmt: skip
    # another generation into the same folder is refused, not mixed in (checked here, in-process:
    # the stage opens its folder this way before any replica starts)
    from diffplat.config import ConfigError, load_config
    from diffplat.infer.output import GenerationFolder

    other = load_config(job, ["generate.num_inference_steps=3"]).generate
    with pytest.raises(ConfigError, match=r"holds images of another generation \(it differs in num_inference_steps\)"):
        GenerationFolder(tmp_path / "generations", other)


def test_inputs_that_would_share_an_output_name_are_skipped_and_named(tmp_path):
    """a.png and a.jpg (or a map and its BDD-named twin) would write the same images: the second is
    left out, named, instead of replacing the first one's images."""
    from diffplat.config import GenerateConfig
    from diffplat.infer.controlnet import map_requests
    from diffplat.infer.generate import fill_requests

    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("a.png", "a.jpg", "b_train_id.png", "b.png", "c.png"):
        Image.new("RGB", (16, 16)).save(folder / name)
    fills = GenerateConfig(base_model="m", kind="ic_lora", prompts=["p"], num_generations=2,
                           ic_lora={"inputs": str(folder)})  # fmt: skip
    rows, skipped = fill_requests(fills)
    assert sorted(r["name"] for r in rows) == ["a_0.png", "a_1.png", "b_0.png", "b_1.png", "b_train_id_0.png",
                                               "b_train_id_1.png", "c_0.png", "c_1.png"]  # fmt: skip
    assert len(skipped) == 1 and skipped[0].startswith("a.png: its images would be named like those of a.jpg")
    maps = GenerateConfig(base_model="m", kind="controlnet", prompts=["p"],
                          controlnet={"model": "cn", "maps": str(folder)})  # fmt: skip
    rows, skipped = map_requests(maps, folder, None, [])
    assert sorted(r["name"] for r in rows) == ["a.png", "b.png", "c.png"]
    assert [s.split(":")[0] for s in skipped] == ["a.png", "b_train_id.png"]
