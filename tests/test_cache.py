"""The cache stage: latents and text embeddings encoded once on Ray Data actors, and training from
them without ever loading the VAE or the text encoders."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from diffplat.config import CacheConfig, ConfigError, TrainConfig, parse_config
from diffplat.data.cache import CACHE_INFO, EMPTY_PROMPT, SCHEMA, Encoder, rows_table, write_cache_meta
from diffplat.runner import run_job
from diffplat.train.objectives import OBJECTIVES


# Random crops and flips, two-window captions: what a cached row must reproduce exactly.
GEOMETRY = {"resolution": [64, 64], "center_crop": False, "random_flip": True, "seed": 3, "max_token_length": 150}


def _bdd(bdd_dir: Path) -> dict:
    return {"images": str(bdd_dir / "images"), "labels": [str(p) for p in sorted((bdd_dir / "labels").glob("*.json"))]}


def _tensor(data: bytes, shape) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, np.float32).reshape(shape).copy())


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_sdxl, bdd_dir, local_ray):
    """prepare -> cache in one job, on a copy of the tiny model (the training test strips it)."""
    work = tmp_path_factory.mktemp("cache")
    model = Path(shutil.copytree(tiny_sdxl, work / "model"))
    config = parse_config({
        "name": "cache-test",
        "prepare": {"bdd": _bdd(bdd_dir)},
        "cache": {"data": "data/shards", "base_model": str(model), "batch_size": 4, "rows_per_shard": 4,
                  "cpus_per_replica": 0.5, **GEOMETRY},
    })  # fmt: skip
    return work, model, run_job(config, work)


def test_cache_stage_writes_what_training_would_encode(cached, tiny_sdxl):
    from diffusers import AutoencoderKL

    from diffplat.data.pipeline import ToTrainingArrays
    from diffplat.models.families import family_of
    from diffplat.models.text import encode_prompts

    work, model, result = cached
    folder = work / "cache"
    info = json.loads((folder / CACHE_INFO).read_text())
    assert {k: info[k] for k in GEOMETRY} == GEOMETRY and info["base_model"] == str(model)
    assert info["latent_shape"] == [4, 8, 8] and info["dtype"] == "float32" and info["scaling_factor"] == 0.13025
    report, prepared = result.outputs["cache"], result.outputs["prepare"]["rows_written"]
    assert (report["rows"], report["rows_left_out"], report["shards"]) == (prepared, 0, -(-prepared // 4))  # 4 a shard
    table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("shard-*.parquet")))
    assert table.schema == SCHEMA and table.num_rows == info["rows"] == prepared > 4
    rows = {r["id"]: r for r in table.to_pylist()}
    assert {r["windows"] for r in rows.values()} == {1, 2}  # short and long captions, each on its own windows
    empty = load_file(folder / EMPTY_PROMPT)
    assert empty["prompt_embeds"].shape == (77, info["embed_dim"]) and empty["pooled_prompt_embeds"].shape == (32,)

    # The same rows through ToTrainingArrays and the VAE, as training on the fly sees them.
    shards = pa.concat_tables(pq.read_table(p) for p in sorted((work / "data" / "shards").glob("*.parquet")))
    arrays = ToTrainingArrays((64, 64), False, True, 3, ids=True).arrays(shards.to_pydict())
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae").eval()
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(arrays["pixel_values"])).latent_dist.mean
    for i, row_id in enumerate(arrays["id"]):
        row = rows[row_id]
        # float32 noise only: a Ray worker runs one thread, this process more (latents are ~0.4)
        torch.testing.assert_close(_tensor(row["latent_mean"], (4, 8, 8)), mean[i], rtol=1e-4, atol=5e-5)
        assert row["original_size"] == list(arrays["original_size"][i])
        assert row["crop_top_left"] == list(arrays["crop_top_left"][i])
    assert len({tuple(r["crop_top_left"]) for r in rows.values()}) > 1  # random crops, kept per row
    parts = family_of(str(tiny_sdxl)).load_encoders(str(tiny_sdxl))
    caption = max(rows.values(), key=lambda r: r["windows"])
    tokenizers, encoders = parts["tokenizers"], parts["text_encoders"]
    with torch.no_grad():
        embeds, pooled = encode_prompts(tokenizers, encoders, [caption["caption"]], "cpu", 150)
    stored = _tensor(caption["prompt_embeds"], (154, info["embed_dim"]))  # two windows of 77 tokens
    torch.testing.assert_close(stored, embeds[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_tensor(caption["pooled_prompt_embeds"], (32,)), pooled[0], rtol=1e-5, atol=1e-6)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    run = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                             filter_string="tags.`diffplat.stage` = 'cache'")[0]  # fmt: skip
    assert run.data.metrics["rows"] == prepared and run.data.metrics["rows_left_out"] == 0


def test_training_from_the_cache_never_loads_the_vae_or_text_encoders(cached):
    work, model, _ = cached
    # Without these weights no VAE or text encoder can load: the run shows it never tried.
    for sub in ("vae", "text_encoder", "text_encoder_2"):
        for weights in (model / sub).glob("*.safetensors"):
            weights.unlink()
    config = parse_config({
        "name": "cache-train",
        "train": {"base_model": str(model), "data": "data/shards", "cache": "cache", **GEOMETRY,
                  "lora": {"rank": 4, "alpha": 4}, "max_train_steps": 2, "train_batch_size": 2, "learning_rate": 1e-3,
                  "proportion_empty_prompts": 0.5, "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
                  "deepspeed": {"zero_stage": 0}},
    })  # fmt: skip
    result = run_job(config, work)
    adapter = work / "adapters" / "lora"
    weights = load_file(adapter / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)
    info = json.loads((adapter / "adapter_info.json").read_text())
    assert info["step"] == 2 and info["cache"] == str(work / "cache")
    assert result.outputs["train"]["step"] == 2


def _batch(kind: str) -> dict:
    """Two rows as ToTrainingArrays hands them over: a one-window and a two-window caption."""
    rng = np.random.default_rng(0)
    return {
        "id": np.array(["a", "b"], dtype=object),
        "pixel_values": rng.uniform(-1, 1, (2, 3, 64, 128)).astype(np.float32),
        "caption": np.array(["a red car at night", "a bus in the rain, " * 6], dtype=object),
        "original_size": np.array([[72, 140], [64, 128]]),
        "crop_top_left": np.array([[4, 6], [0, 0]]),
        "layout": np.array(["2x2" if kind == "ic_lora" else ""] * 2, dtype=object),
        "conditioning_pixel_values": (rng.integers(0, 256, (2, 3, 64, 128)) / 255.0).astype(np.float32),
    }


@pytest.mark.parametrize("kind, model", [("lora", "tiny_sdxl"), ("controlnet", "tiny_sdxl"), ("ic_lora", "tiny_sdxl"),
                                         ("lora", "tiny_flux")])  # fmt: skip
def test_a_cached_batch_gives_the_loss_of_encoding_on_the_fly(kind, model, tmp_path, request):
    """Same batch, same generator states: the step from the cache's rows is the step that
    encodes the pixels and captions (dropped captions and window padding included). On FLUX:
    shifted and scaled latents, CLIP pooled and T5 states."""
    base = request.getfixturevalue(model)
    batch = _batch(kind)
    made = CacheConfig(data="unused", base_model=str(base), resolution=(128, 64), max_token_length=150,
                       max_sequence_length=64, conditioning=kind == "controlnet")  # fmt: skip
    encoder = Encoder(made.model_dump(mode="json"))
    write_cache_meta(tmp_path, made, *encoder.describe(), rows=2)
    rows = rows_table(encoder(batch)).to_pydict()  # as Arrow hands the columns back
    train = dict(kind=kind, base_model=str(base), data="unused", max_train_steps=1, resolution=(128, 64),
                 max_token_length=150, max_sequence_length=64, proportion_empty_prompts=0.3, ic_lora={"mode": "composite"},
                 validation={"prompts": ["a road"], "num_inference_steps": 1})  # fmt: skip
    torch.manual_seed(0)
    on_the_fly = OBJECTIVES[kind](TrainConfig(**train), torch.device("cpu"))
    torch.manual_seed(0)
    from_cache = OBJECTIVES[kind](TrainConfig(**train, cache=str(tmp_path)), torch.device("cpu"))
    parts = from_cache.parts
    assert parts.vae is None and parts.text_encoders == () and parts.tokenizers == ()
    patterns = set()
    for seed in range(4):  # caption dropout differs from step to step
        state = on_the_fly.caption_rng.get_state()
        patterns.add(tuple(on_the_fly.dropped_captions(2)))
        on_the_fly.caption_rng.set_state(state)
        with torch.no_grad():
            want = on_the_fly.loss(on_the_fly.module, batch, torch.Generator().manual_seed(seed))
            got = from_cache.loss(from_cache.module, rows, torch.Generator().manual_seed(seed))
        assert got.item() == pytest.approx(want.item(), rel=1e-4), seed
    # a dropped caption, and a short one padded to the long one's two windows, both came up
    assert {(True, False), (False, False)} <= patterns
    if kind == "lora":  # validation images need the whole pipeline: rank 0 loads the rest then
        assert from_cache.validation_grid(from_cache.module) is not None and from_cache.parts.vae is not None


def _fake_cache(folder: Path, layout: str | None = None, **made) -> str:
    """A cache folder with a cache_info.json of `made` and one row (enough for the driver's checks)."""
    folder.mkdir(parents=True)
    info = {"base_model": "m", "vae": None, "variant": None, "resolution": [64, 64], "center_crop": True,
            "random_flip": False, "seed": 0, "max_token_length": 75, "conditioning": False, **made}  # fmt: skip
    (folder / CACHE_INFO).write_text(json.dumps(info))
    row = {name: None for name in SCHEMA.names} | {"id": "0", "caption": "c", "layout": layout}
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), folder / "shard-00000.parquet")
    return str(folder)


