"""The source systems' inference command lines, run as diffplat generate jobs.

`diffplat infer --infer_config FILE` takes source 2's inference YAML unchanged;
`diffplat generate --prompt ... --lora-checkpoint ...` takes source 5's generation flags.
Both become one `generate` stage (Ray Data replicas, metadata, MLflow) run in the current
folder, so what their users get is what a diffplat job gives, under the names they know.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffplat.config import ConfigError, JobConfig, apply_override, parse_config, read_yaml_mapping

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
# Source 2's inference YAML, key by key (SOURCES.md, section 2); `num_inference_steps`,
# `seed` and `scheduler` are read too when present. Its scripts ran the pipeline's defaults.
SOURCE2_PATHS = {"base_model_path", "lora_weights_path", "pretrained_vae_model_name_or_path", "infer_path"}
SOURCE2_KEYS = {"paths", "prompt", "negative_prompt", "adapter_scale", "resolution", "num_generations",
                "guidance_scale", "num_inference_steps", "seed", "scheduler"}  # fmt: skip
PIPELINE_DEFAULT_STEPS = 50  # StableDiffusionXLPipeline's own default, which source 2's script used


def _next_batch(folder: Path) -> Path:
    """Source 2 organises its outputs by generation batch: batch_001, batch_002, ..."""
    taken = [int(p.name.split("_")[1]) for p in folder.glob("batch_[0-9]*") if p.name.split("_")[1].isdigit()]
    return folder / f"batch_{max(taken, default=0) + 1:03d}"


def _job(generate: dict, name: str, overrides: list[str], source: str) -> JobConfig:
    data = {"name": name, "generate": {k: v for k, v in generate.items() if v is not None}}
    for item in overrides:  # --set generate.num_inference_steps=20, as `diffplat run` takes them
        apply_override(data, item, Path(source))
    return parse_config(data, source)


def infer_config_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Source 2's `--infer_config` YAML -> a job whose generate stage writes into infer_path."""
    path = Path(path)
    data = read_yaml_mapping(path, "inference YAML (--infer_config)")
    unknown = sorted(set(data) - SOURCE2_KEYS) + sorted(f"paths.{k}" for k in set(data.get("paths") or {}) - SOURCE2_PATHS)
    if unknown:
        raise ConfigError(f"--infer_config: {path} has keys source 2's inference YAML does not: {', '.join(unknown)}")
    paths = data.get("paths") or {}
    for key in ("base_model_path", "infer_path"):
        if not paths.get(key):
            raise ConfigError(f"--infer_config: {path} needs paths.{key}")
    if not data.get("prompt"):
        raise ConfigError(f"--infer_config: {path} needs a prompt")
    resolution = data.get("resolution") or {}
    if not isinstance(resolution, dict):
        raise ConfigError(f"--infer_config: {path}: resolution is a mapping of width and height, got {resolution!r}")
    # Relative paths are relative to the folder the command runs in, as with source 2's scripts.
    generate = {
        "base_model": paths["base_model_path"],
        "lora": paths.get("lora_weights_path"),
        "vae": paths.get("pretrained_vae_model_name_or_path"),
        "prompts": [data["prompt"]],
        "negative_prompt": data.get("negative_prompt") or "",
        "adapter_scale": data.get("adapter_scale", 1.0),
        "resolution": [resolution.get("width", 1024), resolution.get("height", 1024)],
        "num_generations": data.get("num_generations", 1),
        "guidance_scale": data.get("guidance_scale", 5.0),
        "num_inference_steps": data.get("num_inference_steps", PIPELINE_DEFAULT_STEPS),
        "seed": data.get("seed", 0),
        "scheduler": data.get("scheduler", "default"),
        "output": str(_next_batch(Path(paths["infer_path"]).resolve())),
    }
    return _job(generate, "infer", overrides, str(path))


def generate_parser(sub) -> None:
    """`diffplat generate`: source 5's generation flags, same names and defaults."""
    g = sub.add_parser("generate", help="generate images with source 5's flags (a LoRA checkpoint, prompts)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    g.add_argument("--prompt-file", help="one prompt a line")
    g.add_argument("--lora-checkpoint", help="a LoRA .safetensors file or folder (a pickled .pt is refused)")
    g.add_argument("--base-model", default=SDXL_BASE, help="an SDXL pipeline folder or hub id")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--batch-size", type=int, default=1, help="per GPU")
    g.add_argument("--image-size", type=int, default=1024)
    g.add_argument("--output-dir", default="generated")
    g.add_argument("--num-gpus", type=int, default=None, help="replicas, one per GPU (default: every GPU of the "
                   "cluster the command runs on; 1 on CPU)")  # fmt: skip
    g.add_argument("--output-format", choices=["coco", "simple"], default="coco")
    g.add_argument("--scheduler", choices=["ddpm", "euler", "ddim"], default=None)
    g.add_argument("--num-inference-steps", type=int, default=30)
    g.add_argument("--guidance-scale", type=float, default=5.0)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-images", type=int, default=None)
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other job field, e.g. generate.dtype=bfloat16")


def generate_job(args: argparse.Namespace, overrides: list[str] = (), gpus: int = 0) -> JobConfig:
    """Source 5's generation flags as a job; `gpus`: the cluster's (cluster.cluster_gpus), which
    `--num-gpus` defaults to, one replica each."""
    replicas = args.num_gpus or max(1, gpus)
    generate = {
        "base_model": args.base_model,
        "lora": args.lora_checkpoint,
        "prompts": args.prompt,
        "prompts_file": args.prompt_file,
        "num_generations": args.num_images,
        "batch_size": args.batch_size,
        "resolution": [args.image_size, args.image_size],
        "output": args.output_dir,
        "replicas": replicas,
        "gpus_per_replica": 1 if gpus else 0,
        "output_format": args.output_format,
        "scheduler": args.scheduler or "default",
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "max_images": args.max_images,
        "dtype": "bfloat16" if gpus else "float32",
    }
    if not args.prompt and not args.prompt_file:
        raise ConfigError("generate: give --prompt or --prompt-file")
    return _job(generate, "generate", overrides, "command line")
