"""`diffplat tiny-model` writes pipelines that stock diffusers loads and runs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


def test_tiny_model_command_writes_safetensors_in_the_diffusers_layout(tmp_path):
    """The command itself, once; the loading checks below read the session's models, which
    write_tiny_model (the command's function) made."""
    out = tmp_path / "controlnet"
    subprocess.run([sys.executable, "-m", "diffplat", "tiny-model", str(out), "--kind", "controlnet"], check=True)
    assert not list(out.rglob("*.bin")), "weights must be safetensors only"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    import diffusers

    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(out, local_files_only=True)
    image = pipe(image=Image.new("RGB", (128, 64), (128, 64, 128)), prompt="a car on a road", num_inference_steps=2,
                 width=128, height=64, generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (128, 64) and np.asarray(image).std() > 0  # a decoded image, not a blank


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sdxl_inpaint", "tiny_flux", "tiny_flux_fill"])
def test_tiny_model_loads_in_stock_diffusers(model, request):
    import diffusers

    out = request.getfixturevalue(model)
    assert not list(out.rglob("*.bin")), "weights must be safetensors only"
    generator = torch.Generator().manual_seed(0)
    common = dict(prompt="a car on a road", num_inference_steps=2, width=128, height=64, generator=generator)
    init, mask = Image.new("RGB", (128, 64), (90, 90, 90)), Image.new("L", (128, 64), 255)
    if model == "tiny_sdxl":
        image = diffusers.StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)(**common).images[0]
    elif model == "tiny_sdxl_inpaint":
        pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(out, local_files_only=True)
        assert pipe.unet.config.in_channels == 9
        image = pipe(image=init, mask_image=mask, strength=1.0, **common).images[0]
    elif model == "tiny_flux":
        pipe = diffusers.FluxPipeline.from_pretrained(out, local_files_only=True)
        assert pipe.transformer.config.guidance_embeds and pipe.vae.config.shift_factor == 0.1159
        image = pipe(max_sequence_length=64, **common).images[0]
    else:
        pipe = diffusers.FluxFillPipeline.from_pretrained(out, local_files_only=True)
        assert pipe.transformer.config.in_channels == 384
        image = pipe(image=init, mask_image=mask, max_sequence_length=64, **common).images[0]
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


def test_fit_vae_makes_pictures_readable(tmp_path, bdd_dir, tiny_sdxl):
    """`tiny-model --fit-vae --decoder-steps --whole-words` (the demo's base): the VAE learns the
    images (the corrupt one is passed over) with a narrow posterior, then its decoder alone, its
    scaling_factor gives latents of unit variance, and the words of BDD captions are single
    tokens (the tests' models spell them out)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from diffplat.data.images import readable_images
    from diffplat.models.tiny import tiny_vae

    out = tmp_path / "fitted"
    subprocess.run([sys.executable, "-m", "diffplat", "tiny-model", str(out), "--fit-vae", str(bdd_dir / "images"),
                    "--fit-steps", "120", "--decoder-steps", "30", "--whole-words"], check=True, timeout=300)  # fmt: skip
    images, bad = readable_images(bdd_dir / "images")
    assert bad == 1 and len(images) == 12
    pixels = torch.tensor(np.stack([np.asarray(im.resize((128, 64))) for im in images]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1

    def error(vae):
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.mode()
            error = torch.nn.functional.mse_loss(vae.decode(latents).sample.clamp(-1, 1), pixels).item()
            return error, latents, float(posterior.std.mean() / latents.std())

    fitted, latents, narrow = error(AutoencoderKL.from_pretrained(out, subfolder="vae"))
    torch.manual_seed(0)
    random, _, wide = error(tiny_vae())
    assert fitted < 0.3 * random, (fitted, random)
    scale = AutoencoderKL.load_config(out, subfolder="vae")["scaling_factor"]
    assert abs(float((latents * scale).std()) - 1) < 0.05
    # a latent drawn in training is mostly the image, not noise (a random encoder's std is about
    # half the spread of its means, and a fit with a wide start leaves it there)
    assert narrow < 0.1 < wide, (narrow, wide)
    from transformers import CLIPTokenizer

    caption = "a driving scene on a highway, at night, in the rain, with 3 cars and 1 truck"
    words = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer").tokenize(caption)
    assert words[:3] == ["a</w>", "driving</w>", "scene</w>"] and len(words) == 20, words
    assert len(CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer").tokenize(caption)) == 60


@pytest.mark.parametrize("flags, named", [(["--decoder-steps", "10"], "--fit-vae"),
                                          (["--fit-vae", ".", "--decoder-steps", "-1"], "0 or more")])
def test_tiny_model_flags_that_cannot_work_are_named(tmp_path, flags, named):
    run = subprocess.run([sys.executable, "-m", "diffplat", "tiny-model", str(tmp_path / "out"), *flags],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and named in run.stderr and not (tmp_path / "out").exists(), run.stderr


def test_the_vae_fit_is_the_same_whatever_threads_its_caller_has(bdd_dir):
    """The fit pins torch's threads (FIT_THREADS): a 1-thread test process and a many-core laptop
    fit the VAE the demo's adapters were measured on (the threads' count changes each op's sums, and
    with them every model trained on the latents), and the caller's count is given back."""
    from diffplat.data.images import readable_images
    from diffplat.models.tiny import _torch_threads, build_tiny_pipeline, fit_vae

    images = readable_images(bdd_dir / "images")[0]
    fitted = []
    for threads in (1, 3):
        with _torch_threads(threads):  # the caller's
            vae = build_tiny_pipeline("sdxl").vae
            fit_vae(vae, images, steps=6, decoder_steps=4)
            assert torch.get_num_threads() == threads
        fitted.append([p.detach().clone() for p in vae.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*fitted))


