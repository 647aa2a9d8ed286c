"""FLUX.1 (dev, schnell, Fill): a rectified-flow transformer with CLIP and T5 text encoders.

Conditioning is T5's hidden states (up to `max_sequence_length` tokens, 512 on FLUX.1-dev: a
long multi-scene caption fits whole) for the joint attention, and CLIP's pooled output. The
transformer works on packed latents: each 2x2 patch of the 16-channel latents is one token of
64 numbers, located by position ids; a guidance-distilled model (FLUX.1-dev) also takes the
guidance value as an input. Training follows ai-toolkit and diffusers'
train_dreambooth_lora_flux.py: latents (z - shift) * scale, noisy = (1 - s) z + s noise, target
noise - z (train/noising.py). FLUX.1 Fill's transformer sees 384 channels a token: the noisy
latents, the masked image's latents and the 8x8 pixel mask of each latent cell.
"""

from __future__ import annotations

import torch

from diffplat.models.families.base import Family, Parts, Prompts
from diffplat.models.loading import source_kwargs

FILL_CHANNELS = 384  # packed: latents 64 + masked-image latents 64 + mask 256
CLIP_TOKENS = 77


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w): FluxPipeline._unpack_latents."""
    b, _, channels = tokens.shape
    return tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def mask_channels(pixel_mask: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 64, H/8, W/8): each latent cell's 8x8 pixels as channels,
    as FluxFillPipeline.prepare_mask_latents lays them out before packing."""
    b, _, height, width = pixel_mask.shape
    m = pixel_mask[:, 0].view(b, height // scale, scale, width // scale, scale).permute(0, 2, 4, 1, 3)
    return m.reshape(b, scale * scale, height // scale, width // scale)


class Flux(Family):
    name = "flux"
    class_prefix = "Flux"
    denoiser = "transformer"
    denoiser_title = "transformer"
    inpainting_example = "e.g. black-forest-labs/FLUX.1-Fill-dev, 384 input channels"
    # diffusers' train_dreambooth_lora_flux.py: attention (both streams) and feed-forward
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")  # fmt: skip

    def load(self, base_model, vae=None, variant=None, encoders=True) -> Parts:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        kw = source_kwargs(base_model, variant)
        return Parts(
            denoiser=FluxTransformer2DModel.from_pretrained(base_model, subfolder="transformer", **kw),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
                base_model, subfolder="scheduler", local_files_only=kw["local_files_only"]),  # fmt: skip
            **(self.load_encoders(base_model, vae, variant) if encoders else {}),
        )

    def load_encoders(self, base_model, vae=None, variant=None) -> dict:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        from diffplat.models.loading import load_vae

        kw = source_kwargs(base_model, variant)
        tok_kw = {"local_files_only": kw["local_files_only"]}
        return {
            "tokenizers": (CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", **tok_kw),
                           AutoTokenizer.from_pretrained(base_model, subfolder="tokenizer_2", **tok_kw)),
            "text_encoders": (CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", **kw),
                              T5EncoderModel.from_pretrained(base_model, subfolder="text_encoder_2", **kw)),
            "vae": load_vae(base_model, vae, variant),
        }  # fmt: skip

    def prompt_length(self, config) -> int:
        return config.max_sequence_length

    def encode_prompts(self, tokenizers, text_encoders, captions, device, max_tokens) -> Prompts:
        """As FluxPipeline.encode_prompt: CLIP's pooled output of the first 77 tokens, T5's last
        hidden states of `max_tokens`, padded to that length."""
        clip_tok, t5_tok = tokenizers
        clip, t5 = text_encoders
        ids = clip_tok(captions, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                       return_tensors="pt").input_ids.to(device)  # fmt: skip
        pooled = clip(ids, output_hidden_states=False).pooler_output
        ids = t5_tok(captions, padding="max_length", max_length=max_tokens, truncation=True,
                     return_tensors="pt").input_ids.to(device)  # fmt: skip
        embeds = t5(ids, output_hidden_states=False)[0]
        return Prompts(embeds, pooled)

    def lora_text_encoders(self, parts) -> dict:
        return {"text_encoder": parts.text_encoders[0]}  # CLIP only, as diffusers' FLUX script

    def noising(self, scheduler, config):
        from diffplat.train.noising import FlowMatchNoising

        f = config.flow
        return FlowMatchNoising(f.timestep_sampling, f.loss_weighting, f.logit_mean, f.logit_std, f.mode_scale)

    def train_conditioning(self, config, denoiser: dict) -> dict:
        # FLUX.1-dev is guidance-distilled: the guidance value is an input (schnell has none)
        return {"guidance": config.flow.guidance_scale} if denoiser.get("guidance_embeds") else {}

    def predict(self, model, latents, t, prompts, extra):
        dtype = next(model.parameters()).dtype
        b, _, h, w = latents.shape
        guidance = None
        if "guidance" in extra:
            guidance = torch.full((b,), float(extra["guidance"]), device=latents.device, dtype=dtype)
        out = model(hidden_states=pack(latents).to(dtype), timestep=(t / 1000).to(dtype), guidance=guidance,
                    pooled_projections=prompts.pooled.to(dtype), encoder_hidden_states=prompts.embeds.to(dtype),
                    txt_ids=torch.zeros(prompts.embeds.shape[1], 3, device=latents.device, dtype=dtype),
                    img_ids=image_ids(h, w, latents.device, dtype), return_dict=False)[0]  # fmt: skip
        return unpack(out, h, w)

    def inpaint_input(self, noisy, latent_mask, pixel_mask, masked_latents):
        # packed, this is FluxFillPipeline's cat(latents, masked-image latents, mask) along the channels
        return torch.cat([noisy, masked_latents.to(noisy.dtype), mask_channels(pixel_mask).to(noisy.dtype)], dim=1)

    def is_inpainting(self, denoiser: dict) -> bool:
        return denoiser["in_channels"] == FILL_CHANNELS

    pixel_multiple = 16  # 8x the VAE, 2x the packing
    peft_lora_keys = True  # as ai-toolkit and diffusers' FLUX script save them: transformer.<module>.lora_A.weight

    def prompt_kwargs(self, pipe, prompts, negatives, max_tokens) -> dict:
        """FLUX.1-dev is guidance-distilled: negative prompts take no part (true CFG is off)."""
        return {"prompt": prompts, "max_sequence_length": max_tokens}

    def adapter_scale_kwargs(self, scale: float) -> dict:
        return {"joint_attention_kwargs": {"scale": scale}}

    def sampling_prompt_length(self, requested, adapter) -> int:
        return adapter.get("max_sequence_length", 512)  # `requested` counts CLIP windows: not FLUX's T5

    def pipeline_class(self, task: str, inpainting: bool = False):
        import diffusers

        if task == "inpaint":  # a Fill model fills; any other FLUX blends latents under the mask
            return diffusers.FluxFillPipeline if inpainting else diffusers.FluxInpaintPipeline
        return getattr(diffusers, {"text": "FluxPipeline", "controlnet": "FluxControlNetPipeline"}[task])
