"""An SDXL text-to-image model turned into an inpainting one, the way Stable Diffusion's
inpainting models began: the UNet's first convolution takes 9 channels (noisy latents, the
mask, the masked image's latents) instead of 4, the 5 new ones starting at zero. Until trained
it draws exactly as the base does; an In-Context LoRA with `conv_in` among its targets learns
to read the visible panels through them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffplat.fileio import replace_dir

EXTRA_CHANNELS = 5  # the mask (1) and the masked image's latents (4)


def inpainting_variant(base_model: str, out: str | Path) -> Path:
    """Write `base_model` (an SDXL text-to-image folder or hub id) as an inpainting model to `out`."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from diffplat.models.loading import source_kwargs

    pipe = StableDiffusionXLPipeline.from_pretrained(base_model, **source_kwargs(base_model))
    unet = pipe.unet
    if unet.config.in_channels != 4:
        raise ValueError(f"{base_model}: its UNet takes {unet.config.in_channels} input channels, not 4: "
                         "already an inpainting model?")  # fmt: skip
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": 4 + EXTRA_CHANNELS})
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], EXTRA_CHANNELS, *weight.shape[2:])], 1)
    wide.load_state_dict(state)
    components = {k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "text_encoder_2",
                                                                       "tokenizer", "tokenizer_2", "scheduler")}  # fmt: skip
    inpaint = StableDiffusionXLInpaintPipeline(unet=wide, requires_aesthetics_score=False, **components)
    out = Path(out)
    with replace_dir(out, "model") as tmp:
        inpaint.save_pretrained(tmp, safe_serialization=True)
    return out
