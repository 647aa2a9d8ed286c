"""Load SDXL parts the way a real SDXL loads: a hub id or a local diffusers folder.

A local folder loads with `local_files_only=True`; weights load from safetensors only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES = {"no": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def source_kwargs(model: str, variant: str | None = None) -> dict:
    local = os.path.isdir(model)
    kwargs = {"use_safetensors": True, "local_files_only": local or os.environ.get("HF_HUB_OFFLINE") == "1"}
    if variant:
        kwargs["variant"] = variant
    return kwargs


@dataclass
class SDXLParts:
    """What a training step needs; the text encoders and VAE stay frozen. Training from a cache
    loads only the UNet and the noise scheduler: the other parts are None."""

    unet: torch.nn.Module
    noise_scheduler: object
    tokenizer: object = None
    tokenizer_2: object = None
    text_encoder: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None


def load_vae(base_model: str, vae: str | None, variant: str | None = None):
    from diffusers import AutoencoderKL

    if vae:  # a standalone VAE folder or hub id, e.g. an fp16-safe SDXL VAE
        return AutoencoderKL.from_pretrained(vae, **source_kwargs(vae))
    return AutoencoderKL.from_pretrained(base_model, subfolder="vae", **source_kwargs(base_model, variant))


def load_encoders(base_model: str, vae: str | None = None, variant: str | None = None) -> dict:
    """The parts that turn captions and pixels into what the UNet sees: both tokenizers and text
    encoders, and the VAE (SDXLParts' field names)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = source_kwargs(base_model, variant)
    tok_kw = {"local_files_only": kw["local_files_only"]}
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", **tok_kw),
        "tokenizer_2": CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer_2", **tok_kw),
        "text_encoder": CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", **kw),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(base_model, subfolder="text_encoder_2", **kw),
        "vae": load_vae(base_model, vae, variant),
    }


def load_sdxl_parts(base_model: str, vae: str | None = None, variant: str | None = None,
                    encoders: bool = True) -> SDXLParts:  # fmt: skip
    """The UNet and the noise scheduler, and with `encoders` (not from a cache) load_encoders' parts."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    kw = source_kwargs(base_model, variant)
    return SDXLParts(
        unet=UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **kw),
        # Training adds noise with DDPM's schedule, from the base model's own scheduler config.
        noise_scheduler=DDPMScheduler.from_pretrained(base_model, subfolder="scheduler",
                                                      local_files_only=kw["local_files_only"]),  # fmt: skip
        **(load_encoders(base_model, vae, variant) if encoders else {}),
    )


def load_pipeline(base_model: str, vae: str | None = None, variant: str | None = None, dtype=torch.float32,
                  pipeline_class=None, scheduler: str = "default", lora: str | None = None,
                  loras: list[tuple[str, float]] = (), **components):  # fmt: skip
    """An SDXL pipeline of `pipeline_class` (text-to-image by default; inpainting, ControlNet),
    with an optional VAE override, sampler and LoRA; `components` go to from_pretrained (a
    ControlNet, requires_aesthetics_score, ...). One loader for bulk jobs and the HTTP API."""
    from diffusers import StableDiffusionXLPipeline

    from diffplat.models.lora import lora_location

    weights = lora_location(lora) if lora else None  # a pickle is refused before anything loads
    several = [(lora_location(path), scale) for path, scale in loras]
    extra = {"vae": load_vae(base_model, vae, variant)} if vae else {}
    pipe = (pipeline_class or StableDiffusionXLPipeline).from_pretrained(
        base_model, torch_dtype=dtype, **source_kwargs(base_model, variant), **extra, **components
    )
    set_scheduler(pipe, scheduler)
    if weights:
        pipe.load_lora_weights(weights[0], weight_name=weights[1])
        match_prediction_type(pipe, lora)
    if several:  # each its own adapter, mixed with its own weight
        for i, ((folder, weight_name), _) in enumerate(several):
            pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=f"lora_{i}")
        pipe.set_adapters([f"lora_{i}" for i in range(len(several))], adapter_weights=[s for _, s in several])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def match_prediction_type(pipe, adapter: str) -> None:
    """An adapter trained with another prediction_type (v_prediction on an epsilon base) samples
    with the one it learnt, as recorded in its adapter_info.json."""
    from diffplat.models.lora import adapter_info

    learnt = adapter_info(adapter).get("prediction_type")
    if learnt and learnt != pipe.scheduler.config.get("prediction_type"):
        pipe.scheduler.register_to_config(prediction_type=learnt)


SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def set_scheduler(pipe, name: str) -> None:
    """Swap the sampler, keeping the model's noise schedule."""
    if name != "default":
        pipe.scheduler = scheduler_like(pipe.scheduler, name)


def scheduler_like(base, name: str = "default", prediction_type: str | None = None):
    """A sampler with `base`'s noise schedule: `name` ("default": base's own kind), predicting
    `prediction_type` (None: what base predicts)."""
    import diffusers

    kind = type(base) if name == "default" else getattr(diffusers, SCHEDULERS[name])
    return kind.from_config(base.config, **({"prediction_type": prediction_type} if prediction_type else {}))
