"""A LoRA training step from cached latents and embeddings vs the same step encoding on the fly.

Same tiny SDXL, same LoRA, same batch, same loss and optimizer (a bare torch.optim.AdamW loop);
one objective runs the VAE and both text encoders every step, the other reads the rows the
cache stage's Encoder made of that batch (data/cache.py). Prints median step times and their
ratio (below 1.0: the cache saves the encoders' share of a step; on a real SDXL at 1024x1024 the
VAE alone is a large part of it).
    python bench/cached_latents.py [--steps 10] [--rounds 3] [--resolution 128]
"""

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from train_step import timed_steps  # bench/ is on the path when a script here runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def batch(n: int, width: int, height: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "id": np.array([str(i) for i in range(n)], dtype=object),
        "pixel_values": rng.uniform(-1, 1, (n, 3, height, width)).astype(np.float32),
        "caption": np.array(["a driving scene on a city street, daytime, with 2 cars"] * n, dtype=object),
        "original_size": np.tile([height, width], (n, 1)),
        "crop_top_left": np.zeros((n, 2), dtype=np.int64),
        "layout": np.array([""] * n, dtype=object),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()
    fly, cache, device, steps = step_times(args.steps, args.rounds, args.batch, args.resolution)
    print(f"device {device}, tiny SDXL LoRA, batch {args.batch} at {args.resolution}x{args.resolution}, {steps} steps each")
    print(f"encoding on the fly (VAE + 2 text encoders)  median {fly * 1000:8.1f} ms")
    print(f"from the cache (UNet only)                   median {cache * 1000:8.1f} ms")
    print(f"ratio cached / on the fly: {cache / fly:.2f}")


def step_times(steps: int = 10, rounds: int = 3, batch_size: int = 2, resolution: int = 128):
    """(median s/step on the fly, median s/step from the cache, device, steps measured each)."""
    from types import SimpleNamespace

    args = SimpleNamespace(steps=steps, rounds=rounds, batch=batch_size, resolution=resolution)
    from diffplat.config import CacheConfig, TrainConfig
    from diffplat.data.cache import Encoder, rows_table, write_cache_meta
    from diffplat.models.tiny import write_tiny_model
    from diffplat.train.objectives import LoraObjective

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = (args.resolution, args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny", "sdxl")
        data = batch(args.batch, *size)
        made = CacheConfig(data="unused", base_model=str(model), resolution=size)
        encoder = Encoder(made.model_dump(mode="json"))
        write_cache_meta(Path(tmp), made, *encoder.describe(), rows=args.batch)
        rows = rows_table(encoder(data)).to_pydict()  # the columns as training reads them back
        del encoder

        def stepper(objective, feed):
            params = [p for p in objective.module.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            generator = torch.Generator(device=device).manual_seed(0)

            def step():
                loss = objective.loss(objective.module, feed, generator)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return step

        config = dict(base_model=str(model), data="unused", max_train_steps=1, resolution=size,
                      train_batch_size=args.batch, lora={"rank": 8, "alpha": 8})  # fmt: skip
        on_the_fly = stepper(LoraObjective(TrainConfig(**config), device), data)
        cached = LoraObjective(TrainConfig(**config, cache=tmp), device)
        assert cached.parts.vae is None and cached.parts.text_encoder is None
        from_cache = stepper(cached, rows)

        for step in (on_the_fly, from_cache):  # warm up
            timed_steps(step, 2)
        fly_times, cache_times = [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            fly_times += timed_steps(on_the_fly, args.steps)
            cache_times += timed_steps(from_cache, args.steps)
    return statistics.median(fly_times), statistics.median(cache_times), device, len(fly_times)


if __name__ == "__main__":
    main()
