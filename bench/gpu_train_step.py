"""A LoRA training step on the full-size SDXL UNet or FLUX.1-dev transformer on one GPU: seconds/step,
samples/s, peak memory, MFU.

How to run it on the GPU machine (torch, peft, transformers, accelerate there; no diffusers, no network):
    pip install --no-deps diffusers-*.whl       # the diffusers wheel carried over (same version as .venv here)
    python bench/gpu_train_step.py --json $OUT/gpu.json
    python bench/gpu_train_step.py --family flux --json $OUT/gpu_flux.json
Defaults: SDXL base UNet (random weights, built from its config below, nothing downloaded), 1024x1024
(128x128 latents), batch 1 and 4, gradient checkpointing off and on, bf16 weights, LoRA rank 16 on
to_k/to_q/to_v/to_out.0 (diffplat's default) in fp32, AdamW on the LoRA only; 3 warm-up + 10 timed steps
a case. About 1-2 minutes on an H200; a guard (--max-seconds, default 420) skips what would not fit.
--family flux: FLUX.1-dev's transformer (11.9B parameters, random weights from its config, guidance
input), 1024x1024 = 4,096 packed image tokens + 512 T5 tokens, flow-matching loss, LoRA rank 16 on every
linear of the transformer blocks (ai-toolkit's set, the In-Context LoRA recipe's); 24 GB of bf16 weights.
The script imports only torch, diffusers and peft (nothing from diffplat), so it can be copied alone.

On CPU, for testing (seconds): python bench/gpu_train_step.py --tiny --json /tmp/tiny.json
The full config's parameter count and FLOPs, without a step (meta device, any machine):
    python bench/gpu_train_step.py --count-only

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the meta device (shapes only, so the
same on any machine), for the LoRA'd UNet at each case's batch:
  - `mfu`: the usual convention, training = 3 x forward FLOPs, over the chip's peak (--peak-tflops, H200
    dense bf16 989 TFLOP/s). With a frozen base the backward computes no weight gradients for the base,
    so this overstates the work actually done; it is comparable with other MFU figures, not a hardware count.
  - `mfu_counted`: the forward + backward FLOPs the step really executes (counted the same way).
  With gradient checkpointing the forward recompute in the backward is not counted as useful work in
  either, so checkpointing shows as lower MFU for the same model. `hfu` (JSON only) counts it: the
  FLOPs executed, recompute included, over the peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    dual_cross_attention=False,
    use_linear_projection=True,
    upcast_attention=False,
    resnet_time_scale_shift="default",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    addition_embed_type_num_heads=64,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 time ids x 256
    conv_in_kernel=3,
    conv_out_kernel=3,
)
SDXL_PARAMS = 2_567_463_684

# The same architecture at toy size (as diffplat.models.tiny's UNet): runs on CPU in seconds.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=64,
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))  # fmt: skip
FLUX_PARAMS = 11_901_408_320
# The same at toy size (as diffplat.models.tiny's FLUX)
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 4, 8))  # fmt: skip
T5_TOKENS = 512

CONFIGS = {"sdxl": (SDXL_UNET, 1024), "tiny": (TINY_UNET, 64), "flux": (FLUX_TRANSFORMER, 1024),
           "flux-tiny": (TINY_FLUX, 64)}  # fmt: skip
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# ai-toolkit's FLUX LoRA: every linear of the double and single blocks
FLUX_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                     "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear"]  # fmt: skip


def is_flux(config: dict) -> bool:
    return "num_single_layers" in config


def lora_targets(config: dict) -> list[str]:
    return FLUX_LORA_TARGETS if is_flux(config) else LORA_TARGETS
SEQ_LEN = 77  # CLIP tokens
GIB = 1024**3


def build_unet(config: dict, device, dtype: torch.dtype, rank: int):
    """The UNet (or FLUX transformer) with random weights, base frozen in `dtype`, LoRA layers trainable
    in fp32 (as diffplat's add_lora)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from peft import LoraConfig

    with torch.device(device):  # initialise on the device itself: fast on a GPU, free on meta
        unet = FluxTransformer2DModel(**config) if is_flux(config) else UNet2DConditionModel(**config)
        unet.to(dtype)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights="gaussian",
                                    target_modules=lora_targets(config)))  # fmt: skip
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    return unet, lora


