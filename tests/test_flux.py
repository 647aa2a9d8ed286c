"""FLUX.1 as a model family: told from model_index.json, trained by flow matching on packed
latents, its LoRAs in the layout stock FluxPipeline loads. In-process on the tiny FLUX; the
loss-falls check for every kind is in test_objectives.py."""

import json

import numpy as np
import pytest
import torch

from diffplat.aitoolkit import AI_TOOLKIT_FLUX_TARGETS
from diffplat.config import TrainConfig
from diffplat.models.families import FamilyError, family_of
from diffplat.train.objectives import OBJECTIVES



def test_the_family_is_read_from_model_index(tiny_sdxl, tiny_sdxl_inpaint, tiny_flux, tiny_flux_fill, tmp_path):
    assert family_of(str(tiny_sdxl)).name == family_of(str(tiny_sdxl_inpaint)).name == "sdxl"
    flux, fill = family_of(str(tiny_flux)), family_of(str(tiny_flux_fill))
    assert flux.name == fill.name == "flux"
    assert not flux.is_inpainting(flux.denoiser_config(str(tiny_flux)))
    assert fill.is_inpainting(fill.denoiser_config(str(tiny_flux_fill)))
    other = tmp_path / "sd3"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(FamilyError, match=r"sd3: a StableDiffusion3Pipeline; diffplat trains and samples "
                                          r"StableDiffusionXL\*, Flux\*"):  # fmt: skip
        family_of(str(other))
    with pytest.raises(FamilyError, match="no model_index.json"):
        family_of(str(tmp_path))


def test_flow_matching_noises_toward_noise_and_targets_the_velocity():
    from diffplat.train.noising import FlowMatchNoising, sample_sigmas

    latents, noise = torch.randn(64, 16, 4, 4), torch.randn(64, 16, 4, 4)
    noisy, t, target = FlowMatchNoising("uniform")(latents, noise, torch.Generator().manual_seed(0))
    s = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * latents + s * noise)
    torch.testing.assert_close(target, noise - latents)
    for scheme in ("sigmoid", "logit_normal", "mode", "uniform"):
        sigmas = sample_sigmas(scheme, 4000, torch.Generator().manual_seed(0), "cpu")
        assert 0 <= sigmas.min() and sigmas.max() <= 1, scheme
        assert abs(sigmas.mean().item() - 0.5) < 0.05, scheme  # each is centred on the middle of the path
    # logit-normal (ai-toolkit's sigmoid) crowds the middle; uniform does not
    middle = lambda x: ((x > 0.25) & (x < 0.75)).float().mean().item()  # noqa: E731
    assert middle(sample_sigmas("sigmoid", 4000, torch.Generator().manual_seed(0), "cpu")) > 0.65
    assert middle(sample_sigmas("uniform", 4000, torch.Generator().manual_seed(0), "cpu")) < 0.55
    weights = FlowMatchNoising(weighting="cosmap").weights(torch.tensor([100.0, 500.0, 900.0]))
    assert weights[1] > weights[0] and weights[1] > weights[2]  # cosmap weighs the middle most


def test_the_fill_input_is_what_flux_fill_pipeline_feeds_its_transformer(tiny_flux_fill):
    """Packed, the training input of an inpainting FLUX is FluxFillPipeline's own: noisy latents,
    masked-image latents and the 8x8 mask of each cell, in that order."""
    from diffusers import FluxFillPipeline

    from diffplat.models.families.flux import pack

    pipe = FluxFillPipeline.from_pretrained(str(tiny_flux_fill), local_files_only=True)
    family = family_of(str(tiny_flux_fill))
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    pixel_mask = torch.zeros(1, 1, 64, 64)
    pixel_mask[..., :, 32:] = 1  # the right half is filled
    masked = pixels * (1 - pixel_mask)
    noisy = torch.randn(1, 16, 8, 8)
    ours = family.inpaint_input(noisy, None, pixel_mask, family.encode_images(pipe.vae, masked, torch.Generator().manual_seed(3)))
    mask, masked_latents = pipe.prepare_mask_latents(pixel_mask, masked, 1, 16, 1, 64, 64, torch.float32, "cpu",
                                                     torch.Generator().manual_seed(3))  # fmt: skip
    theirs = torch.cat([pack(noisy), torch.cat([masked_latents, mask], dim=-1)], dim=-1)
    assert theirs.shape[-1] == 384
    torch.testing.assert_close(pack(ours), theirs)




