"""What a model family supplies, and what every family shares.

A family is one base-model architecture (SDXL, FLUX.1): how its folder loads, how pixels and
captions become what its denoiser sees, how a training step noises latents and what the
denoiser must predict, which diffusers pipelines sample it, and how a LoRA on it is saved.
Objectives (train/objectives.py), the cache stage, generation and the HTTP API call these
hooks and never ask which family they hold. Tensors are (batch, channels, height, width)
latents unless a hook says otherwise: a family that works on another layout (FLUX's packed
sequence) converts inside its own hooks.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Parts:
    """What a training step needs. The text encoders and VAE stay frozen; training from a cache
    loads only the denoiser and the noise scheduler (the others are empty)."""

    denoiser: torch.nn.Module  # SDXL's UNet, FLUX's transformer
    noise_scheduler: object
    tokenizers: tuple = ()
    text_encoders: tuple = ()
    vae: torch.nn.Module | None = None


@dataclasses.dataclass
class Prompts:
    """Encoded captions: `embeds` (B, tokens, dim) for cross-attention and `pooled` (B, dim)."""

    embeds: torch.Tensor
    pooled: torch.Tensor


def scale_latents(sample: torch.Tensor, shift: float | None, scale: float) -> torch.Tensor:
    """A VAE latent sample as the denoiser sees it: (sample - shift) * scale (SDXL has no shift)."""
    return (sample - (shift or 0.0)) * scale


class Family:
    """The hooks; each family module subclasses this once. Attributes name the family and its
    parts as diffusers' pipelines name them, so `components` can hand them over."""

    name: str  # as job files and adapter_info.json say it
    class_prefix: str  # of the pipeline class in model_index.json: "StableDiffusionXL" (Pipeline, InpaintPipeline, ...)
    denoiser: str  # the pipeline component that is trained: "unet", "transformer"
    denoiser_title: str  # as messages name it: "UNet", "transformer"
    inpainting_example: str  # an inpainting model of the family, for messages
    lora_targets: tuple[str, ...]  # LoRA target modules when the job names none
    inpaint_extras: dict = {}  # keywords the inpainting pipeline needs beside the components
    controlnets: bool = False  # ControlNets train on this family (new_controlnet, controlnet_predict)
    ddpm_timesteps: bool = False  # noise levels are a DDPM schedule's timesteps (what train.timestep_bias weights)
    text_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    tokenizer_names: tuple[str, ...] = ("tokenizer", "tokenizer_2")

    # --- loading ---
    def load(self, base_model: str, vae: str | None = None, variant: str | None = None, encoders: bool = True) -> Parts:
        raise NotImplementedError

    def load_encoders(self, base_model: str, vae: str | None = None, variant: str | None = None) -> dict:
        """{"tokenizers", "text_encoders", "vae"}: what turns captions and pixels into inputs."""
        raise NotImplementedError

    def denoiser_config(self, base_model: str) -> dict:
        """The denoiser's config.json, read without loading its weights."""
        return _component_config(base_model, self.denoiser, "config.json")

    def schedule_length(self, base_model: str) -> int:
        """How many timesteps the model's training schedule has (its scheduler's config)."""
        return int(_component_config(base_model, "scheduler", "scheduler_config.json")["num_train_timesteps"])

    def components(self, parts: Parts) -> dict:
        """The parts under the names a diffusers pipeline of this family takes."""
        return {self.denoiser: parts.denoiser, "vae": parts.vae, **dict(zip(self.text_encoder_names, parts.text_encoders)),
                **dict(zip(self.tokenizer_names, parts.tokenizers))}  # fmt: skip

    # --- encoding ---
    def encode_images(self, vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] -> latents the denoiser sees."""
        sample = vae.encode(pixels).latent_dist.sample(generator)
        return scale_latents(sample, getattr(vae.config, "shift_factor", None), vae.config.scaling_factor)

    def prompt_length(self, config) -> int:
        """The caption tokens a TrainConfig or CacheConfig keeps (encode_prompts' max_tokens)."""
        return config.max_token_length

    def encode_prompts(self, tokenizers, text_encoders, captions: list[str], device, max_tokens: int) -> Prompts:
        raise NotImplementedError

    def prompt_windows(self, tokenizers, captions: list[str], max_tokens: int) -> list[int]:
        """How many fixed-size token windows each caption fills on its own (the cache stores a
        caption's windows and pads a batch with the empty prompt's); 1 where a family pads
        every caption to one length."""
        return [1] * len(captions)

    def size_conditioning(self, original: torch.Tensor, crop: torch.Tensor, target: tuple[int, int]) -> dict:
        """Extra conditioning from the image's sizes (SDXL's time ids); {} for most families."""
        return {}

    # --- training ---
    def lora_text_encoders(self, parts: Parts) -> dict:
        """{pipeline name: encoder} of the text encoders train_text_encoder puts LoRA layers on."""
        raise NotImplementedError

    def sampler(self, scheduler):
        """The scheduler validation images are sampled with, from the training one's config."""
        return type(scheduler).from_config(scheduler.config)

    def noising(self, scheduler, config):
        """The training-time noise process (train/noising.py) for a TrainConfig."""
        raise NotImplementedError

    def train_conditioning(self, config, denoiser: dict) -> dict:
        """Conditioning a TrainConfig fixes for every step, for a denoiser of this config
        (FLUX.1-dev's guidance value); {} for most."""
        return {}

    def predict(self, model, latents: torch.Tensor, t: torch.Tensor, prompts: Prompts, extra: dict) -> torch.Tensor:
        """The denoiser's output for `latents` at `t`, shaped like the noisy latents (an inpainting
        input's extra channels are not predicted). `model` is the trained module (under
        DeepSpeed), called in its own dtype."""
        raise NotImplementedError

    def new_controlnet(self, denoiser, init: str | None, dtype=None, conditioning_init: str = "default"):
        """A ControlNet to train: a saved one from `init`, or one made from the denoiser (its
        conditioning embedding initialised as `conditioning_init` says)."""
        raise ValueError(f"train.kind controlnet: ControlNets are trained on SDXL base models, not {self.name}")

    def controlnet_predict(self, controlnet, denoiser, latents, t, prompts: Prompts, extra: dict, cond_pixels):
        """The frozen denoiser's prediction with the trained ControlNet's residuals added."""
        raise NotImplementedError

    def inpaint_input(self, noisy, latent_mask, pixel_mask, masked_latents) -> torch.Tensor:
        """What an inpainting denoiser sees: the noisy latents with the hidden area and the
        visible pixels' latents, in this family's order."""
        raise NotImplementedError

    def is_inpainting(self, denoiser: dict) -> bool:
        """Whether a denoiser of this config (`denoiser_config`, or a loaded one's .config) is an
        inpainting one, seeing the mask and masked-image latents beside the noisy latents."""
        raise NotImplementedError

    # --- sampling and saving ---
    pixel_multiple: int = 8  # image sides (and a composite's panels) must be multiples of this
    peft_lora_keys: bool = False  # LoRA files keep peft's lora_A/lora_B keys (else diffusers' lora.down/up)

    def prompt_kwargs(self, pipe, prompts: list[str], negatives: list[str], max_tokens: int) -> dict:
        """The prompt keywords of a pipeline call, encoded as training encoded them."""
        raise NotImplementedError

    def adapter_scale_kwargs(self, scale: float) -> dict:
        """The pipeline keyword that scales loaded LoRA layers for one call."""
        raise NotImplementedError

    def sampling_prompt_length(self, requested: int | None, adapter: dict) -> int:
        """Caption tokens at sampling: what was asked (generate's max_token_length), else what the
        adapter trained with (its adapter_info.json), else the family's default."""
        raise NotImplementedError

    def pipeline_class(self, task: str, inpainting: bool = False):
        """The diffusers pipeline for "text", "inpaint" or "controlnet"; `inpainting`: the base's
        denoiser is an inpainting one (is_inpainting)."""
        raise NotImplementedError

    def save_lora(self, folder, denoiser_layers: dict, denoiser_config: dict, text_layers: dict, text_config: dict | None):
        """Write the LoRA file stock `load_lora_weights` of this family's pipeline reads into
        `folder`; `text_layers`: {encoder name: layers} of LoRA-trained text encoders."""
        kwargs = {f"{self.denoiser}_lora_layers": denoiser_layers, f"{self.denoiser}_lora_adapter_metadata": denoiser_config}
        for name, layers in text_layers.items():
            kwargs[f"{name}_lora_layers"] = layers
            kwargs[f"{name}_lora_adapter_metadata"] = text_config
        self.pipeline_class("text").save_lora_weights(folder, safe_serialization=True, **kwargs)


def _component_config(base_model: str, subfolder: str, name: str) -> dict:
    """A pipeline component's config file (folder or hub id), read without loading anything."""
    from diffusers.configuration_utils import ConfigMixin

    from diffplat.models.loading import source_kwargs

    class ComponentConfig(ConfigMixin):  # any diffusers component's config file
        config_name = name

    local = source_kwargs(base_model)["local_files_only"]
    return dict(ComponentConfig.load_config(base_model, subfolder=subfolder, local_files_only=local))
