"""Load models the way real ones load: a hub id or a local diffusers folder.

A local folder loads with `local_files_only=True`; weights load from safetensors only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"no": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def source_kwargs(model: str, variant: str | None = None) -> dict:
    local = os.path.isdir(model)
    kwargs = {"use_safetensors": True, "local_files_only": local or os.environ.get("HF_HUB_OFFLINE") == "1"}
    if variant:
        kwargs["variant"] = variant
    return kwargs


def load_vae(base_model: str, vae: str | None, variant: str | None = None):
    from diffusers import AutoencoderKL

    if vae:  # a standalone VAE folder or hub id, e.g. an fp16-safe SDXL VAE
        return AutoencoderKL.from_pretrained(vae, **source_kwargs(vae))
    return AutoencoderKL.from_pretrained(base_model, subfolder="vae", **source_kwargs(base_model, variant))


def local_folder(model: str) -> str:
    """A hub id's snapshot (from the hub cache when offline), or the folder itself."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1",
                             allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"])  # fmt: skip


def complete_model(folder: Path, base_model: str, trained: str, vae: str | None = None) -> None:
    """Make `folder`, which holds a fully fine-tuned `trained` component (e.g. unet/), a whole
    model: the base's other components beside it (the VAE trained with, if one was given), so
    the result loads as any base_model does."""
    import shutil

    base = Path(local_folder(base_model))
    for entry in base.iterdir():
        if entry.name in (trained, "adapter_info.json") or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, folder / entry.name, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, folder / entry.name)
    if vae:
        shutil.rmtree(folder / "vae", ignore_errors=True)
        shutil.copytree(local_folder(vae), folder / "vae", ignore=shutil.ignore_patterns(".*"))
    _schedule_what_was_learnt(folder)


def _schedule_what_was_learnt(folder: Path) -> None:
    """A denoiser fine-tuned to another prediction_type (v_prediction from an epsilon base) samples
    right only if the whole model's scheduler says so: diffusers' full fine-tune script saves the
    base's scheduler unchanged, and the model then denoises with the wrong formula."""
    import json

    from diffplat.fileio import write_json_atomic
    from diffplat.models.lora import adapter_info

    config = folder / "scheduler" / "scheduler_config.json"
    learnt = adapter_info(str(folder)).get("prediction_type")
    if not learnt or not config.is_file():
        return
    settings = json.loads(config.read_text())
    if "prediction_type" in settings and settings["prediction_type"] != learnt:  # flow matching has none
        write_json_atomic(config, {**settings, "prediction_type": learnt})


def load_pipeline(base_model: str, vae: str | None = None, variant: str | None = None, dtype=torch.float32,
                  task: str = "text", scheduler: str = "default", lora: str | None = None,
                  loras: list[tuple[str, float]] = (), **components):  # fmt: skip
    """The base model's family's pipeline for `task` ("text", "inpaint", "controlnet"), with an
    optional VAE override, sampler and LoRA; `components` go to from_pretrained (a ControlNet,
    ...). One loader for bulk jobs and the HTTP API."""
    from diffplat.models.families import family_of
    from diffplat.models.lora import lora_location

    family = family_of(base_model)

    weights = lora_location(lora) if lora else None  # a pickle is refused before anything loads
    several = [(lora_location(path), scale) for path, scale in loras]
    extra = {"vae": load_vae(base_model, vae, variant)} if vae else {}
    inpainting = task == "inpaint" and family.is_inpainting(family.denoiser_config(base_model))
    pipe = family.pipeline_class(task, inpainting).from_pretrained(
        base_model, torch_dtype=dtype, **source_kwargs(base_model, variant), **extra,
        **(family.inpaint_extras if task == "inpaint" else {}), **components
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

    learnt, base = adapter_info(adapter).get("prediction_type"), pipe.scheduler.config.get("prediction_type")
    if learnt and base and learnt != base:  # (a flow-matching sampler, FLUX's, has no prediction_type to switch)
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
