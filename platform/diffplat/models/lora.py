"""LoRA on a base model's denoiser (and optionally its text encoders), saved in the file format
stock diffusers `load_lora_weights` reads for that model's family."""

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


def weights_name(folder: Path) -> str | None:
    """The LoRA file of an adapter folder: diffplat's, or ai-toolkit's <name>.safetensors."""
    for name in (WEIGHTS_NAME, f"{folder.name}.safetensors"):
        if (folder / name).is_file():
            return name
    return None


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
    if p.is_dir() and (p / "adapter" / WEIGHTS_NAME).is_file():  # a diffplat training checkpoint
        return str(p / "adapter"), None
    if p.is_dir() and not (p / WEIGHTS_NAME).is_file():
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return str(p), found[0].name
        if name := weights_name(p):  # ai-toolkit's output: <name>/<name>.safetensors + step saves
            return str(p), name
        raise LoraFileError(f"{path}: no {WEIGHTS_NAME} (nor one other .safetensors file) in this folder")
    if not p.is_dir() and (p.is_absolute() or path.startswith(".") or path.count("/") != 1):
        raise LoraFileError(f"{path}: no such LoRA file or folder")
    return str(p) if p.is_dir() else path, None


def adapter_info(path: str) -> dict:
    """The adapter_info.json written beside a LoRA at training time ({} if there is none)."""
    p = Path(path)
    info = (p if p.is_dir() else p.parent) / INFO_NAME
    return json.loads(info.read_text()) if info.is_file() else {}


# diffusers' SDXL scripts: the UNet's attention projections
SDXL_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def peft_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian",
        target_modules=list(settings.target_modules or SDXL_TARGETS),
    )


# diffusers' train_text_to_image_lora_sdxl.py --train_text_encoder: CLIP's attention projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_lora(model: torch.nn.Module, settings: LoraSettings, what: str = "UNet"):
    """Freeze `model` (the denoiser or a text encoder) and add trainable LoRA layers; returns the
    LoraConfig used."""
    from peft import inject_adapter_in_model

    config = peft_config(settings)
    model.requires_grad_(False)
    # peft's own injection: transformers' add_adapter (the text encoders') demands a newer peft.
    inject_adapter_in_model(config, model, adapter_name="default")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"lora.target_modules {settings.target_modules} matched no layer of the {what}")
    for p in trainable:  # LoRA weights train in fp32 even when the UNet runs in bf16/fp16
        p.data = p.data.float()
    return config


def _layers(model: torch.nn.Module, peft_keys: bool = False) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `model`: peft's keys (`lora_A`/`lora_B`), or converted to diffusers'
    older ones (`lora.down`/`lora.up`) as diffusers' SDXL scripts save them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model)
    layers = layers if peft_keys else convert_state_dict_to_diffusers(layers)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}


def save_lora(family, denoiser: torch.nn.Module, lora_config, folder: Path, info: dict, text_encoders: dict | None = None,
              text_lora_config=None) -> Path:  # fmt: skip
    """Write the family's LoRA file (`pytorch_lora_weights.safetensors`, as its pipeline's
    `save_lora_weights` writes it) + `adapter_info.json`, replacing `folder` atomically;
    `text_encoders` ({pipeline name: encoder}, LoRA-trained) go in the same file."""
    # Without the metadata a reload assumes alpha == rank and the images change.
    text = {name: _layers(encoder, family.peft_lora_keys) for name, encoder in (text_encoders or {}).items()}
    with replace_dir(Path(folder), "adapter", (INFO_NAME,)) as tmp:
        family.save_lora(tmp, _layers(denoiser, family.peft_lora_keys), lora_config.to_dict(), text,
                         text_lora_config.to_dict() if text_lora_config else None)  # fmt: skip
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return Path(folder)
