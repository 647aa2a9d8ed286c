"""Each adapter kind's objective learns: on one fixed batch (fixed noise, timesteps and masks) the
loss falls clearly within a few dozen steps. In-process, no Ray: the loop around it is tested in
test_train.py and test_ic_lora.py."""

import numpy as np
import pytest
import torch

from diffplat.aitoolkit import AI_TOOLKIT_FLUX_TARGETS
from diffplat.config import TrainConfig
from diffplat.data.composites import Layout, panel_mask
from diffplat.train.objectives import OBJECTIVES



def _batch(layout: str | None, size=(128, 64)):
    rng = np.random.default_rng(0)
    width, height = size
    return {
        "pixel_values": rng.uniform(-1, 1, (2, 3, height, width)).astype(np.float32),
        "caption": np.array(["a red car at night", "a bus in the rain"], dtype=object),
        "original_size": np.array([[height, width]] * 2),
        "crop_top_left": np.zeros((2, 2), np.int64),
        "layout": np.array([layout or ""] * 2, dtype=object),
        "conditioning_pixel_values": rng.uniform(0, 1, (2, 3, height, width)).astype(np.float32),
    }


# Attention and feed-forward layers: on a UNet this small, attention alone learns slowly.
TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _losses(objective, batch, steps: int, lr: float) -> list[float]:
    params = [p for p in objective.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        if hasattr(objective, "panel_rng"):
            objective.panel_rng.manual_seed(1)  # the same hidden panels every step
        loss = objective.loss(objective.module, batch, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind, mode, model", [
    ("lora", None, "tiny_sdxl"),
    ("ic_lora", "masked", "tiny_sdxl_inpaint"),
    ("ic_lora", "composite", "tiny_sdxl"),
    ("controlnet", None, "tiny_sdxl"),
    ("full", None, "tiny_sdxl"),
    ("lora", None, "tiny_flux"),
    ("ic_lora", "masked", "tiny_flux_fill"),
])  # fmt: skip
def test_loss_falls_on_a_fixed_batch(kind, mode, model, request):
    torch.manual_seed(0)
    targets = AI_TOOLKIT_FLUX_TARGETS if "flux" in model else TARGETS
    config = TrainConfig(kind=kind, base_model=str(request.getfixturevalue(model)), data="unused", max_train_steps=1,
                         resolution=(128, 64), lora={"rank": 8, "alpha": 8, "target_modules": targets},
                         ic_lora={"mode": mode or "masked", "mask_probability": 1.0},
                         max_sequence_length=64)  # fmt: skip
    objective = OBJECTIVES[kind](config, torch.device("cpu"))
    # a whole ControlNet (or UNet) trains; a LoRA's few weights take a larger step
    losses = _losses(objective, _batch("2x2" if kind == "ic_lora" else None), steps=40,
                     lr=1e-3 if kind in ("controlnet", "full") else 1e-2)
    assert losses[-1] < 0.6 * losses[0], losses


def test_masked_mode_hides_whole_panels_and_feeds_the_inpainting_channels(tiny_sdxl_inpaint):
    torch.manual_seed(0)
    config = TrainConfig(kind="ic_lora", base_model=str(tiny_sdxl_inpaint), data="unused", max_train_steps=1,
                         resolution=(128, 64), ic_lora={"mask_probability": 1.0, "max_masked_panels": 2})  # fmt: skip
    objective = OBJECTIVES["ic_lora"](config, torch.device("cpu"))
    seen = set()
    for _ in range(40):
        latent, pixel, chosen = objective.masks(["2x2", "1x3"], 64, 128)
        for i, (layout, panels) in enumerate(zip(["2x2", "1x3"], chosen)):
            layout = Layout.parse(layout)
            assert 1 <= len(panels) <= 2  # at least one panel stays visible
            assert np.array_equal(latent[i, 0].numpy(), panel_mask(layout, panels, 16, 8))
            assert np.array_equal(pixel[i, 0].numpy(), panel_mask(layout, panels, 128, 64))
            seen.add((str(layout), tuple(panels)))
    assert len(seen) > 6  # the choice varies
    noisy = torch.zeros(2, 4, 8, 16)
    unet_input, weights = objective.model_input(noisy, torch.ones(2, 3, 64, 128), _batch("2x2"), torch.Generator())
    assert unet_input.shape == (2, 9, 8, 16)
    # the mask channel is the latent mask; hidden cells weigh 1, visible 0 (the defaults)
    assert torch.equal(unet_input[:, 4:5], weights)


