"""What is trained and how its loss is computed, per adapter kind.

The training loop (loop.py) is the same for every kind; an objective supplies the module to
optimise, the loss for one batch, and how the adapter is saved.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import torch

from diffplat.config import TrainConfig
from diffplat.data.composites import Layout, panel_mask
from diffplat.models.loading import DTYPES, load_encoders, load_sdxl_parts
from diffplat.models.lora import TEXT_ENCODER_TARGETS, add_lora, save_lora
from diffplat.models.text import encode_prompts

log = logging.getLogger("diffplat")


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    width, height = target
    target_hw = torch.tensor([height, width], dtype=original_size.dtype).expand(original_size.shape[0], 2)
    return torch.cat([original_size, crop_top_left, target_hw], dim=1)


class DiffusionObjective:
    """What every kind shares: frozen text encoders and VAE, SDXL's conditioning, noise and
    timesteps, the loss. A kind says what trains (`module`), what the UNet sees, and how the
    result is saved. With `train.cache`, latents and embeddings come from the cache and the VAE
    and text encoders are not loaded (`parts` holds None for them)."""

    def __init__(self, config: TrainConfig, device: torch.device):
        from diffplat.data.cache import CachedInputs

        self.config = config
        self.device = device
        self.cache = CachedInputs(config.cache, device) if config.cache else None
        self.parts = load_sdxl_parts(config.base_model, config.vae, config.variant, encoders=self.cache is None)
        self.weight_dtype = DTYPES[config.mixed_precision]
        if self.cache is None:
            self._freeze_encoders()
        self.scheduler = self.parts.noise_scheduler
        if config.prediction_type:  # diffusers' --prediction_type
            self.scheduler.register_to_config(prediction_type=config.prediction_type)
        self.prediction_type = self.scheduler.config.prediction_type
        # Caption dropout draws from its own generator (the loop seeded torch with seed + rank).
        self.caption_rng = torch.Generator().manual_seed(torch.initial_seed() + 104729)

    def _freeze_encoders(self) -> None:
        for frozen in (self.parts.text_encoder, self.parts.text_encoder_2):
            frozen.requires_grad_(False).to(self.device, self.weight_dtype).eval()
        # The SDXL VAE overflows in fp16; keep it in fp32 unless an fp16-safe VAE is given.
        vae_dtype = self.weight_dtype if (self.config.vae and self.weight_dtype != torch.float32) else torch.float32
        self.parts.vae.requires_grad_(False).to(self.device, vae_dtype).eval()

    @property
    def module(self) -> torch.nn.Module:
        raise NotImplementedError

    def generators(self) -> dict[str, torch.Generator]:
        """The objective's own random generators, saved in checkpoints for an exact resume."""
        return {"caption": self.caption_rng}

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        latents = self.parts.vae.encode(pixels).latent_dist.sample(generator)
        return latents * self.parts.vae.config.scaling_factor

    def model_input(self, noisy: torch.Tensor, pixels: torch.Tensor, batch: dict, generator):
        """What the UNet sees and the loss weight of each latent cell (None: all alike)."""
        return noisy, None

    def predict(self, model, unet_input, t, prompt_embeds, added_cond_kwargs, batch) -> torch.Tensor:
        """The UNet's prediction; `model` is the trained module (under DeepSpeed)."""
        dtype = next(model.parameters()).dtype
        added = {k: v.to(dtype) for k, v in added_cond_kwargs.items()}
        return model(unet_input.to(dtype), t, encoder_hidden_states=prompt_embeds.to(dtype), added_cond_kwargs=added,
                     return_dict=False)[0]  # fmt: skip

    def dropped_captions(self, count: int) -> list[bool]:
        """Which captions become the empty prompt (diffusers' --proportion_empty_prompts)."""
        if not self.config.proportion_empty_prompts:
            return [False] * count
        return (torch.rand(count, generator=self.caption_rng) < self.config.proportion_empty_prompts).tolist()

    def encoded(self, batch: dict, generator: torch.Generator):
        """(latents, prompt_embeds, pooled, original_size, crop_top_left, pixels) of a batch: from
        the cache's rows (pixels None), or encoded now. Random draws in the same order both ways
        (caption dropout, then the latent sample), so one generator state gives the same step."""
        dropped = self.dropped_captions(len(batch["caption"]))
        if self.cache:
            original, crop = self.cache.sizes(batch)
            latents = self.cache.latents(batch, generator)
            return (latents, *self.cache.prompts(batch, dropped), original, crop, None)
        pixels = torch.as_tensor(batch["pixel_values"]).to(self.device, self.parts.vae.dtype)
        captions = ["" if d else str(c) for c, d in zip(batch["caption"], dropped)]
        with torch.no_grad():
            latents = self.encode_images(pixels, generator)
        with torch.set_grad_enabled(self.config.train_text_encoder):
            prompt_embeds, pooled = encode_prompts((self.parts.tokenizer, self.parts.tokenizer_2),
                                                   (self.parts.text_encoder, self.parts.text_encoder_2),
                                                   captions, self.device, self.config.max_token_length)  # fmt: skip
        original, crop = torch.as_tensor(batch["original_size"]), torch.as_tensor(batch["crop_top_left"])
        return latents, prompt_embeds, pooled, original, crop, pixels

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if self.cache and self.cache.info["conditioning"] and "conditioning" in batch:
            batch = {**batch, "conditioning_pixel_values": self.cache.conditioning(batch)}
        latents, prompt_embeds, pooled, original, crop, pixels = self.encoded(batch, generator)
        # the size trained at: the batch's own with buckets (a cache holds train.resolution)
        target = self.config.resolution if pixels is None else (pixels.shape[3], pixels.shape[2])
        ids = time_ids(original, crop, target).to(self.device)
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
        pred = self.predict(model, unet_input, t, prompt_embeds, {"text_embeds": pooled, "time_ids": ids}, batch)
        squared = (pred.float() - target.float()) ** 2
        if weights is None:
            per_sample = squared.mean(dim=(1, 2, 3))
        else:  # the weighted mean of each sample's cells
            per_sample = (squared * weights).sum((1, 2, 3)) / (weights.sum((1, 2, 3)) * squared.shape[1]).clamp_min(1e-8)
        if self.config.snr_gamma:
            per_sample = per_sample * self.snr_weights(t)
        return per_sample.mean()

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR weighting (Hang et al. 2023, diffusers' --snr_gamma): min(SNR, gamma) / SNR for
        epsilon prediction, / (SNR + 1) for v-prediction, so easy low-noise steps weigh less."""
        alphas = self.scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.config.snr_gamma)
        return clipped / (snr + 1 if self.prediction_type == "v_prediction" else snr)

    def _pipeline(self, pipeline_class, **components):
        """A sampling pipeline around the parts being trained (no copies: the live adapter).
        Trained from a cache, the VAE and text encoders are loaded at the first validation (on
        rank 0, the only one that validates) and kept for the next."""
        from diffusers import EulerDiscreteScheduler

        if self.parts.vae is None:
            log.info("train: loading the VAE and text encoders for validation images (rank 0; the cache stands "
                     "in for them in training)")  # fmt: skip
            c = self.config
            self.parts = dataclasses.replace(self.parts, **load_encoders(c.base_model, c.vae, c.variant))
            self._freeze_encoders()
        p = self.parts
        parts = dict(vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2, tokenizer=p.tokenizer,
                     tokenizer_2=p.tokenizer_2, unet=p.unet,
                     scheduler=EulerDiscreteScheduler.from_config(self.scheduler.config))  # fmt: skip
        pipe = pipeline_class(**{**parts, **components})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validation_rows(self, columns: list[str], where=None) -> list[dict]:
        """The first validation.num_images training rows (rank 0 reads them from the shards once)."""
        from diffplat.data.shards import iter_rows

        if "://" in self.config.data:
            return []
        if not hasattr(self, "_validation_rows"):
            rows = (r for r in iter_rows(Path(self.config.data), columns=columns) if where is None or where(r))
            self._validation_rows = [row for _, row in zip(range(self.config.validation.num_images), rows)]
        return self._validation_rows

    def validation_grid(self, module):
        raise NotImplementedError

    def made_how(self) -> dict:
        raise NotImplementedError


class UnetAndTextEncoders(torch.nn.Module):
    """What DeepSpeed optimises with train_text_encoder: one module holding all three, so one
    engine reduces, clips and steps every LoRA layer together. Its forward is the UNet's; the
    loss calls the text encoders itself."""

    def __init__(self, unet, text_encoder, text_encoder_2):
        super().__init__()
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


def unet_of(module: torch.nn.Module) -> torch.nn.Module:
    return module.unet if isinstance(module, UnetAndTextEncoders) else module


class LoraObjective(DiffusionObjective):
    """Text-to-image LoRA on the UNet (diffusers' train_text_to_image_lora_sdxl.py), and with
    train_text_encoder on both text encoders too (its --train_text_encoder)."""

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        self.lora_config = add_lora(self.parts.unet, config.lora)
        if config.gradient_checkpointing:
            self.parts.unet.enable_gradient_checkpointing()
        self.parts.unet.to(device)
        self.text_lora_config, self._module = None, self.parts.unet
        if config.train_text_encoder:
            settings = config.lora.model_copy(update={"target_modules": list(TEXT_ENCODER_TARGETS)})
            encoders = (self.parts.text_encoder, self.parts.text_encoder_2)
            for encoder in encoders:
                self.text_lora_config = add_lora(encoder, settings, "text encoder")
                if config.gradient_checkpointing:
                    encoder.gradient_checkpointing_enable()
                encoder.to(device).train()
            self._module = UnetAndTextEncoders(self.parts.unet, *encoders)

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def validation_grid(self, module):
        """One picture of the adapter as it is now: the validation prompts, fixed seeds (None
        without prompts)."""
        from diffusers import StableDiffusionXLPipeline

        from diffplat.pictures import grid

        v = self.config.validation
        if not v.prompts:
            return None
        pipe = self._pipeline(StableDiffusionXLPipeline, unet=unet_of(module))
        width, height = self.config.resolution
        images = [pipe(prompt, width=width, height=height, num_inference_steps=v.num_inference_steps,
                       guidance_scale=v.guidance_scale, generator=torch.Generator(self.device).manual_seed(v.seed + i)).images[0]
                  for i, prompt in enumerate(v.prompts)]  # fmt: skip
        return grid(images, columns=4, thumb_width=max(256, width))

    def made_how(self) -> dict:
        """What adapter_info.json records besides the step and the metrics."""
        return {"kind": self.config.kind, "rank": self.config.lora.rank, "alpha": self.config.lora.alpha,
                "target_modules": list(self.config.lora.target_modules), "prediction_type": self.prediction_type,
                "max_token_length": self.config.max_token_length, "use_ema": self.config.use_ema,
                "train_text_encoder": self.config.train_text_encoder}  # fmt: skip

    def save(self, model: torch.nn.Module, folder: Path, info: dict) -> Path:
        encoders = (model.text_encoder, model.text_encoder_2) if isinstance(model, UnetAndTextEncoders) else ()
        return save_lora(unet_of(model), self.lora_config, folder, {**self.made_how(), **info}, encoders,
                         self.text_lora_config)  # fmt: skip


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
        if self.cache and self.inpainting:
            raise ValueError(cache_needs_plain_unet(config.base_model))
        # Panel choices come from their own generator, so they do not shift the noise draws;
        # the loop seeded torch with seed + rank, so every worker hides different panels.
        self.panel_rng = torch.Generator().manual_seed(torch.initial_seed() + 7919)

    def generators(self) -> dict[str, torch.Generator]:
        return {**super().generators(), "panel": self.panel_rng}

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

        from diffplat.infer.panels import FillOptions, fill_panels
        from diffplat.pictures import grid

        v = self.config.validation
        pipe = self._pipeline(StableDiffusionXLInpaintPipeline, unet=unet_of(module), requires_aesthetics_score=False)
        strips = []
        for i, row in enumerate(self.validation_rows(["id", "image", "caption", "layout"])):
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


def cache_needs_plain_unet(base_model: str) -> str:
    return (f"train.cache: {base_model} has an inpainting UNet, which sees each step's masked-image latents, encoded "
            "from the pixels; a cache has none. Train it without a cache, or from a text-to-image base model")


class ControlNetObjective(DiffusionObjective):
    """A ControlNet on conditioning images (diffusers' train_controlnet_sdxl.py): initialised
    from the base UNet (or an existing ControlNet); the UNet and text encoders stay frozen."""

    def __init__(self, config: TrainConfig, device: torch.device):
        from diffusers import ControlNetModel

        from diffplat.models.loading import source_kwargs

        super().__init__(config, device)
        init = config.controlnet.init
        if init:
            self.controlnet = ControlNetModel.from_pretrained(init, **source_kwargs(init))
        else:  # copies the UNet's encoder; its zero convolutions make it start as a no-op
            self.controlnet = ControlNetModel.from_unet(self.parts.unet)
        self.parts.unet.requires_grad_(False).to(device, self.weight_dtype).eval()
        self.controlnet.train()
        if config.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        self.controlnet.to(device)

    @property
    def module(self) -> torch.nn.Module:
        return self.controlnet

    def predict(self, model, unet_input, t, prompt_embeds, added_cond_kwargs, batch) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        cond = torch.as_tensor(batch["conditioning_pixel_values"]).to(self.device, dtype)
        down, mid = model(unet_input.to(dtype), t, encoder_hidden_states=prompt_embeds.to(dtype), controlnet_cond=cond,
                          added_cond_kwargs={k: v.to(dtype) for k, v in added_cond_kwargs.items()}, return_dict=False)  # fmt: skip
        frozen = self.parts.unet.dtype
        return self.parts.unet(
            unet_input.to(frozen), t, encoder_hidden_states=prompt_embeds.to(frozen),
            added_cond_kwargs={k: v.to(frozen) for k, v in added_cond_kwargs.items()},
            down_block_additional_residuals=[d.to(frozen) for d in down], mid_block_additional_residual=mid.to(frozen),
            return_dict=False,
        )[0]  # fmt: skip

    def validation_grid(self, module):
        """Images from the first training maps and their captions: map | image, one row each."""
        from diffusers import StableDiffusionXLControlNetPipeline
        from PIL import Image

        from diffplat.data.composites import side_by_side
        from diffplat.pictures import grid

        v = self.config.validation
        rows = self.validation_rows(["id", "caption", "conditioning"], where=lambda r: r["conditioning"] is not None)
        pipe = self._pipeline(StableDiffusionXLControlNetPipeline, controlnet=module)
        width, height = self.config.resolution
        strips = []
        for i, row in enumerate(rows):
            with Image.open(io.BytesIO(row["conditioning"])) as img:
                cond = img.convert("RGB").resize((width, height), Image.NEAREST)
            image = pipe(row["caption"], image=cond, width=width, height=height, num_inference_steps=v.num_inference_steps,
                         guidance_scale=v.guidance_scale, generator=torch.Generator(self.device).manual_seed(v.seed + i)).images[0]  # fmt: skip
            strips.append(side_by_side([cond, image]))
        return grid(strips, columns=2, thumb_width=max(512, strips[0].width)) if strips else None

    def made_how(self) -> dict:
        return {"kind": "controlnet", "init": self.config.controlnet.init or "base UNet",
                "max_token_length": self.config.max_token_length, "prediction_type": self.prediction_type,
                "use_ema": self.config.use_ema,
                "proportion_empty_prompts": self.config.proportion_empty_prompts}  # fmt: skip

    def save(self, model: torch.nn.Module, folder: Path, info: dict) -> Path:
        """A diffusers `save_pretrained` folder (safetensors) + adapter_info.json."""
        import json

        from diffplat.fileio import replace_dir
        from diffplat.models.lora import INFO_NAME

        with replace_dir(Path(folder), "adapter", (INFO_NAME,)) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            (tmp / INFO_NAME).write_text(json.dumps({**self.made_how(), **info}, indent=2, default=str) + "\n")
        return Path(folder)


OBJECTIVES = {"lora": LoraObjective, "ic_lora": IcLoraObjective, "controlnet": ControlNetObjective}
