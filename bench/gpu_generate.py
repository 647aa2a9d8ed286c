"""Full-size SDXL text-to-image on one GPU: seconds per image, images/s, UNet s/step, VAE decode s, peak memory.

How to run it on the GPU machine (torch, transformers there; no diffusers, no network), with this file and
bench/gpu_train_step.py copied together (the SDXL UNet config is imported from there):
    pip install --no-deps diffusers-*.whl       # the diffusers wheel carried over (same version as .venv here)
    python bench/gpu_generate.py --json $OUT/generate.json
Reference the README compares against: 1.47 s per image, what TensorRT reaches on an H100 for SDXL base
(30 steps, 1024x1024).

Defaults: stabilityai/stable-diffusion-xl-base-1.0 built from its configs with random weights (nothing
downloaded): UNet (2,567,463,684 parameters), VAE (83,653,863), CLIP ViT-L text encoder (123,060,480) and
OpenCLIP bigG text encoder with projection (694,659,840), SDXL's EulerDiscreteScheduler; StableDiffusionXLPipeline,
30 steps, 1024x1024, guidance scale 5 (classifier-free guidance: the UNet runs on twice the batch, as in real
use), batch 1 and 4, bf16 everywhere (the VAE too: SDXL's VAE overflows in fp16, not in bf16; --vae-dtype fp32
to upcast it), the UNet eager, then under torch.compile (mode "default"; --compile-mode to change, e.g.
max-autotune-no-cudagraphs, which takes much longer to compile). Each case: 1 warm-up + 3 timed generations.
About 5 minutes on an H200 (an estimate, not yet measured); a guard (--max-seconds, default 420) skips what
would not fit and the JSON is rewritten after each case, so a run cut short still reports what it measured.

No tokenizers: the CLIP tokenizers' vocab/merges would have to be downloaded. Instead a fixed 77-token sequence
of random ids (BOS, 20 "words", EOS, padding) goes through both text encoders exactly as the pipeline's
encode_prompt does (penultimate hidden states of both, concatenated; pooled projection of the second), timed as
`text_encode_s`, and the pipeline gets prompt_embeds / pooled_prompt_embeds (negative: zeros, as SDXL's
force_zeros_for_empty_prompt does with no negative prompt). Tokenising 77 tokens costs well under a millisecond.

A generation is timed in three parts, each between CUDA synchronisations: text encoding, the pipeline called
with output_type="latent" (latent preparation, the 30 UNet steps and the scheduler: `denoise_s`,
`unet_s_per_step` = denoise_s / steps), and the VAE decode of the latents (`decode_s`, latents / scaling_factor
through vae.decode; no conversion to PIL). `total_s` is their sum; s/image = total_s / batch. torch.compile's
compilation happens in a 1-step generation before the warm-up and is reported as `compile_s`, not timed.

On CPU, for testing (seconds): python bench/gpu_generate.py --tiny --json /tmp/tiny.json
    (torch.compile is off on CPU unless --compile on/both)
The full configs' parameter counts and FLOPs, without generating (meta device, any machine):
    python bench/gpu_generate.py --count-only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train_step import SDXL_PARAMS, SDXL_UNET, TINY_UNET  # noqa: E402  (its neighbour in bench/)

REFERENCE = {"s_per_image": 1.47, "what": "TensorRT, SDXL base, H100, 30 steps, 1024x1024, batch 1"}

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json (83,653,863 parameters).
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# text_encoder/config.json: CLIP ViT-L/14's text tower (123,060,480 parameters).
SDXL_TEXT_1 = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    bos_token_id=0,
    eos_token_id=2,  # SDXL's configs keep CLIP's legacy ids: the pooled token is then the highest id (EOS)
    pad_token_id=1,
)
# text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower, CLIPTextModelWithProjection (694,659,840).
SDXL_TEXT_2 = dict(
    SDXL_TEXT_1,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)
# scheduler/scheduler_config.json
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
)
SDXL_COUNTS = {"unet": SDXL_PARAMS, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}

# Toy sizes of the same architectures (as diffplat.models.tiny): run on CPU in seconds. TINY_UNET's
# cross_attention_dim 64 = 32 + 32 (the two encoders' hidden sizes), its pooled input 32 = encoder 2's projection.
TINY_VAE = dict(
    SDXL_VAE,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=128,
)
TINY_TEXT_1 = dict(
    SDXL_TEXT_1,
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,  # SDXL reads the penultimate layer
    num_attention_heads=4,
    projection_dim=32,
)
TINY_TEXT_2 = dict(TINY_TEXT_1, hidden_act="gelu")

CONFIGS = {
    "sdxl": dict(unet=SDXL_UNET, vae=SDXL_VAE, text_1=SDXL_TEXT_1, text_2=SDXL_TEXT_2, resolution=1024),
    "tiny": dict(unet=TINY_UNET, vae=TINY_VAE, text_1=TINY_TEXT_1, text_2=TINY_TEXT_2, resolution=64),
}
SEQ_LEN = 77  # CLIP tokens
GIB = 1024**3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_models(cfg: dict, device, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict:
    """UNet, VAE and both text encoders with random weights, initialised on `device` (fast on a GPU, free on meta)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        models = {
            "unet": UNet2DConditionModel(**cfg["unet"]).to(dtype),
            "vae": AutoencoderKL(**cfg["vae"]).to(vae_dtype),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_1"])).to(dtype),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"])).to(dtype),
        }
    for model in models.values():
        model.requires_grad_(False)
        model.eval()
    return models


