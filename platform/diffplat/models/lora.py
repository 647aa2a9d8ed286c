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


def export_kohya(adapter: str | Path, out: str | Path) -> Path:
    """The single-file LoRA that kohya's scripts and the common SDXL front ends load
    (`lora_unet_...` keys, `.alpha` per module, rank/alpha/base model in the header).

    diffusers' converter writes alpha = rank for every module; the adapter's real alpha (from
    how it was saved) is written over it, or the front ends would scale it wrongly."""
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from diffplat.fileio import write_bytes_atomic

    folder, weight_name = lora_location(str(adapter))
    path = Path(folder) / (weight_name or WEIGHTS_NAME)
    if not path.is_file():
        raise LoraFileError(f"{adapter}: no {WEIGHTS_NAME} to export")
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    layers = load_file(str(path))
    unknown = sorted({k.split(".")[0] for k in layers} - {"unet"})
    if unknown:
        raise LoraFileError(f"{adapter}: only UNet LoRAs export to kohya so far; found {unknown[0]}.* keys")
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in layers.items()})
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft.items()})
    saved = json.loads(header.get("lora_adapter_metadata", "{}"))  # the LoraConfig, keys prefixed "unet."
    config = {k.removeprefix("unet."): v for k, v in saved.items() if k.startswith("unet.")}
    info = adapter_info(str(adapter))
    rank = int(config.get("r") or info.get("rank") or next(v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")))
    alpha = float(config.get("lora_alpha") or info.get("alpha") or rank)
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(alpha)
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": str(info.get("base_model", "")),
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "diffplat.kind": str(info.get("kind", "lora")),
    }
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_file(kohya, str(Path(tmp) / "lora.safetensors"), metadata=metadata)
        write_bytes_atomic(Path(out), (Path(tmp) / "lora.safetensors").read_bytes())
    return Path(out)