def _trained_lora(base, folder, targets=AI_TOOLKIT_FLUX_TARGETS):
    torch.manual_seed(0)
    config = TrainConfig(base_model=str(base), data="unused", max_train_steps=1, resolution=(64, 64),
                         lora={"rank": 4, "alpha": 4, "target_modules": list(targets)})  # fmt: skip
    objective = OBJECTIVES["lora"](config, torch.device("cpu"))
    for name, p in objective.module.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1.0)
    return objective.save(objective.module, folder, {"base_model": str(base), "step": 1})


def test_a_flux_lora_loads_in_stock_flux_pipeline(tiny_flux, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    folder = _trained_lora(tiny_flux, tmp_path / "lora")
    keys = load_file(folder / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    info = json.loads((folder / "adapter_info.json").read_text())
    assert info["family"] == "flux" and info["prediction_type"] == "flow_matching"

    pipe = FluxPipeline.from_pretrained(str(tiny_flux), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return np.asarray(pipe("a red car at night", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                               generator=torch.Generator().manual_seed(0)).images[0])  # fmt: skip

    base = image()
    pipe.load_lora_weights(str(folder), adapter_name="trained")
    changed = image()
    assert np.abs(changed.astype(int) - base.astype(int)).mean() > 1
    pipe.set_adapters(["trained"], adapter_weights=[0.0])
    assert np.array_equal(image(), base)


@pytest.mark.slow
def test_bulk_generation_on_flux_with_a_lora(tmp_path, tiny_flux, local_ray):
    """The generate stage on a FLUX base: text-to-image with a FLUX LoRA at its scale, sizes in
    16 px steps. (FLUX training on 2 workers under ZeRO-2 runs in test_aitoolkit.py; the In-Context
    LoRA recipe on three-frame composites and their filling, in the demo's FLUX leg.)"""
    from diffplat.config import parse_config
    from diffplat.runner import run_job

    _trained_lora(tiny_flux, tmp_path / "adapters" / "shots")
    config = parse_config({
        "name": "flux-generate",
        "generate": {"base_model": str(tiny_flux), "lora": "adapters/shots", "prompts": ["[MOVIE-SHOTS] a drive"],
                     "num_generations": 2, "resolution": [32, 96], "num_inference_steps": 2, "guidance_scale": 3.5,
                     "adapter_scale": 0.5},
    })  # fmt: skip
    result = run_job(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "generations" / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all((r["width"], r["height"]) == (32, 96) for r in records)
    assert result.outputs["generate"]["images"] == 2


@pytest.mark.parametrize("model, heights", [("tiny_flux", None), ("tiny_flux_fill", [36, 36, 24])])
def test_ic_lora_infer_fills_a_panel_of_three_on_flux(model, heights, request, tmp_path):
    """Source 1's command on a FLUX base: a Fill model fills (FluxFillPipeline), a plain one blends
    latents under the mask (FluxInpaintPipeline); the panels not named stay pixel for pixel, also
    when the frames are of unequal height (the paper's movie shots; --panel_heights)."""
    import subprocess
    import sys

    from PIL import Image

    base = request.getfixturevalue(model)
    lora = _trained_lora(base, tmp_path / "lora")
    rng = np.random.default_rng(0)
    composite = Image.fromarray(rng.integers(0, 256, (96, 32, 3), dtype=np.uint8))  # three frames, stacked
    composite.save(tmp_path / "shots.png")
    sizes = ["--panel_heights", *map(str, heights)] if heights else []
    proc = subprocess.run([sys.executable, "-m", "diffplat", "ic-lora-infer", "--lora_path", str(lora), "--input_image",
                           "shots.png", "--prompt", "[MOVIE-SHOTS] a drive, [SCENE-1] a road [SCENE-2] a bus [SCENE-3] dusk",
                           "--layout", "3x1", "--panels_to_inpaint", "2", "--num_inference_steps", "2", "--seed", "3",
                           "--base_model", str(base), *sizes], cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.asarray(Image.open(tmp_path / "inference_output" / "shots_output_0.png"), dtype=np.int16)
    original = np.asarray(composite, dtype=np.int16)
    top = 72 if heights else 64  # where frame 2 begins
    assert np.array_equal(out[:top], original[:top])  # frames 0 and 1: pixel for pixel
    assert np.abs(out[top:] - original[top:]).mean() > 5  # frame 2: painted anew
    record = json.loads((tmp_path / "inference_output" / "metadata.jsonl").read_text())
    assert record.get("panel_heights") == heights