def build_pipeline(models: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        **models, tokenizer=None, tokenizer_2=None, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_ids(vocab_size: int, batch: int, device) -> torch.Tensor:
    """A fixed 77-token prompt of random ids: BOS, 20 words, EOS, EOS padding (the highest id is EOS, as in CLIP)."""
    bos, eos = vocab_size - 2, vocab_size - 1
    words = torch.randint(0, vocab_size - 2, (20,), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.tensor([bos]), words, torch.full((SEQ_LEN - 21,), eos)])
    return ids.unsqueeze(0).repeat(batch, 1).to(device)


@torch.no_grad()
def encode_prompt(text_encoder, text_encoder_2, ids: torch.Tensor):
    """StableDiffusionXLPipeline.encode_prompt after tokenising (clip_skip None): (prompt_embeds, pooled)."""
    out_1 = text_encoder(ids, output_hidden_states=True)
    out_2 = text_encoder_2(ids, output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return embeds, out_2[0]  # out_2[0]: text_embeds, the pooled projection


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's decode (SDXL base has no latents_mean/std), minus the conversion to PIL."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def count_flops(models: dict, batch: int, latent: int, guidance: float, dtype, vae_dtype) -> dict:
    """One UNet step (at the CFG-doubled batch) and one VAE decode, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = models["unet"], models["vae"]
    cfg = unet.config
    n = 2 * batch if guidance > 1 else batch
    time_dim = 6 * cfg.addition_time_embed_dim
    kw = dict(device="meta", dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as step:
        unet(torch.empty(n, cfg.in_channels, latent, latent, **kw), torch.tensor(999.0, device="meta"),
             encoder_hidden_states=torch.empty(n, SEQ_LEN, cfg.cross_attention_dim, **kw),
             added_cond_kwargs={"text_embeds": torch.empty(n, cfg.projection_class_embeddings_input_dim - time_dim, **kw),
                                "time_ids": torch.empty(n, 6, **kw)}, return_dict=False)  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False) as dec:
        vae.decode(torch.empty(batch, vae.config.latent_channels, latent, latent, device="meta", dtype=vae_dtype))
    return {"unet_step_flops": step.get_total_flops(), "decode_flops": dec.get_total_flops()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak(device: torch.device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def generate(pipe, ids, args, device, steps: int, decode_too: bool = True) -> dict:
    """One timed generation of ids.shape[0] images: text encoding, denoising loop, VAE decode, each synchronised."""
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    embeds, pooled = encode_prompt(pipe.text_encoder, pipe.text_encoder_2, ids)
    _sync(device)
    t1 = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(0)
    (latents,) = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=steps,
                      guidance_scale=args.guidance, height=args.resolution, width=args.resolution,
                      generator=generator, output_type="latent", return_dict=False)  # fmt: skip
    _sync(device)
    t2 = time.perf_counter()
    run = {"text_encode_s": t1 - t0, "denoise_s": t2 - t1, "peak_denoise_bytes": _peak(device)}
    if decode_too:
        _reset_peak(device)
        t2 = time.perf_counter()
        image = decode(pipe.vae, latents)
        _sync(device)
        run.update(decode_s=time.perf_counter() - t2, peak_decode_bytes=_peak(device),
                   image_shape=list(image.shape))  # fmt: skip
        run["total_s"] = run["text_encode_s"] + run["denoise_s"] + run["decode_s"]
    return run


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_case(pipe, vocab_size, batch, compiled, args, device, deadline, estimate_s) -> dict:
    """Compile (if asked; timed apart), warm up, then time; {"status": "ok", ...}, OOM or skipped."""
    left = deadline - time.perf_counter()
    if left <= 0:
        return {"status": "skipped: --max-seconds reached"}
    if estimate_s is not None and estimate_s > left:
        return {"status": f"skipped: would not fit in --max-seconds (about {estimate_s:.0f} s, {left:.0f} s left)"}
    _free(device)
    case, runs, status = {}, [], "ok"
    try:
        ids = prompt_ids(vocab_size, batch, device)
        if compiled:  # compilation (per batch shape: dynamic=False) in a 1-step generation, timed apart
            start = time.perf_counter()
            generate(pipe, ids, args, device, steps=1, decode_too=False)
            case["compile_s"] = time.perf_counter() - start
        case["warmup_s"] = [generate(pipe, ids, args, device, args.steps)["total_s"] for _ in range(args.warmup)]
        for _ in range(args.repeats):
            runs.append(generate(pipe, ids, args, device, args.steps))
            if time.perf_counter() > deadline and len(runs) < args.repeats:
                status = "ok (cut short: --max-seconds)"
                break
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
        if not _is_oom(err):
            raise
        status = "OOM"
    ids = None
    _free(device)
    case["status"] = status
    if not runs:
        return case
    med = {k: statistics.median(r[k] for r in runs) for k in ("text_encode_s", "denoise_s", "decode_s", "total_s")}
    peaks = [max(r["peak_denoise_bytes"], r["peak_decode_bytes"]) for r in runs] if device.type == "cuda" else []
    case.update(
        runs=runs, **med, s_per_image=med["total_s"] / batch, images_per_s=batch / med["total_s"],
        unet_s_per_step=med["denoise_s"] / args.steps, image_shape=runs[0]["image_shape"],
        peak_mem_bytes=max(peaks) if peaks else None, peak_mem_gib=max(peaks) / GIB if peaks else None,
        peak_denoise_gib=max(r["peak_denoise_bytes"] for r in runs) / GIB if peaks else None,
        peak_decode_gib=max(r["peak_decode_bytes"] for r in runs) / GIB if peaks else None,
    )  # fmt: skip
    return case


def _per_generation(measured: dict, batch: int):
    """Seconds a generation of `batch` images should take: its eager time if measured, else scaled from another."""
    if (batch, False) in measured:
        return measured[(batch, False)]
    if not measured:
        return None
    (b, _), seconds = min(measured.items())
    return seconds * batch / b


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(result: dict) -> None:
    print(f"\ngpu_generate: {result['config']} text-to-image, {result['resolution']}x{result['resolution']}, "
          f"{result['steps']} steps, guidance {result['guidance']:g} (UNet batch x2), {result['dtype']} "
          f"(VAE {result['vae_dtype']}), {result['device_name']}, {result['warmup']} warm-up + "
          f"{result['repeats']} timed generations a case")  # fmt: skip
    print(f"  reference: {REFERENCE['s_per_image']} s/image ({REFERENCE['what']}); total = text + loop + decode; "
          "compile s is not in the timings")  # fmt: skip
    print(f"  {'batch':>5} {'compile':>7} {'s/image':>8} {'images/s':>8} {'total s':>8} {'text s':>7} "
          f"{'loop s':>7} {'UNet s/step':>11} {'decode s':>8} {'TFLOP/s':>7} {'peak GiB':>8} {'compile s':>9}  status")
    for c in result["cases"]:
        print(f"  {c['batch']:>5} {'on' if c['compile'] else 'off':>7} {_fmt(c.get('s_per_image'), '8.3f'):>8} "
              f"{_fmt(c.get('images_per_s'), '8.3f'):>8} {_fmt(c.get('total_s'), '8.3f'):>8} "
              f"{_fmt(c.get('text_encode_s'), '7.3f'):>7} {_fmt(c.get('denoise_s'), '7.3f'):>7} "
              f"{_fmt(c.get('unet_s_per_step'), '11.4f'):>11} {_fmt(c.get('decode_s'), '8.3f'):>8} "
              f"{_fmt(c.get('unet_tflops'), '7.3g'):>7} {_fmt(c.get('peak_mem_gib'), '8.1f'):>8} "
              f"{_fmt(c.get('compile_s'), '9.1f'):>9}  {c['status']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="config", help="same as --config tiny")
    parser.add_argument("--resolution", type=int, help="image side in pixels (latents are 1/8); default 1024, tiny 64")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="images per generation")
    parser.add_argument("--steps", type=int, help="denoising steps; default 30, tiny 4")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale; > 1 doubles the UNet batch")
    parser.add_argument("--warmup", type=int, help="warm-up generations a case; default 1")
    parser.add_argument("--repeats", type=int, help="timed generations a case; default 3, tiny 2")
    parser.add_argument("--device", help="default cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="UNet and text encoders; default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--vae-dtype", choices=["bf16", "fp32"],
                        help="default: as --dtype, bf16 on GPU (fp16 is not offered: SDXL's VAE overflows in it)")
    parser.add_argument("--compile", choices=["auto", "off", "on", "both"], default="auto",
                        help="torch.compile the UNet: both = eager cases then compiled ones; auto = both on GPU, off on CPU")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode: default, max-autotune-no-cudagraphs, reduce-overhead, max-autotune")
    parser.add_argument("--compile-estimate", type=float, default=150.0,
                        help="seconds a compilation is assumed to take, for the --max-seconds guard, until one is measured")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="cases that would not fit are skipped")
    parser.add_argument("--count-only", action="store_true", help="parameter counts and FLOPs only (meta device)")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after each case)")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.max_seconds

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()

    cfg = CONFIGS[args.config]
    tiny = args.config == "tiny"
    args.resolution = args.resolution or cfg["resolution"]
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    latent = args.resolution // 8
    args.steps = args.steps if args.steps is not None else (4 if tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.repeats = args.repeats if args.repeats is not None else (2 if tiny else 3)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    vae_dtype_name = args.vae_dtype or ("fp32" if dtype_name == "fp32" else "bf16")
    dtype, vae_dtype = DTYPES[dtype_name], DTYPES[vae_dtype_name]
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}.get(args.compile)
    if compile_modes is None:  # auto
        compile_modes = [False, True] if device.type == "cuda" else [False]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes; the warm-up pays for the search
        device_name = torch.cuda.get_device_name(device)
        device_memory_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    else:
        if not (tiny or args.count_only or args.device):
            parser.error("no GPU here: full SDXL generation on CPU would take hours; use --tiny, --count-only, "
                         "or --device cpu to insist")  # fmt: skip
        device_memory_gib = None
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    meta = build_models(cfg, "meta", dtype, vae_dtype)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in meta.items()}
    flops = {b: count_flops(meta, b, latent, args.guidance, dtype, vae_dtype) for b in dict.fromkeys(args.batch_sizes)}
    del meta
    result = {
        "benchmark": "gpu_generate", "config": args.config, "device": str(device), "device_name": device_name,
        "device_memory_gib": device_memory_gib, "dtype": str(dtype).removeprefix("torch."),
        "vae_dtype": str(vae_dtype).removeprefix("torch."), "resolution": args.resolution, "latent": latent,
        "steps": args.steps, "guidance": args.guidance, "unet_batch_factor": 2 if args.guidance > 1 else 1,
        "warmup": args.warmup, "repeats": args.repeats, "compile_mode": args.compile_mode,
        "scheduler": "EulerDiscreteScheduler", "prompt": "random ids, 77 tokens (no tokenizer)",
        "params": params, "reference": REFERENCE,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "cases": [],
    }  # fmt: skip
    if args.config == "sdxl":
        assert params == SDXL_COUNTS, f"SDXL configs give {params}, expected {SDXL_COUNTS}"

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    if args.count_only:
        print(f"{args.config} text-to-image parameters:")
        for name, n in params.items():
            print(f"  {name:<15} {n:>15,}")
        print(f"  {'total':<15} {sum(params.values()):>15,}")
        print(f"at {args.resolution}x{args.resolution}, guidance {args.guidance:g}:")
        for b, f in flops.items():
            print(f"  batch {b}: UNet step {f['unet_step_flops'] / 1e12:.2f} TFLOP (x{args.steps} steps = "
                  f"{args.steps * f['unet_step_flops'] / 1e12:.1f}), VAE decode {f['decode_flops'] / 1e12:.2f} TFLOP")
        result["flops"] = {str(b): f for b, f in flops.items()}
        save()
        return

    torch.manual_seed(0)
    models = build_models(cfg, device, dtype, vae_dtype)
    pipe = build_pipeline(models)
    vocab_size = cfg["text_1"]["vocab_size"]
    measured = {}  # (batch, compiled) -> median total_s, for the guard's estimates
    compile_s = []
    for compiled in (False, True):
        if compiled and compile_modes == [False]:
            for batch in args.batch_sizes:
                result["cases"].append({"batch": batch, "compile": True,
                                        "status": "skipped: no torch.compile on CPU unless --compile on/both"})  # fmt: skip
            continue
        if compiled not in compile_modes:
            continue
        if compiled:
            mode = None if args.compile_mode == "default" else args.compile_mode
            models["unet"].compile(mode=mode, dynamic=False)  # in place: pipe.unet stays the UNet module
        for batch in args.batch_sizes:
            per_gen = _per_generation(measured, batch)
            estimate = None
            if per_gen is not None:
                estimate = (args.warmup + args.repeats) * per_gen
                if compiled:
                    estimate += max(compile_s) if compile_s else args.compile_estimate
            case = {"batch": batch, "compile": compiled, "status": "running (killed if this stays)"}
            result["cases"].append(case)
            save()
            case.update(run_case(pipe, vocab_size, batch, compiled, args, device, deadline, estimate))
            f = flops[batch]
            case.update(unet_step_flops=f["unet_step_flops"], decode_flops=f["decode_flops"])
            if case.get("denoise_s"):
                measured[(batch, compiled)] = case["total_s"]
                case["unet_tflops"] = f["unet_step_flops"] * args.steps / case["denoise_s"] / 1e12
            if "compile_s" in case:
                compile_s.append(case["compile_s"])
            print(f"  batch {batch}, compile {'on' if compiled else 'off'}: {case['status']}"
                  + (f", {case['s_per_image']:.3f} s/image" if case.get("s_per_image") else "")
                  + (f", compiled in {case['compile_s']:.0f} s" if "compile_s" in case else ""), flush=True)  # fmt: skip
            save()
    result["wall_s"] = time.perf_counter() - started
    save()
    print_table(result)
    print(f"  total {result['wall_s']:.0f} s" + (f"; results in {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