def make_inputs(config: dict, batch: int, latent: int, device, dtype: torch.dtype, generator=None) -> dict:
    """Random latents, noise, timesteps and SDXL (or FLUX) conditioning of the right shapes."""
    kw = dict(device=device, generator=generator)
    if is_flux(config):  # 16-channel latents, T5 states, CLIP pooled, position ids, guidance
        ids = torch.zeros(latent // 2, latent // 2, 3, device=device)
        ids[..., 1] += torch.arange(latent // 2, device=device)[:, None]
        ids[..., 2] += torch.arange(latent // 2, device=device)[None, :]
        return {
            "latents": torch.randn(batch, config["in_channels"] // 4, latent, latent, dtype=dtype, **kw),
            "encoder_hidden_states": torch.randn(batch, T5_TOKENS, config["joint_attention_dim"], dtype=dtype, **kw),
            "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], dtype=dtype, **kw),
            "txt_ids": torch.zeros(T5_TOKENS, 3, dtype=dtype, device=device),
            "img_ids": ids.reshape(-1, 3).to(dtype),
            "guidance": torch.full((batch,), 1.0, dtype=dtype, device=device),
        }
    time_dim = 6 * config["addition_time_embed_dim"]
    side = latent * 8
    return {
        "latents": torch.randn(batch, config["in_channels"], latent, latent, dtype=dtype, **kw),
        "encoder_hidden_states": torch.randn(batch, SEQ_LEN, config["cross_attention_dim"], dtype=dtype, **kw),
        "text_embeds": torch.randn(batch, config["projection_class_embeddings_input_dim"] - time_dim, dtype=dtype, **kw),
        # original size, crop top-left, target size
        "time_ids": torch.tensor([[side, side, 0, 0, side, side]], dtype=dtype, device=device).repeat(batch, 1),
    }


def flux_loss_fn(transformer, inputs: dict, generator=None) -> torch.Tensor:
    """One flow-matching loss on packed latents: noisy = (1 - s) z + s noise, target noise - z."""
    latents = inputs["latents"]
    b, c, h, w = latents.shape
    noise = torch.randn(latents.shape, dtype=latents.dtype, device=latents.device, generator=generator)
    s = 1 - torch.sigmoid(torch.randn(b, device=latents.device, generator=generator))  # ai-toolkit's sigmoid
    view = s.view(-1, 1, 1, 1).to(latents.dtype)

    def pack(x):
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    pred = transformer(hidden_states=pack((1 - view) * latents + view * noise), timestep=s.to(latents.dtype),
                       guidance=inputs["guidance"], pooled_projections=inputs["pooled_projections"],
                       encoder_hidden_states=inputs["encoder_hidden_states"], txt_ids=inputs["txt_ids"],
                       img_ids=inputs["img_ids"], return_dict=False)[0]  # fmt: skip
    return torch.nn.functional.mse_loss(pred.float(), pack(noise - latents).float())


def loss_fn(unet, inputs: dict, generator=None) -> torch.Tensor:
    """One epsilon-prediction loss: noise and timesteps drawn each step, as in training."""
    if "pooled_projections" in inputs:
        return flux_loss_fn(unet, inputs, generator)
    latents = inputs["latents"]
    noise = torch.randn(latents.shape, dtype=latents.dtype, device=latents.device, generator=generator)
    t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device, generator=generator)
    alpha_bar = (1 - t.float() / 1000).clamp(min=1e-3).view(-1, 1, 1, 1)  # any schedule does for timing
    noisy = (alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise).to(latents.dtype)
    pred = unet(noisy, t, encoder_hidden_states=inputs["encoder_hidden_states"],
                added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
                return_dict=False)[0]  # fmt: skip
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


def count_flops(config: dict, batch: int, latent: int, rank: int, dtype: torch.dtype, checkpointing=False) -> dict:
    """Forward and backward FLOPs of one LoRA step, counted on the meta device (no memory, no compute);
    with `checkpointing` the backward includes the forward recompute."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, lora = build_unet(config, "meta", dtype, rank)
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    inputs = make_inputs(config, batch, latent, "meta", dtype)
    with FlopCounterMode(display=False) as forward:
        loss = loss_fn(unet, inputs)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    fwd, bwd = forward.get_total_flops(), backward.get_total_flops()
    return {"forward_flops": fwd, "backward_flops_counted": bwd, "params": sum(p.numel() for p in unet.parameters()),
            "lora_params": sum(p.numel() for p in lora)}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(unet, lora, config, batch, latent, checkpointing, args, device, dtype, deadline) -> dict:
    """Warm-up then timed steps; {"status": "ok", ...} or {"status": "OOM"} / {"status": "skipped: ..."}."""
    if time.perf_counter() > deadline:
        return {"status": "skipped: --max-seconds reached"}
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    for p in lora:
        p.grad = None
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = torch.optim.AdamW(lora, lr=1e-4, weight_decay=1e-2)
    generator = torch.Generator(device=device).manual_seed(0)
    status, times = "ok", []
    try:
        inputs = make_inputs(config, batch, latent, device, dtype, generator)

        def step():
            loss = loss_fn(unet, inputs, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora, 1.0)  # diffplat's training step clips too
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        _sync(device)
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
            if time.perf_counter() > deadline:  # keep what was measured; the rest of the run still reports
                status = "ok (cut short: --max-seconds)"
                break
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
        if not (isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()):
            raise
        status = "OOM"
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    inputs = step = None  # noqa: F841  drop activations / optimizer state before the next case
    for p in lora:
        p.grad = None
    del optimizer
    _free(device)
    if status == "OOM" or not times:
        return {"status": status, "peak_mem_bytes": peak, "peak_mem_gib": peak / GIB if peak else None}
    median = statistics.median(times)
    return {"status": status, "step_times_s": times, "median_s": median, "samples_per_s": batch / median,
            "peak_mem_bytes": peak, "peak_mem_gib": peak / GIB if peak is not None else None}  # fmt: skip


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _si(value: float) -> str:
    """1.23T, 45.6G, 7.89M: FLOPs and parameter counts from the tiny config to SDXL in one column."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _pct(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if value >= 1e-3 else f"{value:.1e}"


def print_table(result: dict) -> None:
    kind = "transformer" if result["config"].startswith("flux") else "UNet"
    print(f"\ngpu_train_step: {result['config']} {kind} ({_si(result['unet_params'])} params; LoRA rank "
          f"{result['lora_rank']}: {_si(result['lora_params'])} trainable), {result['resolution']}x"
          f"{result['resolution']} ({result['latent']}x{result['latent']} latents), {result['dtype']} base, "
          f"{result['device_name']}, {result['warmup']} warm-up + {result['steps']} timed steps")  # fmt: skip
    print(f"  MFU = 3 x forward FLOPs / median step / {result['peak_tflops']:g} TFLOP/s peak; 'MFU cnt' counts the "
          "fwd+bwd FLOPs the step executes (frozen base: no weight grads); checkpointing's recompute is not counted")
    print(f"  {'batch':>5} {'ckpt':>4} {'s/step':>8} {'samples/s':>9} {'peak GiB':>8} {'fwd FLOP':>8} "
          f"{'TFLOP/s':>8} {'MFU':>7} {'MFU cnt':>7}  status")  # fmt: skip
    for c in result["cases"]:
        print(f"  {c['batch']:>5} {'on' if c['gradient_checkpointing'] else 'off':>4} {_fmt(c.get('median_s'), '8.3f'):>8} "
              f"{_fmt(c.get('samples_per_s'), '9.2f'):>9} {_fmt(c.get('peak_mem_gib'), '8.1f'):>8} "
              f"{_si(c['forward_flops']):>8} {_fmt(c.get('achieved_tflops'), '8.3g'):>8} {_pct(c.get('mfu')):>7} "
              f"{_pct(c.get('mfu_counted')):>7}  {c['status']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: the family's full size")
    parser.add_argument("--family", choices=["sdxl", "flux"], default="sdxl",
                        help="sdxl: SDXL's UNet; flux: FLUX.1-dev's transformer")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="the family's toy-size model (CPU, seconds)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (latents are 1/8); default 1024, tiny 64")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, help="timed steps a case; default 10, tiny 3")
    parser.add_argument("--warmup", type=int, help="warm-up steps a case; default 3, tiny 1")
    parser.add_argument("--device", help="default cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="base weights; default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="chip peak, dense; H200 bf16: 989")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="cases that would start later are skipped")
    parser.add_argument("--count-only", action="store_true", help="parameters and FLOPs only (meta device), no step")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after each case)")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.max_seconds

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the "keep modules in float32" note on .to(dtype) is expected here
    import diffusers
    import peft

    if args.config is None:
        args.config = {("sdxl", False): "sdxl", ("sdxl", True): "tiny", ("flux", False): "flux",
                       ("flux", True): "flux-tiny"}[(args.family, args.tiny)]  # fmt: skip
    config, default_resolution = CONFIGS[args.config]
    tiny = args.config in ("tiny", "flux-tiny")
    resolution = args.resolution or default_resolution
    if resolution % (16 if is_flux(config) else 8):
        parser.error("--resolution must be a multiple of 8 (FLUX: 16, for the 2x2 packing)")
    latent = resolution // 8
    args.steps = args.steps if args.steps is not None else (3 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 LoRA matmuls
        torch.backends.cudnn.benchmark = True  # fixed shapes; the warm-up pays for the search
        device_name = torch.cuda.get_device_name(device)
        device_memory_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    else:
        if not (tiny or args.count_only or args.device):
            parser.error("no GPU here: the full-size step on CPU would take hours; use --tiny, --count-only, "
                         "or --device cpu to insist")  # fmt: skip
        device_memory_gib = None
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    flops = {b: count_flops(config, b, latent, args.rank, dtype) for b in dict.fromkeys(args.batch_sizes)}
    first = next(iter(flops.values()))
    if not args.count_only:  # what a checkpointed step executes, recompute included (JSON only: `hfu`)
        for b in flops:
            flops[b]["backward_flops_checkpointed"] = count_flops(config, b, latent, args.rank, dtype, True)[
                "backward_flops_counted"]
    result = {
        "benchmark": "gpu_train_step", "config": args.config, "device": str(device), "device_name": device_name,
        "device_memory_gib": device_memory_gib,
        "dtype": str(dtype).removeprefix("torch."), "resolution": resolution, "latent": latent,
        "steps": args.steps, "warmup": args.warmup, "peak_tflops": args.peak_tflops, "lora_rank": args.rank,
        "lora_targets": lora_targets(config), "unet_params": first["params"] - first["lora_params"],
        "lora_params": first["lora_params"], "flops_convention": "train = 3 x forward; recompute not counted",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                     "cuda": torch.version.cuda},
        "cases": [],
    }  # fmt: skip
    if args.config == "sdxl":
        assert result["unet_params"] == SDXL_PARAMS, f"SDXL UNet config gives {result['unet_params']:,} parameters"
    if args.config == "flux":
        assert result["unet_params"] == FLUX_PARAMS, f"FLUX.1-dev config gives {result['unet_params']:,} parameters"

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    if args.count_only:
        print(f"{args.config} {'transformer' if is_flux(config) else 'UNet'}: {result['unet_params']:,} parameters "
              f"(+ {result['lora_params']:,} LoRA rank "
              f"{args.rank}); at {resolution}x{resolution}:")  # fmt: skip
        for b, f in flops.items():
            print(f"  batch {b}: forward {f['forward_flops'] / 1e12:.3f} TFLOP, 3 x forward "
                  f"{3 * f['forward_flops'] / 1e12:.3f}, counted fwd+bwd "
                  f"{(f['forward_flops'] + f['backward_flops_counted']) / 1e12:.3f}")  # fmt: skip
        result["flops"] = {str(b): f for b, f in flops.items()}
        save()
        return

    torch.manual_seed(0)
    unet, lora = build_unet(config, device, dtype, args.rank)
    for batch in args.batch_sizes:
        for checkpointing in (False, True):
            case = {"batch": batch, "gradient_checkpointing": checkpointing}
            case.update(run_case(unet, lora, config, batch, latent, checkpointing, args, device, dtype, deadline))
            fwd = flops[batch]["forward_flops"]
            counted = fwd + flops[batch]["backward_flops_counted"]
            executed = fwd + flops[batch]["backward_flops_checkpointed" if checkpointing else "backward_flops_counted"]
            case.update(forward_flops=fwd, train_flops=3 * fwd, train_flops_counted=counted,
                        train_flops_executed=executed)  # fmt: skip
            if case.get("median_s"):
                peak, median = args.peak_tflops * 1e12, case["median_s"]
                case.update(achieved_tflops=3 * fwd / median / 1e12, mfu=3 * fwd / median / peak,
                            mfu_counted=counted / median / peak, hfu=executed / median / peak)  # fmt: skip
            result["cases"].append(case)
            print(f"  batch {batch}, checkpointing {'on' if checkpointing else 'off'}: {case['status']}"
                  + (f", {case['median_s']:.3f} s/step" if case.get("median_s") else ""), flush=True)  # fmt: skip
            save()
    result["wall_s"] = time.perf_counter() - started
    save()
    print_table(result)
    print(f"  total {result['wall_s']:.0f} s" + (f"; results in {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
