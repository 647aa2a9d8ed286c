"""Stable Diffusion XL (and its inpainting variant): a UNet with two CLIP text encoders.

Conditioning is the two encoders' penultimate hidden states side by side (in 77-token windows
for long captions, models/text.py), the second encoder's pooled projection, and SDXL's six
"time ids" (original size, crop corner, target size). Training noises with DDPM's schedule and
predicts epsilon or velocity.
"""

from __future__ import annotations

import torch

from diffplat.models.families.base import Family, Parts, Prompts
from diffplat.models.loading import source_kwargs
from diffplat.models.lora import SDXL_TARGETS

INPAINT_CHANNELS = 9  # noisy latents (4) + mask (1) + masked-image latents (4)


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    width, height = target
    target_hw = torch.tensor([height, width], dtype=original_size.dtype).expand(original_size.shape[0], 2)
    return torch.cat([original_size, crop_top_left, target_hw], dim=1)


class SDXL(Family):
    name = "sdxl"
    class_prefix = "StableDiffusionXL"
    denoiser = "unet"
    denoiser_title = "UNet"
    inpainting_example = "e.g. diffusers/stable-diffusion-xl-1.0-inpainting-0.1, 9 input channels"
    lora_targets = SDXL_TARGETS  # diffusers' SDXL scripts: attention
    controlnets = True
    ddpm_timesteps = True
    inpaint_extras = {"requires_aesthetics_score": False}  # SDXL base's inpainting: no aesthetic score ids

    def load(self, base_model, vae=None, variant=None, encoders=True) -> Parts:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        kw = source_kwargs(base_model, variant)
        return Parts(
            denoiser=UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **kw),
            # Training adds noise with DDPM's schedule, from the base model's own scheduler config.
            noise_scheduler=DDPMScheduler.from_pretrained(base_model, subfolder="scheduler",
                                                          local_files_only=kw["local_files_only"]),  # fmt: skip
            **(self.load_encoders(base_model, vae, variant) if encoders else {}),
        )

    def load_encoders(self, base_model, vae=None, variant=None) -> dict:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from diffplat.models.loading import load_vae

        kw = source_kwargs(base_model, variant)
        tok_kw = {"local_files_only": kw["local_files_only"]}
        return {
            "tokenizers": (CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", **tok_kw),
                           CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer_2", **tok_kw)),
            "text_encoders": (CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", **kw),
                              CLIPTextModelWithProjection.from_pretrained(base_model, subfolder="text_encoder_2", **kw)),
            "vae": load_vae(base_model, vae, variant),
        }  # fmt: skip

    def encode_prompts(self, tokenizers, text_encoders, captions, device, max_tokens) -> Prompts:
        from diffplat.models.text import encode_prompts

        return Prompts(*encode_prompts(tokenizers, text_encoders, captions, device, max_tokens))

    def prompt_windows(self, tokenizers, captions, max_tokens) -> list[int]:
        from diffplat.models.text import window_counts

        return window_counts(tokenizers[0], captions, max_tokens)

    def size_conditioning(self, original, crop, target) -> dict:
        return {"time_ids": time_ids(original, crop, target)}

    def lora_text_encoders(self, parts) -> dict:
        return dict(zip(self.text_encoder_names, parts.text_encoders))  # both CLIPs, as diffusers' SDXL script

    def sampler(self, scheduler):
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_config(scheduler.config)  # SDXL's own sampler, with the training schedule

    def noising(self, scheduler, config):
        from diffplat.train.noising import DDPMNoising, timestep_weights

        if config.prediction_type:  # diffusers' --prediction_type
            scheduler.register_to_config(prediction_type=config.prediction_type)
        weights = timestep_weights(config.timestep_bias, scheduler.config.num_train_timesteps)
        return DDPMNoising(scheduler, scheduler.config.prediction_type, config.snr_gamma, weights)

    @staticmethod
    def added_cond(prompts: Prompts, extra: dict, dtype) -> dict:
        return {"text_embeds": prompts.pooled.to(dtype), "time_ids": extra["time_ids"].to(dtype)}

    def predict(self, model, latents, t, prompts, extra, **unet_kwargs):
        dtype = next(model.parameters()).dtype
        return model(latents.to(dtype), t, encoder_hidden_states=prompts.embeds.to(dtype),
                     added_cond_kwargs=self.added_cond(prompts, extra, dtype), return_dict=False, **unet_kwargs)[0]  # fmt: skip

    def controlnet_predict(self, controlnet, unet, latents, t, prompts, extra, cond_pixels) -> torch.Tensor:
        """The frozen UNet's prediction with the trained ControlNet's residuals added."""
        dtype = next(controlnet.parameters()).dtype
        down, mid = controlnet(latents.to(dtype), t, encoder_hidden_states=prompts.embeds.to(dtype),
                               controlnet_cond=cond_pixels.to(dtype), added_cond_kwargs=self.added_cond(prompts, extra, dtype),
                               return_dict=False)  # fmt: skip
        frozen = unet.dtype
        return self.predict(unet, latents, t, prompts, extra, down_block_additional_residuals=[d.to(frozen) for d in down],
                            mid_block_additional_residual=mid.to(frozen))  # fmt: skip

    def new_controlnet(self, unet, init: str | None, dtype=None, conditioning_init: str = "default"):
        """A saved ControlNet from `init`, or one copied from the UNet's encoder (its zero
        convolutions make it start as a no-op)."""
        from diffusers import ControlNetModel

        if init:
            return ControlNetModel.from_pretrained(init, **({"torch_dtype": dtype} if dtype else {}), **source_kwargs(init))
        controlnet = ControlNetModel.from_unet(unet)
        if conditioning_init == "kaiming":
            kaiming_conditioning_embedding(controlnet.controlnet_cond_embedding)
        return controlnet

    def inpaint_input(self, noisy, latent_mask, pixel_mask, masked_latents):
        return torch.cat([noisy, latent_mask.to(noisy.dtype), masked_latents.to(noisy.dtype)], dim=1)

    def is_inpainting(self, denoiser: dict) -> bool:
        return denoiser["in_channels"] == INPAINT_CHANNELS

    def prompt_kwargs(self, pipe, prompts, negatives, max_tokens) -> dict:
        """Plain prompts for one CLIP window (the pipeline encodes them itself, as stock diffusers
        does); embeddings of several windows, encoded as in training, for longer captions."""
        if max_tokens <= 75:
            return {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}
        from diffplat.models.text import pipeline_prompt_embeds

        return pipeline_prompt_embeds(pipe, prompts, negatives, max_tokens)

    def adapter_scale_kwargs(self, scale: float) -> dict:
        return {"cross_attention_kwargs": {"scale": scale}}

    def sampling_prompt_length(self, requested, adapter) -> int:
        return requested or adapter.get("max_token_length", 75)

    def pipeline_class(self, task: str, inpainting: bool = False):
        import diffusers

        return getattr(diffusers, {"text": "StableDiffusionXLPipeline", "inpaint": "StableDiffusionXLInpaintPipeline",
                                   "controlnet": "StableDiffusionXLControlNetPipeline"}[task])  # fmt: skip


def kaiming_conditioning_embedding(embedding: torch.nn.Module) -> None:
    """He-normal weights and zero biases for the conditioning embedding's convolutions before its
    last (SiLU after each). torch's default init scales each layer's output down by about 3x, so
    through eight of them two different maps come out nearly alike and the ControlNet first learns
    a map-free residual; He's keeps the signal's scale. `conv_out` is left at zero."""
    for conv in (embedding.conv_in, *embedding.blocks):
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
