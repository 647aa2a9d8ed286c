"""LoRA on the SDXL UNet, saved in the file format stock diffusers `load_lora_weights` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffplat.config import LoraSettings
from diffplat.fileio import replace_dir

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
INFO_NAME = "adapter_info.json"


def peft_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian",
        target_modules=list(settings.target_modules),
    )


def add_lora(unet: torch.nn.Module, settings: LoraSettings):
    """Freeze the UNet and add trainable LoRA layers; returns the LoraConfig used."""
    config = peft_config(settings)
    unet.requires_grad_(False)
    unet.add_adapter(config)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"lora.target_modules {settings.target_modules} matched no layer of the UNet")
    for p in trainable:  # LoRA weights train in fp32 even when the UNet runs in bf16/fp16
        p.data = p.data.float()
    return config


def save_lora(unet: torch.nn.Module, lora_config, folder: Path, info: dict) -> Path:
    """Write `pytorch_lora_weights.safetensors` + `adapter_info.json`, replacing `folder` atomically."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    with replace_dir(Path(folder)) as tmp:
        StableDiffusionXLPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=layers,
            # Without the metadata a reload assumes alpha == rank and the images change.
            unet_lora_adapter_metadata=lora_config.to_dict(),
            safe_serialization=True,
        )
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return Path(folder)
