"""What is trained and how its loss is computed, per adapter kind.

The training loop (loop.py) is the same for every kind; an objective supplies the module to
optimise, the loss for one batch, and how the adapter is saved.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffplat.config import TrainConfig
from diffplat.data.composites import Layout, panel_mask
from diffplat.models.loading import DTYPES, SDXLParts, load_sdxl_parts
from diffplat.models.lora import add_lora, save_lora
from diffplat.models.text import encode_prompts


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

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        latents = self.parts.vae.encode(pixels).latent_dist.sample(generator)
        return latents * self.parts.vae.config.scaling_factor

    def model_input(self, noisy: torch.Tensor, pixels: torch.Tensor, batch: dict, generator):
        """What the UNet sees and the loss weight of each latent cell (None: all alike)."""
        return noisy, None

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pixels = torch.as_tensor(batch["pixel_values"]).to(self.device, self.parts.vae.dtype)
        captions = [str(c) for c in batch["caption"]]
        with torch.no_grad():
            latents = self.encode_images(pixels, generator)
            prompt_embeds, pooled = encode_prompts((self.parts.tokenizer, self.parts.tokenizer_2),
                                                   (self.parts.text_encoder, self.parts.text_encoder_2),
                                                   captions, self.device, self.config.max_token_length)  # fmt: skip
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
        with torch.no_grad():
            unet_input, weights = self.model_input(noisy, pixels, batch, generator)
        dtype = next(model.parameters()).dtype
        pred = model(
            unet_input.to(dtype),
            t,
            encoder_hidden_states=prompt_embeds.to(dtype),
            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)},
            return_dict=False,
        )[0]
        if weights is None:
            return F.mse_loss(pred.float(), target.float())
        squared = (pred.float() - target.float()) ** 2
        return (squared * weights).sum() / (weights.sum() * squared.shape[1]).clamp_min(1e-8)

    def _pipeline(self, module, pipeline_class, **extra):
        """A sampling pipeline around the parts being trained (no copies: the live adapter)."""
        from diffusers import EulerDiscreteScheduler

        p = self.parts
        pipe = pipeline_class(vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2,
                              tokenizer=p.tokenizer, tokenizer_2=p.tokenizer_2, unet=module,
                              scheduler=EulerDiscreteScheduler.from_config(self.scheduler.config), **extra)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validation_grid(self, module):
        """One picture of the adapter as it is now: the validation prompts, fixed seeds (None
        without prompts)."""
        from diffusers import StableDiffusionXLPipeline

        from diffplat.pictures import grid

        v = self.config.validation
        if not v.prompts:
            return None
        pipe = self._pipeline(module, StableDiffusionXLPipeline)
        width, height = self.config.resolution
        images = [pipe(prompt, width=width, height=height, num_inference_steps=v.num_inference_steps,
                       guidance_scale=v.guidance_scale, generator=torch.Generator(self.device).manual_seed(v.seed + i)).images[0]
                  for i, prompt in enumerate(v.prompts)]  # fmt: skip
        return grid(images, columns=4, thumb_width=max(256, width))

    def made_how(self) -> dict:
        """What adapter_info.json records besides the step and the metrics."""
        return {"kind": self.config.kind, "rank": self.config.lora.rank, "alpha": self.config.lora.alpha,
                "target_modules": list(self.config.lora.target_modules),
                "max_token_length": self.config.max_token_length}  # fmt: skip

    def save(self, model: torch.nn.Module, folder: Path, info: dict) -> Path:
        return save_lora(model, self.lora_config, folder, {**self.made_how(), **info})


INPAINT_CHANNELS = 9  # noisy latents (4) + mask (1) + masked-image latents (4)


class IcLoraObjective(LoraObjective):
    """In-Context LoRA on composites (sources 1 and 3).

    `composite` mode is the plain LoRA above on whole composites. `masked` mode trains an
    inpainting UNet (9 input channels) with random panels hidden: the visible panels reach it
    clean, as the masked-image latents, and the mask marks what to fill, which is exactly what
    StableDiffusionXLInpaintPipeline feeds it when filling panels later.
    """

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        self.settings = config.ic_lora
        channels = self.parts.unet.config.in_channels
        self.inpainting = channels == INPAINT_CHANNELS
        if self.settings.mode == "masked" and not self.inpainting:
            raise ValueError(needs_inpainting_unet(config.base_model, channels))
        # Panel choices come from their own generator, so they do not shift the noise draws;
        # the loop seeded torch with seed + rank, so every worker hides different panels.
        self.panel_rng = torch.Generator().manual_seed(torch.initial_seed() + 7919)

    def choose_panels(self, layout: Layout) -> list[int]:
        """Hidden panels for one sample: with mask_probability, 1..max_masked_panels of them (at
        least one stays visible); otherwise all (the model makes the whole composite from text)."""
        s = self.settings
        if s.mode == "composite" or torch.rand((), generator=self.panel_rng) >= s.mask_probability:
            return list(range(layout.panels))
        most = min(s.max_masked_panels, layout.panels - 1)
        count = int(torch.randint(1, most + 1, (), generator=self.panel_rng))
        return sorted(torch.randperm(layout.panels, generator=self.panel_rng)[:count].tolist())

    def masks(self, layouts, height: int, width: int, latent_scale: int = 8):
        """Latent-grid masks (B, 1, h, w) and pixel masks (B, 1, H, W) of the hidden panels."""
        latent, pixel, chosen = [], [], []
        for text in layouts:
            layout = Layout.parse(text)
            panels = self.choose_panels(layout)
            chosen.append(panels)
            latent.append(panel_mask(layout, panels, width // latent_scale, height // latent_scale))
            pixel.append(panel_mask(layout, panels, width, height))
        as_tensor = lambda m: torch.from_numpy(np.stack(m))[:, None].to(self.device)  # noqa: E731
        return as_tensor(latent), as_tensor(pixel), chosen

    def model_input(self, noisy, pixels, batch, generator):
        if self.settings.mode == "composite" and not self.inpainting:
            return noisy, None
        latent_mask, pixel_mask, _ = self.masks(batch["layout"], pixels.shape[2], pixels.shape[3])
        weights = latent_mask * self.settings.masked_loss_weight + (1 - latent_mask) * self.settings.visible_loss_weight
        # As the inpainting pipeline does: hidden pixels are zeroed, then encoded.
        masked_image = self.encode_images(pixels * (1 - pixel_mask.to(pixels.dtype)), generator)
        unet_input = torch.cat([noisy, latent_mask.to(noisy.dtype), masked_image.to(noisy.dtype)], dim=1)
        return unet_input, weights

    def validation_grid(self, module):
        """The first training composites with panels filled by the adapter as it is now:
        input | mask | output, one strip each, stacked."""
        from diffusers import StableDiffusionXLInpaintPipeline
        from PIL import Image

        from diffplat.data.shards import iter_rows
        from diffplat.infer.panels import FillOptions, fill_panels

        from diffplat.pictures import grid

        v = self.config.validation
        if "://" in self.config.data:
            return None
        if not hasattr(self, "_validation_rows"):
            rows = iter_rows(Path(self.config.data), columns=["id", "image", "caption", "layout"])
            self._validation_rows = [row for _, row in zip(range(v.num_images), rows)]
        pipe = self._pipeline(module, StableDiffusionXLInpaintPipeline, requires_aesthetics_score=False)
        strips = []
        for i, row in enumerate(self._validation_rows):
            layout = Layout.parse(row["layout"])
            panels = v.panels or list(range(layout.panels // 2, layout.panels))
            with Image.open(io.BytesIO(row["image"])) as img:
                composite = img.convert("RGB").resize(self.config.resolution, Image.BICUBIC)
            options = FillOptions(panels=tuple(panels), layout=str(layout), num_inference_steps=v.num_inference_steps,
                                  guidance_scale=v.guidance_scale)  # fmt: skip
            strips.append(fill_panels(pipe, composite, row["caption"], [v.seed + i], options, where=row["id"])[0].comparison)
        return grid(strips, columns=1, thumb_width=max(768, strips[0].width)) if strips else None

    def made_how(self) -> dict:
        return {**super().made_how(), "ic_lora": self.settings.model_dump(), "inpainting_unet": self.inpainting}


def needs_inpainting_unet(base_model: str, channels: int) -> str:
    return (
        f"train.ic_lora.mode masked needs an inpainting UNet ({INPAINT_CHANNELS} input channels: latents, mask, "
        f"masked-image latents), e.g. diffusers/stable-diffusion-xl-1.0-inpainting-0.1; {base_model} has "
        f"{channels}. Use mode: composite for a text-to-image base model."
    )


OBJECTIVES = {"lora": LoraObjective, "ic_lora": IcLoraObjective}
