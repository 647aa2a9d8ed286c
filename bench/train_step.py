"""A diffplat LoRA training step under DeepSpeed vs the same step in plain PyTorch.

Same tiny SDXL, same LoRA, same batch, same loss; the baseline is a bare torch.optim.AdamW loop.
Prints median step times and their ratio (DeepSpeed engine overhead; ~1.0 is the goal).
    python bench/train_step.py [--steps 20] [--rounds 3]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def batch(n: int, width: int, height: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "pixel_values": rng.uniform(-1, 1, (n, 3, height, width)).astype(np.float32),
        "caption": np.array(["a driving scene on a city street, daytime, with 2 cars"] * n, dtype=object),
        "original_size": np.tile([height, width], (n, 1)),
        "crop_top_left": np.zeros((n, 2), dtype=np.int64),
    }


def timed_steps(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()

    import deepspeed

    from diffplat.config import TrainConfig
    from diffplat.models.tiny import write_tiny_model
    from diffplat.train.deepspeed_config import deepspeed_config
    from diffplat.train.objectives import LoraObjective

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny", "sdxl")
        config = TrainConfig(base_model=str(model), data="unused", max_train_steps=1, resolution=(64, 64),
                             train_batch_size=args.batch, lora={"rank": 8, "alpha": 8})
        data = batch(args.batch, *config.resolution)

        bare = LoraObjective(config, device)
        params = [p for p in bare.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        gen_bare = torch.Generator(device=device).manual_seed(0)

        def bare_step():
            loss = bare.loss(bare.module, data, gen_bare)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        ours = LoraObjective(config, device)
        ds_params = [p for p in ours.module.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=ours.module, model_parameters=ds_params, config=deepspeed_config(config))
        gen_ours = torch.Generator(device=device).manual_seed(0)

        def our_step():
            loss = ours.loss(engine, data, gen_ours)
            engine.backward(loss)
            engine.step()

        for step in (bare_step, our_step):  # warm up
            timed_steps(step, 3)
        bare_times, our_times = [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            bare_times += timed_steps(bare_step, args.steps)
            our_times += timed_steps(our_step, args.steps)
    bare_med, our_med = statistics.median(bare_times), statistics.median(our_times)
    print(f"device {device}, batch {args.batch} at 64x64, {len(bare_times)} steps each")
    print(f"bare PyTorch AdamW step      median {bare_med * 1000:8.1f} ms")
    print(f"diffplat DeepSpeed ZeRO-{config.deepspeed.zero_stage} step  median {our_med * 1000:8.1f} ms")
    print(f"ratio diffplat / bare: {our_med / bare_med:.2f}")


if __name__ == "__main__":
    main()
