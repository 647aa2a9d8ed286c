"""Captions longer than one CLIP window: encoded in windows, the same way in training and inference."""

import torch
from diffusers import StableDiffusionXLPipeline

from diffplat.models.text import encode_prompts, pipeline_prompt_embeds

LONG = " ".join(f"[SCENE-{i}] a driving scene on a city street, night, with {i} cars" for i in range(1, 5))


def _pipe(tiny_sdxl):
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)


def _encode(pipe, captions, max_token_length):
    return encode_prompts((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), captions,
                          "cpu", max_token_length)


def test_one_window_is_stock_diffusers_encoding(tiny_sdxl):
    pipe = _pipe(tiny_sdxl)
    with torch.no_grad():
        ours, pooled = _encode(pipe, ["a bus at night", LONG], 75)
        stock, _, stock_pooled, _ = pipe.encode_prompt(["a bus at night", LONG], device="cpu",
                                                       do_classifier_free_guidance=False)
    assert ours.shape == stock.shape == (2, 77, 64)
    assert torch.allclose(ours, stock, atol=1e-5) and torch.allclose(pooled, stock_pooled, atol=1e-5)


def test_long_captions_keep_their_later_scenes(tiny_sdxl):
    pipe = _pipe(tiny_sdxl)
    changed = LONG.replace("with 4 cars", "with 4 trucks")  # beyond the first 77 tokens
    with torch.no_grad():
        one, _ = _encode(pipe, [LONG, changed], 75)
        three, pooled = _encode(pipe, [LONG, changed], 225)
    assert torch.equal(one[0], one[1])  # one window: the change is cut off
    assert three.shape[1] == 3 * 77 and not torch.equal(three[0], three[1])
    assert torch.allclose(three[:, :77], one, atol=1e-5)  # the first window is the plain encoding


def test_negative_prompts_get_as_many_windows(tiny_sdxl):
    pipe = _pipe(tiny_sdxl)
    kw = pipeline_prompt_embeds(pipe, [LONG], ["blurry"], 225)
    assert kw["prompt_embeds"].shape == kw["negative_prompt_embeds"].shape
    empty = pipeline_prompt_embeds(pipe, [LONG], [""], 225)
    assert not empty["negative_prompt_embeds"].any()  # SDXL's zeros for an empty negative prompt
    image = pipe(**kw, num_inference_steps=2, width=64, height=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
