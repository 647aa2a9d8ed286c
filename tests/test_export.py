"""`diffplat export-lora --format kohya`: one file the common SDXL front ends load, with each
module's real alpha; stock diffusers' load_lora_weights reads it back to the same image."""

import os
import subprocess
import sys

import numpy as np
import torch
from safetensors import safe_open

from helpers import make_lora


def test_kohya_export_gives_the_same_image_in_stock_diffusers(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    adapter = make_lora(tiny_sdxl, tmp_path / "lora", rank=4, alpha=8, info={"base_model": str(tiny_sdxl)})
    out = tmp_path / "lora_kohya.safetensors"
    proc = subprocess.run([sys.executable, "-m", "diffplat", "export-lora", str(adapter), "--format", "kohya",
                           "--out", str(out)], capture_output=True, text=True, env=os.environ.copy(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith("lora_down.weight") for k in keys) and alphas == {8.0}  # the real alpha, not the rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0" and meta["ss_sd_model_name"] == str(tiny_sdxl)

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