def test_masked_mode_refuses_a_text_to_image_unet(tiny_sdxl):
    config = TrainConfig(kind="ic_lora", base_model=str(tiny_sdxl), data="unused", max_train_steps=1)
    with pytest.raises(ValueError, match="needs an inpainting UNet.*9 input channels.*has 4 input channels.*mode: composite"):
        OBJECTIVES["ic_lora"](config, torch.device("cpu"))


def test_timestep_bias_draws_as_diffusers_weights_them(tiny_sdxl):
    """train.timestep_bias is diffusers' --timestep_bias_* (generate_timestep_weights): a range
    drawn `multiplier` times as often, `later` the noisiest `portion`; FLUX.1 is refused by name."""
    from diffplat.train.noising import timestep_weights

    bias = {"strategy": "range", "begin": 300, "end": 900, "multiplier": 100}
    config = TrainConfig(base_model=str(tiny_sdxl), data="unused", max_train_steps=1, timestep_bias=bias,
                         lora={"target_modules": TARGETS})  # fmt: skip
    objective = OBJECTIVES["lora"](config, torch.device("cpu"))
    latents = torch.zeros(4000, 4, 1, 1)
    _, t, _ = objective.noising(latents, torch.randn_like(latents), torch.Generator().manual_seed(0))
    inside = ((t >= 300) & (t < 900)).float().mean()
    assert 0.98 < inside < 1.0, inside  # 60000 / 60400 of the weight
    later = timestep_weights(TrainConfig.model_validate({**config.model_dump(), "timestep_bias": {
        "strategy": "later", "portion": 0.25, "multiplier": 3}}).timestep_bias, 1000)  # fmt: skip
    assert torch.allclose(later[750:], later[999]) and torch.isclose(later[999], 3 * later[0])
    assert torch.isclose(later.sum(), torch.tensor(1.0))
    uniform = OBJECTIVES["lora"](config.model_copy(update={"timestep_bias": config.timestep_bias.model_copy(
        update={"strategy": "none"})}), torch.device("cpu"))  # fmt: skip
    assert uniform.noising.timestep_weights is None
    with pytest.raises(ValueError, match="begin .900. must be below end .300."):
        TrainConfig(base_model="m", data="d", max_train_steps=1, timestep_bias={"strategy": "range", "begin": 900,
                                                                                "end": 300})  # fmt: skip
    with pytest.raises(ValueError, match="timestep_bias.end is 2000, but the schedule has 1000 timesteps"):
        timestep_weights(config.timestep_bias.model_copy(update={"end": 2000}), 1000)


def test_timestep_bias_is_refused_on_flux(tiny_flux, tmp_path):
    from diffplat.config import ConfigError
    from diffplat.train.trainer import check_training_data

    config = TrainConfig(base_model=str(tiny_flux), data="s3://bucket/shards", max_train_steps=1,
                         timestep_bias={"strategy": "later", "multiplier": 2})  # fmt: skip
    with pytest.raises(ConfigError, match="train.timestep_bias: .* is a flux model.*flow.timestep_sampling"):
        check_training_data(config)


def test_a_timestep_bias_past_the_schedule_is_refused_before_workers_start(tiny_sdxl):
    from diffplat.config import ConfigError
    from diffplat.train.trainer import check_training_data

    config = TrainConfig(base_model=str(tiny_sdxl), data="s3://bucket/shards", max_train_steps=1,
                         timestep_bias={"strategy": "range", "begin": 300, "end": 1200})  # fmt: skip
    with pytest.raises(ConfigError, match="train.timestep_bias.end is 1200, but .*'s schedule has 1000 timesteps"):
        check_training_data(config)
    check_training_data(config.model_copy(update={"timestep_bias": config.timestep_bias.model_copy(update={"end": 1000})}))


def test_min_snr_weighting(tiny_sdxl):
    """min(SNR, gamma) / SNR: 1 where the SNR is below gamma (noisy steps), smaller above it."""
    config = TrainConfig(base_model=str(tiny_sdxl), data="unused", max_train_steps=1, snr_gamma=5.0,
                         lora={"target_modules": TARGETS})  # fmt: skip
    objective = OBJECTIVES["lora"](config, torch.device("cpu"))
    t = torch.tensor([0, 100, 500, 999])
    alphas = objective.scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(objective.noising.weights(t), expected)
    assert objective.noising.weights(t)[0] < 0.01 and objective.noising.weights(t)[-1] == 1.0
    losses = _losses(objective, _batch(None), steps=40, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0], losses
