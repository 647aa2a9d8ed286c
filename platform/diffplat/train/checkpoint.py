"""What a training checkpoint holds, and reading it back exactly.

Every checkpoint the loop reports is one folder (Ray Train merges the workers' folders):

    adapter/                 the adapter at that step, in its diffusers format (rank 0)
    deepspeed/state/         DeepSpeed's own checkpoint: trained weights, optimizer (each rank
                             its ZeRO partition), lr scheduler
    rng/rank_NNN.safetensors each worker's random state (noise, timesteps, caption dropout,
                             hidden panels, dropout)
    ema.safetensors          the moving average of the trained weights (use_ema; rank 0)
    trainer_state.json       step, micro-step, epoch and batches into it, workers, and the
                             name and shape of every trained tensor

so a resumed run takes the same batches with the same random draws as the stopped one would have.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER_DIR = "adapter"
STATE_DIR, STATE_TAG = "deepspeed", "state"
RNG_DIR = "rng"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"


class CheckpointMismatch(RuntimeError):
    """The checkpoint's trained tensors are not this run's (another rank, target modules, kind)."""


def trained_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in module.named_parameters() if p.requires_grad}


def check_trained(saved: dict[str, list[int]], module: torch.nn.Module, where: str) -> None:
    """Load what was saved, not a guess: the run must train exactly the tensors the checkpoint
    holds, under the same names and shapes (DeepSpeed's loose load would skip a renamed one)."""
    mine = trained_shapes(module)
    missing, extra = sorted(set(saved) - set(mine)), sorted(set(mine) - set(saved))
    reshaped = sorted(n for n in set(saved) & set(mine) if saved[n] != mine[n])
    problems = []
    if missing:
        problems.append(f"{len(missing)} saved tensors this run does not train (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} trained tensors the checkpoint lacks (first: {extra[0]})")
    if reshaped:
        problems.append(f"{reshaped[0]} is {saved[reshaped[0]]} there and {mine[reshaped[0]]} here")
    if problems:
        raise CheckpointMismatch(f"{where} does not match this run: {'; '.join(problems)}. Resume with the "
                                 "kind, lora rank, target_modules and train_text_encoder it was trained with.")  # fmt: skip


def write_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state))


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def save_rng(folder: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    from safetensors.torch import save_file

    state = {f"generator.{name}": g.get_state() for name, g in generators.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    (folder / RNG_DIR).mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / RNG_DIR / f"rank_{rank:03d}.safetensors"))


def restore_rng(folder: Path, rank: int, generators: dict[str, torch.Generator]) -> bool:
    """Put back this rank's random state; False when the checkpoint has none for it."""
    from safetensors.torch import load_file

    path = Path(folder) / RNG_DIR / f"rank_{rank:03d}.safetensors"
    if not path.is_file():
        return False
    state = load_file(str(path))
    for name, generator in generators.items():
        generator.set_state(state[f"generator.{name}"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def own_checkpoints(run_dir: str | None) -> list:
    """This run's checkpoints on local or shared storage, newest first (none on a fresh run:
    every run has its own folder)."""
    from ray.train import Checkpoint

    if not run_dir or "://" in run_dir:
        return []
    found = sorted(Path(run_dir).glob(f"checkpoint_*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [Checkpoint.from_directory(str(p.parent)) for p in found]
