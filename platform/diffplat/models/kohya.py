"""SDXL LoRAs in kohya's single-file format, named as kohya's scripts name SDXL's modules.

kohya's sd-scripts (and the front ends that read their files: ComfyUI, A1111, Forge) build the SDXL
UNet in Stability's original layout (`input_blocks`, `middle_block`, `output_blocks`), so a LoRA
key is `lora_unet_` + that module's path with `_` for `.`:
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k`, not diffusers'
`down_blocks_1_attentions_0_...`; the text encoders' keys are `lora_te1_` (CLIP ViT-L) and
`lora_te2_` (OpenCLIP bigG) + their transformers module paths. Keys a loader cannot match are
passed over without a word, so the names are what makes the file work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Inside a ResNet block: diffusers' name -> the original layout's.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def original_unet_path(path: str, config: dict) -> str:
    """A module path of diffusers' SDXL UNet (`down_blocks.1.attentions.0.proj_in`) in the original
    layout (`input_blocks.4.1.proj_in`), from the UNet's config (blocks and layers per block)."""
    per_block = int(config.get("layers_per_block", 2))
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    for old, new in _TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]

    def resnet(rest: str) -> str:
        name, _, tail = rest.partition(".")
        return _RESNET.get(name, name) + (f".{tail}" if tail else "")

    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (per_block + 1) + layer
        return f"input_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?$", path):
        return f"input_blocks.{(int(m[1]) + 1) * (per_block + 1)}.0.op{m[2] or ''}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        kind, layer, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * layer}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * (per_block + 1) + layer
        return f"output_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..+)?$", path):
        block = int(m[1])
        with_attention = "CrossAttn" in config["up_block_types"][block]
        return f"output_blocks.{block * (per_block + 1) + per_block}.{2 if with_attention else 1}.conv{m[2] or ''}"
    raise ValueError(f"{path}: not a module of an SDXL UNet")


def export_kohya(adapter: str | Path, out: str | Path) -> Path:
    """The single-file LoRA that kohya's scripts and the SDXL front ends load: keys named in the
    original layout (`lora_unet_input_blocks_...`, `lora_te1_`, `lora_te2_`), `.alpha` per module,
    kohya's header keys (`ss_network_dim`, `ss_network_alpha`, `ss_base_model_version`,
    `modelspec.*`).

    diffusers' converter writes alpha = rank for every module; each part's real alpha (from how it
    was saved) is written over it, or the front ends would scale it wrongly."""
    import tempfile

    import torch
    from diffusers.utils import convert_state_dict_to_kohya, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from diffplat.fileio import write_bytes_atomic
    from diffplat.models.families import family_of
    from diffplat.models.lora import WEIGHTS_NAME, LoraFileError, adapter_info, lora_location

    folder, weight_name = lora_location(str(adapter))
    path = Path(folder) / (weight_name or WEIGHTS_NAME)
    if not path.is_file():
        raise LoraFileError(f"{adapter}: no {WEIGHTS_NAME} to export")
    info = adapter_info(str(adapter))
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    layers = load_file(str(path))
    parts = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    for key, value in layers.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise LoraFileError(f"{adapter}: {key} belongs to none of unet, text_encoder, text_encoder_2 (kohya's "
                                "format here is SDXL's)")  # fmt: skip
        parts[prefix][rest] = value
    unet_config = _unet_config(info.get("base_model"), adapter, family_of)
    peft = {}
    for key, value in convert_unet_state_dict_to_peft(parts["unet"]).items():
        module, _, tail = key.rpartition(".lora_")
        peft[f"unet.{original_unet_path(module, unet_config)}.lora_{tail}"] = value
    for encoder in ("text_encoder", "text_encoder_2"):
        if parts[encoder]:
            peft.update({f"{encoder}.{k}": v for k, v in convert_state_dict_to_peft(parts[encoder]).items()})
    kohya = convert_state_dict_to_kohya(peft)
    # The LoraConfig of each part, keys prefixed with its name ("unet.r", "text_encoder.lora_alpha").
    saved = json.loads(header.get("lora_adapter_metadata", "{}"))
    configs = {name: {k.removeprefix(f"{name}."): v for k, v in saved.items() if k.startswith(f"{name}.")}
               for name in parts}  # fmt: skip
    unet = configs["unet"]
    rank = int(unet.get("r") or info.get("rank") or next(v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")))
    alpha = float(unet.get("lora_alpha") or info.get("alpha") or rank)
    kohya_prefixes = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        part = next(configs[name] for prefix, name in kohya_prefixes.items() if key.startswith(prefix))
        kohya[key] = torch.tensor(float(part.get("lora_alpha") or alpha))
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_sd_model_name": str(info.get("base_model", "")),
        "ss_output_name": Path(out).stem,
        "ss_network_train_unet_only": str(not (parts["text_encoder"] or parts["text_encoder_2"])),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": Path(out).stem,
        "diffplat.kind": str(info.get("kind", "lora")),
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_file(kohya, str(Path(tmp) / "lora.safetensors"), metadata=metadata)
        write_bytes_atomic(Path(out), (Path(tmp) / "lora.safetensors").read_bytes())
    return Path(out)


def _unet_config(base_model: str | None, adapter, family_of) -> dict:
    """The UNet config of the LoRA's base (its blocks place the original layout's indices); SDXL's
    own when the base is not at hand (a hub id offline), which every SDXL fine-tune shares."""
    from diffplat.models.lora import LoraFileError

    if base_model and Path(base_model).is_dir():
        family = family_of(base_model)
        if family.name != "sdxl":
            raise LoraFileError(f"{adapter}: made on a {family.name} base; kohya's format here is SDXL's")
        local = Path(base_model) / "unet" / "config.json"
        if local.is_file():
            return json.loads(local.read_text())
    return {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
