"""`diffplat export-lora --format kohya`: one file kohya's scripts and the SDXL front ends load: every
key names a module of the original-layout SDXL (`lora_unet_input_blocks_...`, `lora_te1_`,
`lora_te2_`) with its real alpha; stock diffusers' load_lora_weights reads it back to the same
image."""

import os
import subprocess
import sys

import numpy as np
import torch
from safetensors import safe_open


def test_every_unet_module_has_its_original_layout_name(tiny_sdxl):
    """The names the export gives, turned back by diffusers' own single-file converter (which reads
    Stability's original checkpoints): every parameter of the UNet lands where it came from."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from diffplat.models.kohya import original_unet_path

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    state = unet.state_dict()
    original = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        original[f"model.diffusion_model.{original_unet_path(module, unet.config)}.{param}"] = value
    assert any(k.startswith("model.diffusion_model.middle_block.1.") for k in original)
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_kohya_export_gives_the_same_image_in_stock_diffusers(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffplat.config import LoraSettings
    from diffplat.models.families import family_of
    from diffplat.models.kohya import original_unet_path
    from diffplat.models.lora import TEXT_ENCODER_TARGETS, add_lora, save_lora

    # a LoRA on the UNet and both text encoders (--train_text_encoder), random non-zero weights
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    config = add_lora(unet, LoraSettings(rank=4, alpha=8))
    encoders = {"text_encoder": CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")}  # fmt: skip
    text_config = [add_lora(e, LoraSettings(rank=4, alpha=4, target_modules=list(TEXT_ENCODER_TARGETS))) for e in encoders.values()][0]
    for model in (unet, *encoders.values()):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    adapter = save_lora(family_of(str(tiny_sdxl)), unet, config, tmp_path / "lora", {"base_model": str(tiny_sdxl)},
                        encoders, text_config)  # fmt: skip
    out = tmp_path / "lora_kohya.safetensors"
    proc = subprocess.run([sys.executable, "-m", "diffplat", "export-lora", str(adapter), "--format", "kohya",
                           "--out", str(out)], capture_output=True, text=True, env=os.environ.copy(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = {k.split("_")[1]: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    # every key names a module: of the original-layout UNet, or of CLIP (te1) / OpenCLIP bigG (te2)
    plain = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    modules = {"unet": {original_unet_path(n, plain.config).replace(".", "_") for n, m in plain.named_modules()
                        if n and list(m.parameters(recurse=False))},
               "te1": {n.replace(".", "_") for n, _ in encoders["text_encoder"].named_modules() if n},
               "te2": {n.replace(".", "_") for n, _ in encoders["text_encoder_2"].named_modules() if n}}  # fmt: skip
    for key in keys:
        prefix, part, module = key.split(".")[0].split("_", 2)
        assert prefix == "lora" and module in modules[part], key
    unet_keys = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
    assert any(k.startswith("lora_unet_input_blocks_") for k in unet_keys) and any(k.startswith("lora_unet_output_blocks_") for k in unet_keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)  # diffusers' names are not kohya's
    assert alphas == {"unet": 8.0, "te1": 4.0, "te2": 4.0}  # each part's real alpha, not the rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0" and meta["ss_sd_model_name"] == str(tiny_sdxl)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_train_unet_only"] == "False"

    def image(lora_folder=None, weight_name=None):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if lora_folder:
            pipe.load_lora_weights(str(lora_folder), weight_name=weight_name)
        return pipe("a road", width=64, height=64, num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip

    diffusers_format = image(adapter)
    kohya_format = image(out.parent, out.name)
    assert np.abs(diffusers_format - image()).max() > 1e-3  # the LoRA does something
    assert np.abs(kohya_format - diffusers_format).max() < 1e-5


def test_export_refuses_a_pickle(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffplat", "export-lora", str(tmp_path / "model.pt"), "--out",
                           str(tmp_path / "x.safetensors")], capture_output=True, text=True, env=os.environ.copy())  # fmt: skip
    assert proc.returncode == 2 and "a pickled LoRA (.pt) is refused" in proc.stderr
