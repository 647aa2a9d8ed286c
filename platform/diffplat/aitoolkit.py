"""ai-toolkit's job files (`job: extension`, a `config.process` list of `sd_trainer`s), run as
diffplat jobs, and the output folder ai-toolkit writes.

The In-Context LoRA paper trains with `python run.py config/movie-shots.yml`; `diffplat run
movie-shots.yml` runs the same file. Every key of that recipe is mapped to a job field here, with
ai-toolkit's defaults for keys a file leaves out. What cannot be done as asked (8-bit
quantization or a CUDA device without a GPU, a second dataset) is said in one line each, and the
job goes on with the nearest thing; keys diffplat does not know are named. Paths are relative to
where the command runs, as ai-toolkit's are.

Outputs, as ai-toolkit lays them out in `<training_folder>/<name>/`: `<name>.safetensors`,
`<name>_<step:09d>.safetensors` (the kept checkpoints), `config.yaml` (the file as read), and
`samples/<ms>__<step:09d>_<i>.jpg`; running the same file again goes on from the newest
checkpoint. The prepared shards and Ray Train's checkpoints live beside it, in
`<training_folder>/.diffplat/<name>/`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("diffplat")

SAMPLES_DIR = "samples"

# Every linear layer of FLUX's double and single blocks: ai-toolkit's LoRA targets
AI_TOOLKIT_FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                           "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear"]  # fmt: skip

# ai-toolkit's defaults for the keys a job file leaves out
DEFAULTS = {
    "save": {"dtype": "float16", "save_every": 1000, "max_step_saves_to_keep": 5, "push_to_hub": False},
    "dataset": {"caption_ext": "txt", "caption_dropout_rate": 0.0, "shuffle_tokens": False, "resolution": 512,
                "cache_latents_to_disk": False},
    "train": {"batch_size": 1, "steps": 1000, "gradient_accumulation_steps": 1, "train_unet": True,
              "train_text_encoder": False, "gradient_checkpointing": True, "noise_scheduler": "ddpm",
              "optimizer": "adamw", "lr": 1e-6, "lr_scheduler": "constant", "dtype": "fp32", "max_grad_norm": 1.0,
              "cfg_scale": 1.0, "timestep_type": "sigmoid", "ema_config": {}},
    "network": {"type": "lora", "linear": 4, "linear_alpha": 1.0},
    "sample": {"sampler": "ddpm", "sample_every": 100, "width": 1024, "height": 1024, "prompts": [], "neg": "",
               "seed": 0, "walk_seed": True, "guidance_scale": 7.0, "sample_steps": 20},
}
KNOWN = {
    "top": {"job", "config", "meta"},
    "config": {"name", "process"},
    "process": {"type", "training_folder", "performance_log_every", "device", "trigger_word", "network", "save",
                "datasets", "train", "model", "sample"},
    "network": {"type", "linear", "linear_alpha"},
    "save": set(DEFAULTS["save"]),
    "dataset": set(DEFAULTS["dataset"]) | {"folder_path"},
    "train": set(DEFAULTS["train"]) | {"skip_first_sample", "disable_sampling", "linear_timesteps"},
    "model": {"name_or_path", "is_flux", "arch", "quantize", "low_vram", "is_xl"},
    "sample": set(DEFAULTS["sample"]),
}
DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "no", "float32": "no"}
SAVE_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}  # fmt: skip
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def is_aitoolkit_job(data: dict) -> bool:
    return data.get("job") == "extension" or isinstance(data.get("config"), dict) and "process" in data["config"]


def _numbers(value):
    """YAML 1.1 reads `1e-4` as a string; ai-toolkit's loader reads it as a number."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and NUMBER.match(value.strip()):
        return float(value) if any(c in value for c in ".eE") else int(value)
    return value


def _placeholders(value, name: str, where: str):
    """`[name]` -> config.name and `${ENV}` -> the variable, in every string."""
    if isinstance(value, dict):
        return {k: _placeholders(v, name, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v, name, where) for v in value]
    if isinstance(value, str):
        def env(match):
            if match.group(1) not in os.environ:
                from diffplat.config import ConfigError

                raise ConfigError(f"{where}: ${{{match.group(1)}}} is not set in the environment")
            return os.environ[match.group(1)]

        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", env, value.replace("[name]", name))
    return value


def _section(process: dict, key: str, where: str, notes: list[str]) -> dict:
    given = process.get(key) or {}
    if not isinstance(given, dict):
        from diffplat.config import ConfigError

        raise ConfigError(f"{where}.{key}: a mapping is needed, not {type(given).__name__}")
    _unknown(given, KNOWN[key], f"{where}.{key}", notes)
    return {**DEFAULTS.get(key, {}), **given}


def _unknown(given: dict, known: set, where: str, notes: list[str]) -> None:
    for key in sorted(set(given) - known):
        notes.append(f"{where}.{key}: not an ai-toolkit key diffplat knows; ignored")


