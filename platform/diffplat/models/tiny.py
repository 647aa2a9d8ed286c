"""Tiny, randomly initialised SDXL and FLUX.1 pipelines, written in the diffusers folder layout.

Real architectures at toy sizes. SDXL: a UNet with SDXL's text-time conditioning, a 4-block VAE
that shrinks 8x like the real one, two CLIP text encoders (the second with a projection), two
tokenizers built from a byte-level vocabulary (no download), and SDXL's Euler scheduler.
FLUX.1: a one-double-block, one-single-block transformer with guidance embedding (FLUX.1-dev's
kind; Fill: 384 input channels), a 16-channel VAE with FLUX's shift and scale, CLIP and T5
encoders with tokenizers built in code, and FLUX's flow-matching scheduler. Stock
`StableDiffusionXLPipeline` / `FluxPipeline.from_pretrained(folder)` load the result, so every
other module is tested on the same loading path a real model takes.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Literal

import torch

from diffplat.fileio import replace_dir

TinyKind = Literal["sdxl", "sdxl-inpaint", "controlnet", "flux", "flux-fill"]
TINY_KINDS = TinyKind.__args__

_TEXT_HIDDEN = 32  # each encoder; the UNet's cross_attention_dim is the two added
_PROJECTION = 32
_TIME_EMBED = 8  # SDXL's add_time_ids are 6 numbers, each embedded to this size


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte -> printable character map, as its byte-level BPE sees bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _byte_vocab() -> dict[str, int]:
    """Every byte as a token, alone and word-final: any text tokenises with no unknowns."""
    symbols = _byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for sym in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(sym, len(vocab))
    return vocab


def _caption_words() -> list[str]:
    """The words of diffplat's BDD captions (and of composite and mask captions)."""
    import re

    from diffplat.data import bdd

    phrases = [bdd.CAPTION_TEMPLATE, "and showing [scene] [movie-shots] [bdd]",
               *bdd.SCENE_PHRASES.values(), *bdd.TIME_PHRASES.values(), *bdd.WEATHER_PHRASES.values(),
               *bdd.DETECTION_CLASSES, *bdd._PLURALS.values(), *bdd.SEG_CLASSES,
               *(name + "s" for name in bdd.DETECTION_CLASSES if name not in bdd._PLURALS)]  # fmt: skip
    return sorted(set(re.findall(r"[a-z]+", " ".join(phrases).lower())))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one lower-case word (CLIPTokenizer.bpe, without its cache)."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):  # every occurrence of the pair, left to right
            if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def _word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make each word one token, as a real CLIP vocabulary holds common words whole:
    prompts that differ in a word ("at night", "in daytime") then differ in a token the model can
    attend to, not in a run of letters a tiny random encoder blurs together. A merge added for a
    later word ranks after every earlier one, so earlier words still come out whole."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer(folder: Path, whole_words: bool = False) -> None:
    """A CLIP tokenizer of bytes, which makes even a short caption a long run of tokens (the tests'
    models: a few scenes' captions span several CLIP windows). `whole_words`: the words of BDD
    captions are single tokens too, as in a real CLIP's vocabulary (the demo's model, which must
    learn what its prompts say)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _byte_vocab(), _word_merges(_caption_words()) if whole_words else []
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    from transformers import CLIPTokenizer

    # model_max_length must be given: without it tokenising fails ("int too big to convert").
    CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    ).save_pretrained(folder)


def _text_encoders(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,  # SDXL reads the penultimate layer
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=_PROJECTION,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    return CLIPTextModel(CLIPTextConfig(**cfg)), CLIPTextModelWithProjection(CLIPTextConfig(**cfg))


def tiny_unet(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=2 * _TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * _TIME_EMBED + _PROJECTION,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=0.13025,  # SDXL's
    )


def sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL base's scheduler settings.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )


def _t5_tokenizer():
    """A Unigram T5 tokenizer from a list of pieces: every printable character, alone and
    word-initial (any English text tokenises), no file needed."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.printable.strip():
        pieces += [(ch, -3.0), ("\u2581" + ch, -3.5)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_flux_transformer(in_channels: int = 64):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,  # 64: 16 latent channels packed 2x2; Fill: + masked latents 64 + mask 256
        out_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,  # T5's d_model
        pooled_projection_dim=_TEXT_HIDDEN,  # CLIP's hidden size
        guidance_embeds=True,  # as FLUX.1-dev (guidance-distilled)
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )


