"""LoRA on the SDXL UNet, saved in the file format stock diffusers `load_lora_weights` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffplat.config import LoraSettings
from diffplat.fileio import replace_dir

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
INFO_NAME = "adapter_info.json"


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class LoraFileError(ValueError):
    """A LoRA path that cannot be loaded: a pickle, or a folder without weights."""


def lora_location(path: str) -> tuple[str, str | None]:
    """(folder or hub id, weight file name) for `load_lora_weights`; a training output folder,
    a `checkpoint-N` folder, or a .safetensors file. Pickled files are refused, not loaded."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(
            f"{path}: a pickled LoRA ({p.suffix}) is refused, since loading it could run code. Convert it once, "
            "where you trust it: python -c \"import torch, safetensors.torch as s; "
            f"s.save_file(torch.load('{p.name}', weights_only=True), '{p.stem}.safetensors')\""
        )
    if p.is_file():
        return str(p.parent), p.name
    if p.is_dir() and not (p / WEIGHTS_NAME).is_file():
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return str(p), found[0].name
        raise LoraFileError(f"{path}: no {WEIGHTS_NAME} (nor one other .safetensors file) in this folder")
    if not p.is_dir() and (p.is_absolute() or path.startswith(".") or path.count("/") != 1):
        raise LoraFileError(f"{path}: no such LoRA file or folder")
    return str(p) if p.is_dir() else path, None


def adapter_info(path: str) -> dict:
    """The adapter_info.json written beside a LoRA at training time ({} if there is none)."""
    p = Path(path)
    info = (p if p.is_dir() else p.parent) / INFO_NAME
    return json.loads(info.read_text()) if info.is_file() else {}


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
