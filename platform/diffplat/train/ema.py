"""An exponential moving average of the trained weights (diffusers' EMAModel, for the trained
tensors only: for a LoRA that is a few MB, not a second UNet)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class MovingAverage:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in self._trained(module).items()}

    @staticmethod
    def _trained(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        # diffusers' default warm-up: early steps follow the weights closely, as an average of
        # the random start would lag for thousands of steps.
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, p in self._trained(module).items():
            self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    @contextmanager
    def applied(self, module: torch.nn.Module):
        """The module with the averaged weights in place (copied in place, so DeepSpeed's views
        of the parameters stay valid), then its own weights back."""
        trained = self._trained(module)
        kept = {n: p.detach().clone() for n, p in trained.items()}
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in trained.items():
                    p.copy_(kept[name])

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file({n: t.cpu().contiguous() for n, t in self.shadow.items()}, str(path))

    def load(self, path) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(path))
        if set(saved) != set(self.shadow):
            raise ValueError(f"{path}: the saved moving average holds other tensors than this run trains")
        for name, tensor in saved.items():
            self.shadow[name].copy_(tensor)