def build_tiny_flux(kind: str, seed: int = 0):
    """A tiny FluxPipeline (or FluxFillPipeline for "flux-fill")."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxPipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_encoder, _ = _text_encoders(len(tokenizer))
    tokenizer_2 = _t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=_TEXT_HIDDEN, d_kv=8, d_ff=37,
                                             num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                             feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                             decoder_start_token_id=0))  # fmt: skip
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=128, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)  # fmt: skip
    # FLUX.1-dev's scheduler settings: the shift follows the image's token count
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)  # fmt: skip
    fill = kind == "flux-fill"
    pipeline = FluxFillPipeline if fill else FluxPipeline
    return pipeline(transformer=tiny_flux_transformer(384 if fill else 64), vae=vae, text_encoder=text_encoder,
                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler)


def build_tiny_pipeline(kind: TinyKind = "sdxl", seed: int = 0, whole_words: bool = False):
    """The pipeline object (not saved); weights are random but reproducible from `seed`.
    `whole_words`: see write_tokenizer (SDXL kinds)."""
    if kind in ("flux", "flux-fill"):
        return build_tiny_flux(kind, seed)
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), whole_words)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_encoder, text_encoder_2 = _text_encoders(len(tokenizer))
    parts = dict(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=sdxl_scheduler(),
    )
    if kind == "sdxl":
        return StableDiffusionXLPipeline(unet=tiny_unet(), **parts)
    if kind == "sdxl-inpaint":
        # 9 input channels: noisy latents + mask + masked-image latents, as SDXL inpainting.
        return StableDiffusionXLInpaintPipeline(unet=tiny_unet(9), requires_aesthetics_score=False, **parts)
    if kind == "controlnet":
        unet = tiny_unet()
        # One conditioning channel entry per VAE downsampling block (4 here, as in SDXL).
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
        return StableDiffusionXLControlNetPipeline(unet=unet, controlnet=controlnet, **parts)
    raise ValueError(f"unknown tiny model kind {kind!r}: use one of {', '.join(TINY_KINDS)}")


# The threads of a VAE fit, whatever the machine has: threads split each op's sums, so their number
# changes the fitted weights' last bits, and every model trained on its latents after them. Measured
# on the demo: fitted with 1 thread in place of 2, its In-Context LoRA's measure went 46 -> 92 (base
# 121), its ControlNet's 0.83 -> 0.71 (base 0.58). With 2 on every machine (an 8-core laptop, a
# 1-thread test process), `make demo` trains what it was measured training (on another instruction
# set the last bits can still differ).
FIT_THREADS = 2


@contextlib.contextmanager
def _torch_threads(count: int):
    """torch's threads set to `count` for a block (or, as a decorator, each call), then given back."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@_torch_threads(FIT_THREADS)
