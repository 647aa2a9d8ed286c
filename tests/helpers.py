"""Small builders shared by tests (not fixtures: they take arguments)."""

from pathlib import Path

import torch


def make_lora(base_model: Path, folder: Path, rank: int = 4, alpha: float = 8, seed: int = 0, info: dict | None = None) -> Path:
    """A LoRA with random (non-zero) weights on the tiny UNet, saved the way training saves it."""
    from diffusers import UNet2DConditionModel

    from diffplat.config import LoraSettings
    from diffplat.models.families import family_of
    from diffplat.models.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", local_files_only=True)
    config = add_lora(unet, LoraSettings(rank=rank, alpha=alpha))
    torch.manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return save_lora(family_of(str(base_model)), unet, config, folder, {"made_by": "tests", **(info or {})})


def run_bench(script: str, *args: str):
    """Run bench/<script> in a subprocess; fails the test on a non-zero exit."""
    import os
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / script
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=280,
                          env=os.environ.copy())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def validation_images(client, run_id: str) -> list[tuple[int, str]]:
    """(step, artifact path) of the validation images a training run logged with MLflow's image
    API (key "validation"; the run page's step slider), by step; the full-size PNGs only."""
    import re

    found = []
    for artifact in client.list_artifacts(run_id, "images"):
        match = re.fullmatch(r"images/validation\+step\+(\d+)\+timestamp\+\d+\+[\w-]+\.png", artifact.path)
        if match:
            found.append((int(match[1]), artifact.path))
    return sorted(found)


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