def to_job(data: dict, job_file: str | Path, cwd: str | Path | None = None) -> tuple[dict, list[str]]:
    """A diffplat job (a dict for parse_config) from an ai-toolkit job file's contents, and one
    note per thing done otherwise than the file asks. Relative paths are made absolute against
    `cwd` (where the command runs)."""
    from diffplat.config import ConfigError

    where = str(job_file)
    cwd = Path(cwd or os.getcwd())
    notes: list[str] = []
    _unknown(data, KNOWN["top"], where, notes)
    config = data.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("process"), list) or not config["process"]:
        raise ConfigError(f"{where}: an ai-toolkit job needs config.process, a list of processes")
    _unknown(config, KNOWN["config"], f"{where}: config", notes)
    name = str(config.get("name") or Path(job_file).stem)
    if len(config["process"]) > 1:
        notes.append(f"{where}: config.process has {len(config['process'])} processes; diffplat runs the first")
    process = _numbers(_placeholders(config["process"][0], name, where))
    at = f"{where}: config.process[0]"
    if not isinstance(process, dict):
        raise ConfigError(f"{at}: a mapping is needed")
    if process.get("type") != "sd_trainer":
        raise ConfigError(f"{at}.type is {process.get('type')!r}; diffplat runs ai-toolkit's sd_trainer processes")
    _unknown(process, KNOWN["process"], at, notes)

    def path(value) -> str:
        return str((cwd / str(value)).resolve()) if not Path(str(value)).is_absolute() and "://" not in str(value) else str(value)

    network, save = _section(process, "network", at, notes), _section(process, "save", at, notes)
    train, model, sample = (_section(process, k, at, notes) for k in ("train", "model", "sample"))
    datasets = process.get("datasets") or []
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        raise ConfigError(f"{at}.datasets: a list of datasets (folder_path, caption_ext, ...) is needed")
    if len(datasets) > 1:
        notes.append(f"{at}.datasets: {len(datasets)} datasets; diffplat trains on the first ({datasets[0].get('folder_path')})")
    _unknown(datasets[0], KNOWN["dataset"], f"{at}.datasets[0]", notes)
    dataset = {**DEFAULTS["dataset"], **datasets[0]}
    if "folder_path" not in dataset:
        raise ConfigError(f"{at}.datasets[0].folder_path: the folder of images and captions is needed")
    if "name_or_path" not in model:
        raise ConfigError(f"{at}.model.name_or_path: the base model is needed")
    if network["type"] != "lora":
        raise ConfigError(f"{at}.network.type is {network['type']!r}; diffplat trains LoRAs (type: lora)")
    if not train["train_unet"]:
        raise ConfigError(f"{at}.train.train_unet is false: diffplat trains the denoiser's LoRA")
    if str(dataset["caption_ext"]).lstrip(".") != "txt":
        raise ConfigError(f"{at}.datasets[0].caption_ext is {dataset['caption_ext']!r}; diffplat reads .txt captions")

    import torch

    gpu = str(process.get("device", "cuda")).startswith("cuda")
    if gpu and not torch.cuda.is_available():
        notes.append(f"{at}.device {process.get('device', 'cuda')}: no GPU here; training on the CPU")
        gpu = False
    if model.get("quantize"):
        notes.append(f"{at}.model.quantize: 8-bit quantization (optimum-quanto on a GPU) is not done here; the "
                     "transformer trains unquantized")  # fmt: skip
    if model.get("low_vram"):
        notes.append(f"{at}.model.low_vram: no effect in diffplat")
    if dataset["shuffle_tokens"]:
        notes.append(f"{at}.datasets[0].shuffle_tokens: captions are kept in order")
    if train["optimizer"] not in ("adamw", "adamw8bit"):
        notes.append(f"{at}.train.optimizer {train['optimizer']}: diffplat trains with AdamW")
    if train["optimizer"] == "adamw8bit" and not gpu:
        notes.append(f"{at}.train.optimizer adamw8bit: needs bitsandbytes on a GPU; AdamW instead")
    if train["lr_scheduler"] != "constant":
        notes.append(f"{at}.train.lr_scheduler {train['lr_scheduler']}: passed to diffusers' get_scheduler")
    if train.get("linear_timesteps"):
        notes.append(f"{at}.train.linear_timesteps: noise levels are drawn by train.flow.timestep_sampling (sigmoid)")
    if str(train["timestep_type"]) not in ("sigmoid", "logit_normal", "mode", "uniform"):
        notes.append(f"{at}.train.timestep_type {train['timestep_type']}: sigmoid instead")
    sizes = dataset["resolution"] if isinstance(dataset["resolution"], list) else [dataset["resolution"]]
    side = int(max(sizes))
    if len(sizes) > 1:
        notes.append(f"{at}.datasets[0].resolution {sizes}: aspect-ratio buckets of {side}x{side}'s area (ai-toolkit "
                     "trains a copy of the data at each size)")  # fmt: skip
    if dataset["cache_latents_to_disk"]:
        notes.append(f"{at}.datasets[0].cache_latents_to_disk: latents are encoded as training goes (a cache holds "
                     "one resolution; buckets need the pixels)")  # fmt: skip
    if save["push_to_hub"]:
        notes.append(f"{at}.save.push_to_hub: nothing is pushed; the LoRA stays in the output folder")
    ema = train.get("ema_config") or {}
    output = Path(path(process.get("training_folder", "output"))) / name
    own = output.parent / ".diffplat" / name  # shards and Ray Train checkpoints, beside the output
    samples_on = not train.get("disable_sampling")
    job = {
        "name": name,
        "prepare": {"source": "folder", "folder": {"images": path(dataset["folder_path"])},
                    "output": str(own / "data"),
                    **({"caption_prefix": f"{process['trigger_word']}, "} if process.get("trigger_word") else {})},
        "train": {
            "kind": "lora",  # the In-Context LoRA recipe (mode composite) is a plain LoRA on whole composites
            "base_model": path(model["name_or_path"]) if Path(cwd / str(model["name_or_path"])).exists()
            else str(model["name_or_path"]),
            "data": str(own / "data" / "shards"),
            "output": str(output),
            "resolution": [side, side],
            "buckets": {"max_buckets": 8},
            "lora": {"rank": int(network["linear"]), "alpha": float(network["linear_alpha"]),
                     "target_modules": AI_TOOLKIT_FLUX_TARGETS},
            "max_train_steps": int(train["steps"]),
            "train_batch_size": int(train["batch_size"]),
            "gradient_accumulation_steps": int(train["gradient_accumulation_steps"]),
            "gradient_checkpointing": bool(train["gradient_checkpointing"]),
            "learning_rate": float(train["lr"]),
            "lr_scheduler": str(train["lr_scheduler"]),
            "max_grad_norm": float(train["max_grad_norm"]),
            "use_8bit_adam": train["optimizer"] == "adamw8bit" and gpu,
            "use_ema": bool(ema.get("use_ema", False)),
            "ema_decay": float(ema.get("ema_decay", 0.999)),
            "mixed_precision": DTYPES.get(str(train["dtype"]), "no"),
            "train_text_encoder": bool(train["train_text_encoder"]),
            "proportion_empty_prompts": float(dataset["caption_dropout_rate"]),
            "max_sequence_length": 512,
            "flow": {"guidance_scale": float(train["cfg_scale"]),
                     "timestep_sampling": train["timestep_type"] if train["timestep_type"] in (
                         "sigmoid", "logit_normal", "mode", "uniform") else "sigmoid"},
            "checkpointing_steps": int(save["save_every"]),
            "checkpoints_total_limit": int(save["max_step_saves_to_keep"]),
            "resume_from_checkpoint": "latest",  # running the file again goes on, as ai-toolkit does
            "validation": {
                "every_n_steps": int(sample["sample_every"]) if samples_on else None,
                "before_training": samples_on and not train.get("skip_first_sample", False),
                "prompts": [str(p) for p in sample["prompts"]] if samples_on else [],
                "num_inference_steps": int(sample["sample_steps"]),
                "guidance_scale": float(sample["guidance_scale"]),
                "seed": int(sample["seed"]),
                "resolution": [int(sample["width"]), int(sample["height"])],
            },
            "ai_toolkit_layout": {"name": name, "job_file": str(Path(job_file).resolve()),
                                  "dtype": SAVE_DTYPES.get(str(save["dtype"]), "float16")},
            "scaling": {"num_workers": 1, "use_gpu": gpu, "storage_path": str(own / "ray_results")},
        },
    }
    if not sample["walk_seed"]:
        notes.append(f"{at}.sample.walk_seed false: each prompt still gets seed + i")
    return job, notes


