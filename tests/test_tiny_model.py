"""`diffplat tiny-model` writes pipelines that stock diffusers loads and runs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-inpaint", "controlnet"])
def test_tiny_model_loads_in_stock_diffusers(tmp_path, kind):
    import diffusers

    out = tmp_path / kind
    subprocess.run([sys.executable, "-m", "diffplat", "tiny-model", str(out), "--kind", kind], check=True)
    assert not list(out.rglob("*.bin")), "weights must be safetensors only"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    generator = torch.Generator().manual_seed(0)
    common = dict(prompt="a car on a road", num_inference_steps=2, width=128, height=64, generator=generator)
    if kind == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
        image = pipe(**common).images[0]
    elif kind == "sdxl-inpaint":
        pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(out, local_files_only=True)
        assert pipe.unet.config.in_channels == 9
        init = Image.new("RGB", (128, 64), (90, 90, 90))
        mask = Image.new("L", (128, 64), 255)
        image = pipe(image=init, mask_image=mask, strength=1.0, **common).images[0]
    else:
        pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(out, local_files_only=True)
        image = pipe(image=Image.new("RGB", (128, 64), (128, 64, 128)), **common).images[0]
    assert image.size == (128, 64)
    assert np.asarray(image).std() > 0  # a decoded image, not a blank


def test_tiny_model_vae_shrinks_8x(tiny_sdxl):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae", local_files_only=True)
    latents = vae.encode(torch.zeros(1, 3, 64, 128)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 16)


def test_tiny_model_is_reproducible(tmp_path):
    from diffplat.models.tiny import build_tiny_pipeline

    a, b = build_tiny_pipeline("sdxl", seed=3), build_tiny_pipeline("sdxl", seed=3)
    for (name, p), q in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(p, q), name