def test_what_cannot_train_from_a_cache_is_refused_by_name(tmp_path, tiny_sdxl_inpaint):
    from diffplat.preflight import PreflightError, check_job_paths
    from diffplat.train.trainer import check_training_data

    base = {"base_model": "m", "data": "d", "cache": "c", "max_train_steps": 1, "resolution": [64, 64]}
    with pytest.raises(ValidationError, match="cache: train_text_encoder trains the text encoders"):
        TrainConfig(**base, train_text_encoder=True)
    with pytest.raises(ValidationError, match="cache: ic_lora mode masked .* needs the pixels"):
        TrainConfig(**base, kind="ic_lora")  # masked is ic_lora's default
    with pytest.raises(ConfigError, match=r"train.random_flip is false, but cache.random_flip is true"):
        parse_config({"name": "x", "cache": {"data": "d", "base_model": "m", "output": "c", "resolution": [64, 64],
                                             "random_flip": True}, "train": base})  # fmt: skip

    cache = _fake_cache(tmp_path / "seeded", center_crop=False, seed=7)
    with pytest.raises(ConfigError, match=r"train.seed is 0, but .*seeded/cache_info.json's seed is 7"):
        check_training_data(TrainConfig(**{**base, "cache": cache}, center_crop=False))
    # a seed that draws nothing (centre crop, no flip) does not matter
    assert check_training_data(TrainConfig(**{**base, "cache": _fake_cache(tmp_path / "centred", seed=7)}))
    with pytest.raises(ConfigError, match="holds no conditioning pixels; controlnet needs a cache made with "
                                          "cache.conditioning: true"):  # fmt: skip
        check_training_data(TrainConfig(**{**base, "cache": _fake_cache(tmp_path / "plain")}, kind="controlnet"))
    model = str(tiny_sdxl_inpaint)
    inpaint = {**base, "base_model": model, "cache": _fake_cache(tmp_path / "ic", "2x2", base_model=model)}
    with pytest.raises(ConfigError, match="train.cache: .* has an inpainting denoiser"):
        check_training_data(TrainConfig(**inpaint, kind="ic_lora", ic_lora={"mode": "composite"}))

    job = parse_config({"name": "x", "train": {**base, "data": str(tmp_path / "seeded"), "cache": "nowhere",
                                               "base_model": str(tiny_sdxl_inpaint)}})  # fmt: skip
    with pytest.raises(PreflightError, match="^train.cache: nowhere is not a folder"):
        check_job_paths(job, lambda v: tmp_path / v)


def test_repeats_make_one_epoch_several_passes_in_the_same_order(cached):
    """train.repeats (kohya's num_repeats): a tiny dataset would otherwise end its epoch every
    few steps, and each epoch restarts Ray Data's reading. Each pass is the cache's rows in order."""
    from diffplat.data.cache import cached_dataset
    from diffplat.data.pipeline import training_dataset

    work = cached[0]
    once = [r["id"] for r in cached_dataset(str(work / "cache"), conditioning=False).iter_rows()]
    thrice = [r["id"] for r in cached_dataset(str(work / "cache"), conditioning=False, repeats=3).iter_rows()]
    assert len(once) > 4 and sorted(thrice) == sorted(once * 3)
    rows = training_dataset(str(work / "data" / "shards"), (64, 64), True, False, 0, repeats=2).count()
    assert rows == 2 * training_dataset(str(work / "data" / "shards"), (64, 64), True, False, 0).count()