def write_layout(folder: Path, layout, final_weights: Path, step: int, checkpoints: list[tuple[Path, int]],
                 samples: Path | None) -> None:  # fmt: skip
    """Lay out `folder` (an adapter folder being written) as ai-toolkit does: the final LoRA as
    `<name>.safetensors` with its step in the header's `training_info`, each kept checkpoint's
    LoRA as `<name>_<step:09d>.safetensors`, the job file as `config.yaml`, the samples."""
    import json
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[layout.dtype]

    def write(source: Path, target: Path, at_step: int) -> None:
        with safe_open(str(source), "pt") as f:
            tensors = {k: f.get_tensor(k).to(dtype).contiguous() for k in f.keys()}
            metadata = dict(f.metadata() or {})
        metadata["training_info"] = json.dumps({"step": at_step})
        save_file(tensors, str(target), metadata=metadata)

    write(final_weights, folder / f"{layout.name}.safetensors", step)
    final_weights.unlink()
    for weights, at_step in checkpoints:
        if at_step != step:
            write(weights, folder / f"{layout.name}_{at_step:09d}.safetensors", at_step)
    if layout.job_file and Path(layout.job_file).is_file():
        text = Path(layout.job_file).read_text().replace("[name]", layout.name)
        (folder / "config.yaml").write_text(text)
    if samples is not None and samples.is_dir():
        shutil.copytree(samples, folder / SAMPLES_DIR, dirs_exist_ok=True)
