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
from diffplat.models.families import Prompts, family_of
from diffplat.models.loading import DTYPES
from diffplat.models.lora import TEXT_ENCODER_TARGETS, add_lora, save_lora

log = logging.getLogger("diffplat")

# Caption dropout and panel choices draw from generators of their own, seeded this far from
# torch's seed (the loop seeds torch with seed + rank): apart from the noise draws and each other.
CAPTION_SEED_OFFSET = 104729
PANEL_SEED_OFFSET = 7919


@dataclasses.dataclass
class Encoded:
    """A batch as the denoiser's inputs: latents, encoded captions, SDXL-style sizes (original
    (B, 2) and crop corner (B, 2)), and the pixels (None when read from a cache)."""

    latents: torch.Tensor
    prompts: Prompts
    original: torch.Tensor
    crop: torch.Tensor
    pixels: torch.Tensor | None


class DiffusionObjective:
    """What every kind shares: frozen text encoders and VAE, caption dropout, noise and
    timesteps, the loss. The base model's family (models/families/) supplies how it loads,
    encodes, is noised and predicts; a kind says what trains (`module`), what the denoiser sees,
    and how the result is saved. With `train.cache`, latents and embeddings come from the cache
    and the VAE and text encoders are not loaded (`parts` holds none)."""

    def __init__(self, config: TrainConfig, device: torch.device):
        from diffplat.data.cache import CachedInputs

        self.config = config
        self.device = device
        self.family = family_of(config.base_model)
        self.cache = CachedInputs(config.cache, device) if config.cache else None
        self.parts = self.family.load(config.base_model, config.vae, config.variant, encoders=self.cache is None)
        self.weight_dtype = DTYPES[config.mixed_precision]
        if self.cache is None:
            self._freeze_encoders()
        self.scheduler = self.parts.noise_scheduler
        self.noising = self.family.noising(self.scheduler, config)
        self.step_conditioning = self.family.train_conditioning(config, self.parts.denoiser.config)
        self.prediction_type = self.noising.prediction_type
        # Caption dropout draws from its own generator (the loop seeded torch with seed + rank).
        self.caption_rng = torch.Generator().manual_seed(torch.initial_seed() + CAPTION_SEED_OFFSET)

    def _freeze_encoders(self) -> None:
        for frozen in self.parts.text_encoders:
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
        return self.family.encode_images(self.parts.vae, pixels, generator)

    def model_input(self, noisy: torch.Tensor, pixels: torch.Tensor, batch: dict, generator):
        """What the denoiser sees and the loss weight of each latent cell (None: all alike)."""
        return noisy, None

    def predict(self, model, model_input, t, prompts: Prompts, extra: dict, batch) -> torch.Tensor:
        """The denoiser's prediction; `model` is the trained module (under DeepSpeed)."""
        return self.family.predict(model, model_input, t, prompts, extra)

    def dropped_captions(self, count: int) -> list[bool]:
        """Which captions become the empty prompt (diffusers' --proportion_empty_prompts)."""
        if not self.config.proportion_empty_prompts:
            return [False] * count
        return (torch.rand(count, generator=self.caption_rng) < self.config.proportion_empty_prompts).tolist()

    def encoded(self, batch: dict, generator: torch.Generator) -> Encoded:
        """A batch's latents and conditioning: from the cache's rows (no pixels), or encoded now.
        Random draws in the same order both ways (caption dropout, then the latent sample), so
        one generator state gives the same step."""
        dropped = self.dropped_captions(len(batch["caption"]))
        if self.cache:
            original, crop = self.cache.sizes(batch)
            latents = self.cache.latents(batch, generator)
            return Encoded(latents, Prompts(*self.cache.prompts(batch, dropped)), original, crop, None)
        pixels = torch.as_tensor(batch["pixel_values"]).to(self.device, self.parts.vae.dtype)
        captions = ["" if d else str(c) for c, d in zip(batch["caption"], dropped)]
        with torch.no_grad():
            latents = self.encode_images(pixels, generator)
        with torch.set_grad_enabled(self.config.train_text_encoder):
            prompts = self.family.encode_prompts(self.parts.tokenizers, self.parts.text_encoders, captions, self.device,
                                                 self.family.prompt_length(self.config))  # fmt: skip
        original, crop = torch.as_tensor(batch["original_size"]), torch.as_tensor(batch["crop_top_left"])
        return Encoded(latents, prompts, original, crop, pixels)

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if self.cache and self.cache.info["conditioning"] and "conditioning" in batch:
            batch = {**batch, "conditioning_pixel_values": self.cache.conditioning(batch)}
        e = self.encoded(batch, generator)
        latents = e.latents
        # the size trained at: the batch's own with buckets (a cache holds train.resolution)
        size = self.config.resolution if e.pixels is None else (e.pixels.shape[3], e.pixels.shape[2])
        sizes = self.family.size_conditioning(e.original, e.crop, size)
        extra = {**self.step_conditioning, **{k: v.to(self.device) for k, v in sizes.items()}}
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.config.noise_offset:
            noise += self.config.noise_offset * torch.randn(
                (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
            )
        noisy, t, target = self.noising(latents, noise, generator)
        with torch.no_grad():
            model_input, weights = self.model_input(noisy, e.pixels, batch, generator)
        pred = self.predict(model, model_input, t, e.prompts, extra, batch)
        squared = (pred.float() - target.float()) ** 2
        if weights is None:
            per_sample = squared.mean(dim=(1, 2, 3))
        else:  # the weighted mean of each sample's cells
            per_sample = (squared * weights).sum((1, 2, 3)) / (weights.sum((1, 2, 3)) * squared.shape[1]).clamp_min(1e-8)
        sample_weights = self.noising.weights(t)
        if sample_weights is not None:
            per_sample = per_sample * sample_weights
        return per_sample.mean()

    def _pipeline(self, task: str, **components):
        """A sampling pipeline of the family's `task` around the parts being trained (no copies:
        the live adapter). Trained from a cache, the VAE and text encoders are loaded at the
        first validation (on rank 0, the only one that validates) and kept for the next."""
        if self.parts.vae is None:
            log.info("train: loading the VAE and text encoders for validation images (rank 0; the cache stands "
                     "in for them in training)")  # fmt: skip
            c = self.config
            self.parts = dataclasses.replace(self.parts, **self.family.load_encoders(c.base_model, c.vae, c.variant))
            self._freeze_encoders()
        extras = self.family.inpaint_extras if task == "inpaint" else {}
        pipeline = self.family.pipeline_class(task, task == "inpaint" and self.family.is_inpainting(self.parts.denoiser.config))
        pipe = pipeline(**{**self.family.components(self.parts), "scheduler": self.family.sampler(self.scheduler),
                           **extras, **components})  # fmt: skip
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

    def validation_images(self, module) -> list:
        """Images made with the adapter as it is now (empty: nothing to draw): by default the
        validation prompts through the text-to-image pipeline with the denoiser being trained,
        fixed seeds (none without prompts)."""
        v = self.config.validation
        if not v.prompts:
            return []
        pipe = self._pipeline("text", **{self.family.denoiser: denoiser_of(module)})
        width, height = v.resolution or self.config.resolution
        return [pipe(prompt, width=width, height=height, num_inference_steps=v.num_inference_steps,
                     guidance_scale=v.guidance_scale, generator=torch.Generator(self.device).manual_seed(v.seed + i)).images[0]
                for i, prompt in enumerate(v.prompts)]  # fmt: skip

    def grid(self, images: list):
        """The validation images as one picture."""
        from diffplat.pictures import grid

        return grid(images, columns=4, thumb_width=max(256, images[0].width))

    def validation_grid(self, module):
        images = self.validation_images(module)
        return self.grid(images) if images else None

    def made_how(self) -> dict:
        raise NotImplementedError


class DenoiserAndTextEncoders(torch.nn.Module):
    """What DeepSpeed optimises with train_text_encoder: one module holding the denoiser and the
    text encoders, under their pipeline names (SDXL: unet, text_encoder, text_encoder_2), so one
    engine reduces, clips and steps every LoRA layer together. Its forward is the denoiser's;
    the loss calls the text encoders itself."""

    def __init__(self, denoiser_name: str, denoiser, encoders: dict):
        super().__init__()
        self.denoiser_name, self.encoder_names = denoiser_name, tuple(encoders)
        setattr(self, denoiser_name, denoiser)
        for name, encoder in encoders.items():
            setattr(self, name, encoder)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    def encoders(self) -> dict:
        return {name: getattr(self, name) for name in self.encoder_names}

    def forward(self, *args, **kwargs):
        return self.denoiser(*args, **kwargs)


def denoiser_of(module: torch.nn.Module) -> torch.nn.Module:
    return module.denoiser if isinstance(module, DenoiserAndTextEncoders) else module


class LoraObjective(DiffusionObjective):
    """Text-to-image LoRA on the denoiser (diffusers' train_text_to_image_lora_sdxl.py,
    train_dreambooth_lora_flux.py), and with train_text_encoder on the text encoders too (its
    --train_text_encoder)."""

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        denoiser = self.parts.denoiser
        if not config.lora.target_modules:
            config = config.model_copy(update={"lora": config.lora.model_copy(
                update={"target_modules": list(self.family.lora_targets)})})  # fmt: skip
            self.config = config
        self.lora_config = add_lora(denoiser, config.lora, self.family.denoiser_title)
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.to(device)
        self.text_lora_config, self._module = None, denoiser
        if config.train_text_encoder:
            settings = config.lora.model_copy(update={"target_modules": list(TEXT_ENCODER_TARGETS)})
            encoders = self.family.lora_text_encoders(self.parts)
            for encoder in encoders.values():
                self.text_lora_config = add_lora(encoder, settings, "text encoder")
                if config.gradient_checkpointing:
                    encoder.gradient_checkpointing_enable()
                encoder.to(device).train()
            self._module = DenoiserAndTextEncoders(self.family.denoiser, denoiser, encoders)

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def made_how(self) -> dict:
        """What adapter_info.json records besides the step and the metrics."""
        return {"kind": self.config.kind, "family": self.family.name, "rank": self.config.lora.rank,
                "alpha": self.config.lora.alpha, "target_modules": list(self.config.lora.target_modules),
                "prediction_type": self.prediction_type, "max_token_length": self.config.max_token_length,
                "max_sequence_length": self.config.max_sequence_length, "use_ema": self.config.use_ema, "train_text_encoder": self.config.train_text_encoder}  # fmt: skip

    def save(self, model: torch.nn.Module, folder: Path, info: dict) -> Path:
        encoders = model.encoders() if isinstance(model, DenoiserAndTextEncoders) else {}
        return save_lora(self.family, denoiser_of(model), self.lora_config, folder, {**self.made_how(), **info},
                         encoders, self.text_lora_config)  # fmt: skip


class IcLoraObjective(LoraObjective):
    """In-Context LoRA on composites (sources 1 and 3).

    `composite` mode is the plain LoRA above on whole composites. `masked` mode trains an
    inpainting denoiser (SDXL inpainting's 9-channel UNet) with random panels hidden: the
    visible panels reach it clean, as the masked-image latents, and the mask marks what to fill,
    which is exactly what the family's inpainting pipeline feeds it when filling panels later.
    """

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        self.settings = config.ic_lora
        self.inpainting = self.family.is_inpainting(self.parts.denoiser.config)
        if self.settings.mode == "masked" and not self.inpainting:
            raise ValueError(needs_inpainting_model(config.base_model, self.family, self.parts.denoiser.config))
        if self.cache and self.inpainting:
            raise ValueError(cache_needs_plain_model(config.base_model))
        # Panel choices come from their own generator, so they do not shift the noise draws;
        # the loop seeded torch with seed + rank, so every worker hides different panels.
        self.panel_rng = torch.Generator().manual_seed(torch.initial_seed() + PANEL_SEED_OFFSET)

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
        return self.family.inpaint_input(noisy, latent_mask, pixel_mask, masked_image), weights

    def validation_images(self, module) -> list:
        """The first training composites with panels filled by the adapter as it is now:
        input | mask | output, one strip each."""
        from PIL import Image

        from diffplat.infer.panels import FillOptions, fill_panels

        v = self.config.validation
        pipe = self._pipeline("inpaint", **{self.family.denoiser: denoiser_of(module)})
        strips = []
        for i, row in enumerate(self.validation_rows(["id", "image", "caption", "layout"])):
            layout = Layout.parse(row["layout"])
            panels = v.panels or list(range(layout.panels // 2, layout.panels))
            with Image.open(io.BytesIO(row["image"])) as img:
                composite = img.convert("RGB").resize(self.config.resolution, Image.BICUBIC)
            options = FillOptions(panels=tuple(panels), layout=str(layout), num_inference_steps=v.num_inference_steps,
                                  guidance_scale=v.guidance_scale, max_token_length=self.family.prompt_length(self.config))  # fmt: skip
            strips.append(fill_panels(pipe, composite, row["caption"], [v.seed + i], options, where=row["id"])[0].comparison)
        return strips

    def grid(self, images: list):
        from diffplat.pictures import grid

        return grid(images, columns=1, thumb_width=max(768, images[0].width))

    def made_how(self) -> dict:
        return {**super().made_how(), "ic_lora": self.settings.model_dump(), "inpainting_unet": self.inpainting}


def needs_inpainting_model(base_model: str, family, denoiser: dict) -> str:
    return (
        f"train.ic_lora.mode masked needs an inpainting {family.denoiser_title}, which also sees the mask and the "
        f"masked image's latents ({family.inpainting_example}); {base_model}'s has {denoiser['in_channels']} input "
        "channels. Use mode: composite for a text-to-image base model."
    )


def cache_needs_plain_model(base_model: str) -> str:
    return (f"train.cache: {base_model} has an inpainting denoiser, which sees each step's masked-image latents, "
            "encoded from the pixels; a cache has none. Train it without a cache, or from a text-to-image base model")


class ControlNetObjective(DiffusionObjective):
    """A ControlNet on conditioning images (diffusers' train_controlnet_sdxl.py): initialised
    from the base denoiser (or an existing ControlNet); the denoiser and text encoders stay frozen."""

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        self.controlnet = self.family.new_controlnet(self.parts.denoiser, config.controlnet.init,
                                                     conditioning_init=config.controlnet.conditioning_init)
        self.parts.denoiser.requires_grad_(False).to(device, self.weight_dtype).eval()
        self.controlnet.train()
        if config.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        self.controlnet.to(device)

    @property
    def module(self) -> torch.nn.Module:
        return self.controlnet

    def predict(self, model, model_input, t, prompts, extra, batch) -> torch.Tensor:
        cond = torch.as_tensor(batch["conditioning_pixel_values"]).to(self.device)
        return self.family.controlnet_predict(model, self.parts.denoiser, model_input, t, prompts, extra, cond)

    def validation_images(self, module) -> list:
        """Images from the first training maps and their captions: map | image, one strip each."""
        from PIL import Image

        from diffplat.data.composites import side_by_side

        v = self.config.validation
        rows = self.validation_rows(["id", "caption", "conditioning"], where=lambda r: r["conditioning"] is not None)
        pipe = self._pipeline("controlnet", controlnet=module)
        width, height = self.config.resolution
        strips = []
        for i, row in enumerate(rows):
            with Image.open(io.BytesIO(row["conditioning"])) as img:
                cond = img.convert("RGB").resize((width, height), Image.NEAREST)
            image = pipe(row["caption"], image=cond, width=width, height=height, num_inference_steps=v.num_inference_steps,
                         guidance_scale=v.guidance_scale, generator=torch.Generator(self.device).manual_seed(v.seed + i)).images[0]  # fmt: skip
            strips.append(side_by_side([cond, image]))
        return strips

    def grid(self, images: list):
        from diffplat.pictures import grid

        return grid(images, columns=2, thumb_width=max(512, images[0].width))

    def made_how(self) -> dict:
        return {"kind": "controlnet", "family": self.family.name, "init": self.config.controlnet.init or "base UNet",
                # an existing ControlNet keeps its own weights: no init applies
                "conditioning_init": None if self.config.controlnet.init else self.config.controlnet.conditioning_init,
                "max_token_length": self.config.max_token_length, "prediction_type": self.prediction_type,
                "use_ema": self.config.use_ema,
                "proportion_empty_prompts": self.config.proportion_empty_prompts}  # fmt: skip

    def save(self, model: torch.nn.Module, folder: Path, info: dict) -> Path:
        """A diffusers `save_pretrained` folder (safetensors) + adapter_info.json."""
        return save_pretrained_folder(model, folder, {**self.made_how(), **info})


class FullObjective(DiffusionObjective):
    """A full fine-tune of the denoiser (diffusers' train_text_to_image_sdxl.py): every weight of
    the UNet (or FLUX transformer) trains, the text encoders and VAE stay frozen. A checkpoint
    holds the denoiser's folder; the trainer writes train.output as a whole model (the base's
    other parts beside the trained denoiser), which any stage then takes as its base_model."""

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        denoiser = self.parts.denoiser
        denoiser.requires_grad_(True).train()
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.to(device)

    @property
    def module(self) -> torch.nn.Module:
        return self.parts.denoiser

    def made_how(self) -> dict:
        return {"kind": "full", "family": self.family.name, "prediction_type": self.prediction_type,
                "max_token_length": self.config.max_token_length, "use_ema": self.config.use_ema,
                "proportion_empty_prompts": self.config.proportion_empty_prompts}  # fmt: skip

    def save(self, model: torch.nn.Module, folder: Path, info: dict) -> Path:
        """The denoiser's `save_pretrained` folder under its pipeline name + adapter_info.json."""
        return save_pretrained_folder(model, folder, {**self.made_how(), **info}, within=self.family.denoiser)


def save_pretrained_folder(model: torch.nn.Module, folder: Path, info: dict, within: str = "") -> Path:
    """`model.save_pretrained` (safetensors) into `folder`/`within`, and adapter_info.json, replacing
    `folder` atomically."""
    import json

    from diffplat.fileio import replace_dir
    from diffplat.models.lora import INFO_NAME

    with replace_dir(Path(folder), "adapter", (INFO_NAME,)) as tmp:
        model.save_pretrained(tmp / within, safe_serialization=True)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return Path(folder)


OBJECTIVES = {"lora": LoraObjective, "ic_lora": IcLoraObjective, "controlnet": ControlNetObjective,
              "full": FullObjective}  # fmt: skip
