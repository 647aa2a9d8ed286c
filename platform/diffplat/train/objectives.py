"""What is trained and how its loss is computed, per adapter kind.

The training loop (loop.py) is the same for every kind; an objective supplies the module to
optimise, the loss for one batch, and how the adapter is saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from diffplat.config import TrainConfig
from diffplat.models.loading import DTYPES, SDXLParts, load_sdxl_parts
from diffplat.models.lora import add_lora, save_lora


def encode_captions(parts: SDXLParts, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning: both encoders' penultimate layers side by side, and the
    second encoder's pooled projection."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
    return torch.cat(hidden, dim=-1), pooled


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    width, height = target
    target_hw = torch.tensor([height, width], dtype=original_size.dtype).expand(original_size.shape[0], 2)
    return torch.cat([original_size, crop_top_left, target_hw], dim=1)


class LoraObjective:
    """Text-to-image LoRA on the UNet (diffusers' train_text_to_image_lora_sdxl.py)."""

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config = config
        self.device = device
        self.parts = load_sdxl_parts(config.base_model, config.vae, config.variant)
        weight_dtype = DTYPES[config.mixed_precision]
        for frozen in (self.parts.text_encoder, self.parts.text_encoder_2):
            frozen.requires_grad_(False).to(device, weight_dtype).eval()
        # The SDXL VAE overflows in fp16; keep it in fp32 unless an fp16-safe VAE is given.
        vae_dtype = weight_dtype if (config.vae and weight_dtype != torch.float32) else torch.float32
        self.parts.vae.requires_grad_(False).to(device, vae_dtype).eval()
        self.lora_config = add_lora(self.parts.unet, config.lora)
        if config.gradient_checkpointing:
            self.parts.unet.enable_gradient_checkpointing()
        self.parts.unet.to(device)
        self.scheduler = self.parts.noise_scheduler
        self.prediction_type = self.scheduler.config.prediction_type

    @property
    def module(self) -> torch.nn.Module:
        return self.parts.unet

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pixels = torch.as_tensor(batch["pixel_values"]).to(self.device, self.parts.vae.dtype)
        captions = [str(c) for c in batch["caption"]]
        with torch.no_grad():
            latents = self.parts.vae.encode(pixels).latent_dist.sample(generator)
            latents = latents * self.parts.vae.config.scaling_factor
            prompt_embeds, pooled = encode_captions(self.parts, captions, self.device)
        ids = time_ids(torch.as_tensor(batch["original_size"]), torch.as_tensor(batch["crop_top_left"]),
                       self.config.resolution).to(self.device)  # fmt: skip
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.config.noise_offset:
            noise += self.config.noise_offset * torch.randn(
                (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
            )
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device).long()
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, t)
        dtype = next(model.parameters()).dtype
        pred = model(
            noisy.to(dtype),
            t,
            encoder_hidden_states=prompt_embeds.to(dtype),
            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)},
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), target.float())

    def save(self, model: torch.nn.Module, folder: Path, info: dict) -> Path:
        lora = {"rank": self.config.lora.rank, "alpha": self.config.lora.alpha,
                "target_modules": list(self.config.lora.target_modules)}  # fmt: skip
        return save_lora(model, self.lora_config, folder, {"kind": "lora", **lora, **info})


OBJECTIVES = {"lora": LoraObjective}