def fit_vae(vae, images: list, size: tuple[int, int] = (128, 64), steps: int = 300, seed: int = 0,
            decoder_steps: int = 0) -> dict:
    """Train a tiny VAE to reconstruct `images` (PIL, resized to `size`, width height), then set
    its scaling_factor (and FLUX's shift_factor) so latents have unit variance, as SDXL's 0.13025
    does for its own VAE. A random VAE decodes any latent to noise; a fitted one makes a model's
    pictures readable. The posterior's log-variance starts at -8: a random encoder's is about
    -0.7 (std 0.7, against a spread of 1.2 in the latents' means) and the fit's small KL term
    leaves it there, so every latent a UNet trained on would be about half noise (measured: the
    demo's pretraining loss ends at 0.06 instead of 0.2, its scenes sharper). Colour comes late:
    on the demo's frames 150 steps at lr 2e-3 gave a blue sky back pinkish white (sky colour
    52 off, PSNR 20 dB), 250 at lr 3e-3 keep it (6 off, 23.5 dB).
    Then `decoder_steps` of the decoder alone (see sharpen_decoder): the latents stay exactly
    what the whole fit made them, the pictures decoded from them get sharper.
    The fit runs on FIT_THREADS threads on any machine (see there).
    Returns the reconstruction PSNR (dB) on the images and the seconds taken."""
    import time

    import numpy as np

    start = time.perf_counter()
    pixels = torch.tensor(np.stack([np.asarray(im.convert("RGB").resize(size)) for im in images]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    generator = torch.Generator().manual_seed(seed)
    quant = getattr(vae, "quant_conv", None)
    if quant is not None:  # a narrow posterior to start from (std 0.02), see the docstring
        with torch.no_grad():
            quant.weight[quant.out_channels // 2 :].zero_()
            quant.bias[quant.out_channels // 2 :].fill_(-8.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    vae.train()
    for _ in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (8,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        # a touch of KL keeps the latent space smooth enough to sample from
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    if decoder_steps:
        sharpen_decoder(vae, pixels, decoder_steps, seed)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        error = torch.nn.functional.mse_loss(vae.decode(latents).sample.clamp(-1, 1), pixels).item()
    if getattr(vae.config, "shift_factor", None) is not None:  # FLUX's VAE: centred, then scaled
        vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    else:
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return {"psnr": 10 * float(np.log10(4 / error)), "seconds": time.perf_counter() - start}


def sharpen_decoder(vae, pixels, steps: int, seed: int = 0, whole_steps: int = 50) -> None:
    """Train the decoder alone (post_quant_conv too) to draw `pixels` (B, 3, H, W in -1..1) from
    their latents, which the frozen encoder keeps exactly as they were: every model trained on
    those latents is unchanged, its pictures come out sharper. All but the last `whole_steps`
    see crops as tall as the frame and half as wide, on the latent grid (a convolution learns the
    same from half the pixels, in half the time). Measured on the demo's held-out frames after
    its 250 whole steps: 22.9 dB; 400 more here 24.9 dB (blue cars and poles back, where the
    whole fit blurred them away) in about 17 s; 200: 23.8."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell
    width = pixels.shape[-1] // 2 // scale * scale
    after = getattr(vae, "post_quant_conv", None)  # FLUX's VAE has none
    params = [*(after.parameters() if after is not None else []), *vae.decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    vae.decoder.train()
    for step in range(steps):
        rows = torch.randint(0, len(pixels), (8,), generator=generator)
        mean, std = posterior.mean[rows], posterior.std[rows]
        latents = mean + std * torch.randn(mean.shape, generator=generator)
        target = pixels[rows]
        if step < steps - whole_steps:
            left = int(torch.randint(0, (pixels.shape[-1] - width) // scale + 1, (1,), generator=generator))
            latents = latents[..., left : left + width // scale]
            target = target[..., left * scale : left * scale + width]
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.decoder.eval()


def write_tiny_model(out: str | Path, kind: TinyKind = "sdxl", seed: int = 0, fit_images: list | None = None,
                     fit_steps: int = 300, whole_words: bool = False, decoder_steps: int = 0) -> Path:
    """Save a tiny pipeline to `out` (safetensors, diffusers layout), replacing it atomically;
    with `fit_images`, its VAE first learns to reconstruct them (see fit_vae, and its
    `decoder_steps`); `whole_words`: see write_tokenizer."""
    out = Path(out)
    pipe = build_tiny_pipeline(kind, seed, whole_words)
    if fit_images:
        import logging

        fitted = fit_vae(pipe.vae, fit_images, steps=fit_steps, seed=seed, decoder_steps=decoder_steps)
        logging.getLogger("diffplat").info("tiny model: VAE fitted to %d images in %.0f s (PSNR %.1f dB)",
                                           len(fit_images), fitted["seconds"], fitted["psnr"])  # fmt: skip
    with replace_dir(out, "tiny model") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out
