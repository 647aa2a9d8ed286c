"""How a training step noises latents and what the denoiser must predict, per noise process.

Pure helpers, as diffusers' training_utils keeps them: they take a scheduler or a scheme and
draw from the generator they are given (saved in checkpoints, so a resumed run draws the same).
A model family names its process (models/families/); objectives never branch on it.
"""

from __future__ import annotations

import math

import torch


class DDPMNoising:
    """SDXL's: integer timesteps over the schedule (uniform, or as `timestep_weights` gives
    them), DDPM's `add_noise`, an epsilon or velocity target, and optionally min-SNR loss weights
    (Hang et al. 2023, diffusers' --snr_gamma): min(SNR, gamma) / SNR for epsilon, / (SNR + 1)
    for v-prediction."""

    def __init__(self, scheduler, prediction_type: str, snr_gamma: float | None = None,
                 timestep_weights: torch.Tensor | None = None):  # fmt: skip
        self.scheduler, self.prediction_type, self.snr_gamma = scheduler, prediction_type, snr_gamma
        self.timestep_weights = timestep_weights

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator):
        """(noisy latents, timesteps, target)."""
        steps = self.scheduler.config.num_train_timesteps
        if self.timestep_weights is None:
            t = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device).long()
        else:
            t = torch.multinomial(self.timestep_weights, latents.shape[0], replacement=True, generator=generator)
            t = t.to(latents.device).long()
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, t)
        return noisy, t, target

    def weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Each sample's loss weight (None: all 1)."""
        if not self.snr_gamma:
            return None
        alphas = self.scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return clipped / (snr + 1 if self.prediction_type == "v_prediction" else snr)


def timestep_weights(bias, steps: int) -> torch.Tensor | None:
    """diffusers' generate_timestep_weights (train_text_to_image_sdxl.py): each of the schedule's
    `steps` timesteps' probability under a TimestepBias; None for `none` (uniform)."""
    if bias.strategy == "none":
        return None
    if bias.strategy == "range" and bias.end > steps:
        raise ValueError(f"train.timestep_bias.end is {bias.end}, but the schedule has {steps} timesteps")
    weights = torch.ones(steps)
    count = int(bias.portion * steps)
    chosen = {"later": slice(steps - count, None), "earlier": slice(0, count),
              "range": slice(bias.begin, bias.end)}[bias.strategy]  # fmt: skip
    weights[chosen] *= bias.multiplier
    return weights / weights.sum()


def sample_sigmas(scheme: str, count: int, generator: torch.Generator, device, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:  # fmt: skip
    """Noise levels in (0, 1) for a batch, by the timestep sampling of ai-toolkit (`sigmoid`:
    1 - sigmoid(randn), its flowmatch default) or of diffusers'
    `compute_density_for_timestep_sampling` (`logit_normal`, `mode`, `uniform`)."""
    if scheme == "sigmoid":
        return 1 - torch.sigmoid(torch.randn(count, generator=generator, device=device))
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(count, generator=generator, device=device))
    u = torch.rand(count, generator=generator, device=device)
    if scheme == "mode":  # Esser et al. 2024, eq. 20 of the SD3 paper, as diffusers writes it
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme == "uniform":
        return u
    raise ValueError(f"unknown timestep sampling {scheme!r}")


class FlowMatchNoising:
    """Rectified flow (FLUX.1, SD3): noisy = (1 - s) z + s noise, target noise - z, s drawn by
    `scheme`; the timestep handed on is s * 1000, as FLUX's pipelines scale it. Loss weights as
    diffusers' `compute_loss_weighting_for_sd3` (`sigma_sqrt`, `cosmap`; `none`: all 1)."""

    prediction_type = "flow_matching"

    def __init__(self, scheme: str = "sigmoid", weighting: str = "none", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):  # fmt: skip
        self.scheme, self.weighting = scheme, weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator):
        s = sample_sigmas(self.scheme, latents.shape[0], generator, latents.device, self.logit_mean, self.logit_std,
                          self.mode_scale).clamp(1e-4, 1.0)  # fmt: skip
        s = s.to(latents.dtype)
        view = s.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - view) * latents + view * noise
        return noisy, s * 1000, noise - latents

    def weights(self, t: torch.Tensor) -> torch.Tensor | None:
        s = (t / 1000).float()
        if self.weighting == "sigma_sqrt":
            return s.clamp_min(1e-4) ** -2.0
        if self.weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
        return None