def test_sharpening_the_decoder_keeps_every_latent_and_draws_closer(bdd_dir):
    """The decoder's own steps (the demo's sharper pictures): the encoder's latents are exactly
    the ones the whole fit made (the models trained on them are unchanged), and the images come
    back closer than the whole fit alone gave them."""
    import copy

    import numpy as np
    import torch

    from diffplat.data.images import readable_images
    from diffplat.models.tiny import fit_vae, sharpen_decoder, tiny_vae

    images, _ = readable_images(bdd_dir / "images")
    pixels = torch.tensor(np.stack([np.asarray(im.resize((128, 64))) for im in images]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(0)
    vae = tiny_vae()
    fit_vae(vae, images, steps=40)
    before = copy.deepcopy(vae)
    sharpen_decoder(vae, pixels, steps=60, whole_steps=10)

    def encoded_and_error(model):
        with torch.no_grad():
            latents = model.encode(pixels).latent_dist.mode()
            return latents, torch.nn.functional.mse_loss(model.decode(latents).sample.clamp(-1, 1), pixels).item()

    (old_latents, old_error), (new_latents, new_error) = encoded_and_error(before), encoded_and_error(vae)
    assert torch.equal(old_latents, new_latents)
    for (name, a), b in zip(before.encoder.state_dict().items(), vae.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert new_error < 0.9 * old_error, (new_error, old_error)


def test_inpainting_variant_draws_as_its_base_until_trained(tmp_path, tiny_sdxl):
    """9 input channels, the 5 new ones at zero: whatever the mask and masked image, the UNet's
    prediction is the base's; stock diffusers loads it as an SDXL inpainting pipeline."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from diffplat.models.inpainting import inpainting_variant

    out = inpainting_variant(str(tiny_sdxl), tmp_path / "inpaint")
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(out, local_files_only=True)
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    assert pipe.unet.config.in_channels == 9
    torch.manual_seed(0)
    latents, extra = torch.randn(1, 4, 8, 16), torch.randn(1, 5, 8, 16)
    text, pooled = torch.randn(1, 77, 64), torch.randn(1, 32)
    cond = {"encoder_hidden_states": text, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.ones(1, 6)}}
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(torch.cat([latents, extra], 1), 10, **cond).sample,
                                   base(latents, 10, **cond).sample)  # fmt: skip
    with pytest.raises(ValueError, match="takes 9 input channels, not 4: already an inpainting model"):
        inpainting_variant(str(out), tmp_path / "again")


@pytest.mark.parametrize("learnt", ["v_prediction", "epsilon"])
def test_a_full_fine_tune_becomes_a_model_whose_scheduler_predicts_what_it_learnt(tiny_sdxl, tmp_path, learnt):
    """diffusers' full fine-tune script saves the base's scheduler as it was; a UNet trained to
    v_prediction on an epsilon base would then sample with the wrong formula."""
    import json
    import shutil

    from diffusers import StableDiffusionXLPipeline

    from diffplat.models.loading import complete_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_sdxl / "unet", folder / "unet")
    (folder / "adapter_info.json").write_text(json.dumps({"kind": "full", "prediction_type": learnt}))
    complete_model(folder, str(tiny_sdxl), "unet")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == learnt
    base = json.loads((tiny_sdxl / "scheduler" / "scheduler_config.json").read_text())
    assert base["prediction_type"] == "epsilon"  # the base's own is left alone
