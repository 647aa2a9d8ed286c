"""The DeepSpeed config, derived from the typed train config (never written by hand)."""

from __future__ import annotations

import os

from diffplat.config import TrainConfig


def select_accelerator() -> None:
    """DeepSpeed picks its accelerator when imported; without CUDA it must be told "cpu" (or it
    guesses, and warns that it did)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def skip_inference_comm_op() -> None:
    """On CPU, DeepSpeed compiles a shared-memory C++ op each time it sets up communication
    and finds no build (about 140 CPU-seconds: once per machine, and again whenever a different
    `ninja` did the last build). Only its inference all-reduce uses the op, never training: marked
    incompatible, it is not built, and no C++ compiler is needed to train on CPU."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(config: TrainConfig, client_optimizer: bool = False) -> dict:
    ds: dict = {
        "train_micro_batch_size_per_gpu": config.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": config.mixed_precision == "bf16"},
        "fp16": {"enabled": config.mixed_precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # diffplat logs progress itself
        "wall_clock_breakdown": False,
    }
    if config.deepspeed.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if not client_optimizer:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": config.learning_rate,
                "betas": [config.adam_beta1, config.adam_beta2],
                "eps": config.adam_epsilon,
                "weight_decay": config.weight_decay,
                # torch's AdamW: DeepSpeed's fused Adam would compile a CUDA/C++ op on first use.
                "torch_adam": True,
            },
        }
    return ds
