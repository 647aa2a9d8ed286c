"""SDXL's text conditioning, with captions longer than CLIP's 77-token window.

A multi-scene In-Context LoRA caption (`[BDD] ... [SCENE-1] ... [SCENE-4] ...`) runs to a few
hundred tokens; one CLIP window would keep the first scene or two. As kohya's trainers and the
common front ends do (`max_token_length` 75, 150 or 225), the caption is cut into windows of 75
tokens, each encoded alone between its own start and end tokens, and the hidden states are laid
end to end: SDXL's cross-attention takes a sequence of any length. The pooled embedding comes
from the first window. With max_token_length 75 this is exactly stock diffusers' encoding.
Training and inference call the same function, so an adapter sees at inference what it saw in
training.
"""

from __future__ import annotations

import torch

WINDOW = 75  # content tokens per CLIP window (77 with the start and end tokens)


def _token_ids(tokenizer, captions: list[str]) -> list[list[int]]:
    return tokenizer(captions, truncation=False, add_special_tokens=False, verbose=False).input_ids


def _counts(ids: list[list[int]], max_token_length: int) -> list[int]:
    limit = max(1, max_token_length // WINDOW)
    return [min(limit, max(1, -(-len(i) // WINDOW))) for i in ids]


def window_counts(tokenizer, captions: list[str], max_token_length: int) -> list[int]:
    """The windows each caption fills on its own. A batch is encoded with the most of them; a
    caption's windows past its own hold no tokens ([start, end, pad...]), so they are the
    empty prompt's one window (the cache stores captions alone and pads with that)."""
    return _counts(_token_ids(tokenizer, captions), max_token_length)


def _windows(tokenizer, captions: list[str], max_token_length: int) -> torch.Tensor:
    """(batch, windows, 77) token ids; every caption gets the same number of windows."""
    ids = _token_ids(tokenizer, captions)
    count = max(_counts(ids, max_token_length))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = torch.full((len(captions), count, WINDOW + 2), pad, dtype=torch.long)
    for b, tokens in enumerate(ids):
        tokens = tokens[: count * WINDOW]
        for w in range(count):
            chunk = tokens[w * WINDOW : (w + 1) * WINDOW]
            row = [bos, *chunk, eos]
            out[b, w, : len(row)] = torch.tensor(row)
    return out


def encode_prompts(tokenizers, text_encoders, captions: list[str], device, max_token_length: int = WINDOW):
    """(prompt_embeds (B, 77 * windows, hidden_1 + hidden_2), pooled (B, projection)) as SDXL's
    pipelines build them: each encoder's penultimate layer, side by side."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        windows = _windows(tokenizer, captions, max_token_length).to(device)
        batch, count, length = windows.shape
        out = encoder(windows.view(batch * count, length), output_hidden_states=True)
        hidden.append(out.hidden_states[-2].reshape(batch, count * length, -1))
        # CLIPTextModelWithProjection (the second encoder): text_embeds of the first window
        pooled = out[0].view(batch, count, -1)[:, 0]
    return torch.cat(hidden, dim=-1), pooled


def pipeline_prompt_embeds(pipe, prompts: list[str], negative: list[str] | None, max_token_length: int) -> dict:
    """The prompt_embeds keywords of an SDXL pipeline call, encoded as training encoded them.
    Prompts and negative prompts are encoded together, so both get the same number of windows
    (classifier-free guidance stacks them)."""
    negative = negative or [""] * len(prompts)
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    with torch.no_grad():
        embeds, pooled = encode_prompts(tokenizers, encoders, prompts + negative, pipe._execution_device, max_token_length)
    n = len(prompts)
    neg_embeds, neg_pooled = embeds[n:], pooled[n:]
    if not any(negative) and pipe.config.get("force_zeros_for_empty_prompt", True):
        neg_embeds, neg_pooled = torch.zeros_like(neg_embeds), torch.zeros_like(neg_pooled)
    dtype = pipe.text_encoder_2.dtype
    return {"prompt_embeds": embeds[:n].to(dtype), "pooled_prompt_embeds": pooled[:n].to(dtype),
            "negative_prompt_embeds": neg_embeds.to(dtype), "negative_pooled_prompt_embeds": neg_pooled.to(dtype)}  # fmt: skip
