"""`diffplat import-flags`: a source 2 or source 5 training command line -> a diffplat job.

Source 2 is diffusers' train_text_to_image_lora_sdxl.py (behind shell scripts), source 5 SDXL
fine-tuning in plain PyTorch (`--data_dir --use_lora --lora_rank ...`). Every flag comes out as one
of: mapped (to job fields), noted (accepted, nothing to set, and why) or refused (what diffplat
cannot do, and why). Flags not given take the source's default where it differs from
diffplat's, listed as such: nothing changes meaning on the way, nothing is dropped unsaid.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable

import yaml

from diffplat.config import ConfigError, TrainConfig, parse_config


class ImportFlagsError(ConfigError):
    """A command line that cannot become a job: malformed, or missing what a job needs."""

    def __init__(self, message: str, refused: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.refused = refused or []


class _Refused(Exception):
    """Raised by a converter when this value (not the flag as such) is refused."""


class _Noted(Exception):
    """Raised by a converter when this value is accepted with nothing to set."""


Fields = dict[str, Any]  # dotted job field -> value


@dataclass(frozen=True)
class Rule:
    sources: str  # whose flag it is: "2", "5" or "25"
    apply: Callable[[list[str]], Fields] | None = None  # the flag's values -> job fields
    nargs: int | str = 1  # 0: a switch; 1: one value; "+": one or more
    refuse: str | None = None  # why diffplat cannot do what the flag asks
    note: str | None = None  # accepted with nothing to set, and why


# --- converters: values as typed -> job values; ValueError says what was expected ---


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _number(text: str) -> int | float:
    # 32 stays 32 in the YAML, 0.5 stays 0.5
    value = _float(text)
    return int(value) if value.is_integer() and re.fullmatch(r"[+-]?\d+", text) else value


def _choice(*allowed: str) -> Callable[[str], str]:
    def pick(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return text

    return pick


def to(field_: str, convert: Callable[[str], Any] = str) -> Callable[[list[str]], Fields]:
    return lambda values: {field_: convert(values[0])}


def switch(field_: str) -> Callable[[list[str]], Fields]:
    return lambda values: {field_: True}


def _rank(values: list[str]) -> Fields:
    # diffusers builds LoraConfig(r=rank, lora_alpha=rank): alpha follows rank (scale 1).
    rank = _int(values[0])
    return {"train.lora.rank": rank, "train.lora.alpha": rank}


def _resolution(values: list[str]) -> Fields:
    # Source 2's shell scripts pass `--resolution 1280 720` (width height); one value is square.
    if len(values) > 2:
        raise ValueError(f"expected WIDTH HEIGHT or one size, got {len(values)} values")
    sizes = [_int(v) for v in values]
    return {"train.resolution": [sizes[0], sizes[-1]]}


def _square(text: str) -> list[int]:
    return [_int(text)] * 2


ATTENTION = ["to_k", "to_q", "to_v"]
# Source 5's --lora_target_mode, by what its words mean and what apply_lora_to_unet in
# raw-pytorch-sdxl (public code with source 5's flags) targets: `attention` is the q/k/v projections of
# self- and cross-attention, `attention_out` adds their output projection, `all` is every
# Linear layer of the UNet: also the feed-forward, the transformer in/out projections and the
# time embeddings (names as peft matches them, by suffix).
TARGET_MODES = {
    "attention": ATTENTION,
    "attention_out": [*ATTENTION, "to_out.0"],
    "all": [*ATTENTION, "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_emb_proj",
            "linear_1", "linear_2"],
}  # fmt: skip


def _target_modules(text: str) -> list[str]:
    return list(TARGET_MODES[_choice(*TARGET_MODES)(text)])


def _precision(text: str) -> str:
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[_choice("bf16", "fp16", "fp32")(text)]


def _folder(values: list[str]) -> Fields:
    # A folder of images with same-named .txt captions: the `folder` prepare source writes the
    # shards to prepare.output (default `data`), where training reads them.
    return {"prepare.source": "folder", "prepare.folder.images": values[0], "train.data": "data/shards"}


def _resume(values: list[str]) -> Fields:
    if values[0] != "latest":
        raise _Refused("a diffusers (accelerate) checkpoint folder: diffplat goes on only from its own "
                       "checkpoints; `latest` resumes this job's newest")  # fmt: skip
    return {"train.resume_from_checkpoint": "latest"}


def _report_to(values: list[str]) -> Fields:
    if values[0] in ("tensorboard", "mlflow"):
        raise _Noted("diffplat records every run in MLflow (tracking.uri); nothing to set")
    tracker = "other trackers" if values[0] == "all" else values[0]
    raise _Refused(f"diffplat records runs in MLflow only (tracking.uri), not in {tracker}")


WANDB = "Weights & Biases: diffplat records runs in MLflow only (tracking.uri)"
EPOCHS = ("counts epochs; diffplat's {field} counts steps, and the steps in an epoch depend on the number of "
          "training rows, which the command line does not say: set {field} by hand")  # fmt: skip
NO_UPLOAD = "nothing is uploaded: diffplat keeps adapters in train.output and MLflow"
SDPA = "diffplat uses PyTorch's memory-efficient attention (SDPA); nothing to set"
RAY_WORKERS = "Ray starts the workers and feeds them (train.scaling); nothing to set"

S2, S5, BOTH = "2", "5", "25"

# Every training flag of sources 2 and 5: the documented ones and the scripts' others.
FLAGS: dict[str, Rule] = {
    # the model
    "--pretrained_model_name_or_path": Rule(S2, to("train.base_model")),
    "--pretrained_model": Rule(S5, to("train.base_model")),
    "--pretrained_vae_model_name_or_path": Rule(S2, to("train.vae")),
    "--vae_model": Rule(S5, to("train.vae")),
    "--variant": Rule(S2, to("train.variant")),
    "--revision": Rule(S2, refuse="no field for a hub revision: download that revision to a folder and "
                       "give the folder as the base model"),  # fmt: skip
    # the data
    "--train_data_dir": Rule(S2, _folder),
    "--data_dir": Rule(S5, _folder),
    "--dataset_name": Rule(S2, refuse="a hub dataset: nothing may be downloaded at run time; save it as images "
                           "with same-named .txt captions and give that folder as --train_data_dir"),  # fmt: skip
    "--dataset_config_name": Rule(S2, refuse="belongs to --dataset_name (a hub dataset, refused)"),
    "--image_column": Rule(S2, note="the folder source reads images by file; no column to name"),
    # diffusers' image folders keep captions in metadata.jsonl; the folder source reads that
    # file's caption field when the folder has one, else each image's same-named .txt
    "--caption_column": Rule(S2, to("prepare.folder.caption_column")),
    "--max_train_samples": Rule(S2, refuse="no field to cap the training rows: put fewer images in the folder"),
    "--val_data_dir": Rule(S5, refuse="a held-out loss set: diffplat validates with images from prompts "
                           "(train.validation.prompts)"),  # fmt: skip
    "--cache_dir": Rule(S2, note="the hub cache: set HF_HOME in the job's environment instead"),
    "--dataloader_num_workers": Rule(S2, note=RAY_WORKERS),
    "--num_workers": Rule(S5, note=RAY_WORKERS),
    # the adapter
    "--use_lora": Rule(S5, lambda values: {"train.kind": "lora"}, nargs=0),
    "--rank": Rule(S2, _rank),
    "--lora_rank": Rule(S5, to("train.lora.rank", _int)),
    "--lora_alpha": Rule(S5, to("train.lora.alpha", _number)),
    "--lora_dropout": Rule(S5, to("train.lora.dropout", _float)),
    "--lora_target_mode": Rule(S5, to("train.lora.target_modules", _target_modules)),
    "--train_text_encoder": Rule(S2, switch("train.train_text_encoder"), nargs=0),
    # the images
    "--resolution": Rule(S2, _resolution, nargs="+"),
    "--image_size": Rule(S5, to("train.resolution", _square)),
    "--center_crop": Rule(BOTH, switch("train.center_crop"), nargs=0),
    "--random_flip": Rule(BOTH, switch("train.random_flip"), nargs=0),
    # how long, in what batches
    "--num_train_epochs": Rule(S2, to("train.num_train_epochs", _int)),
    "--num_epochs": Rule(S5, to("train.num_train_epochs", _int)),
    "--max_train_steps": Rule(S2, to("train.max_train_steps", _int)),
    "--train_batch_size": Rule(S2, to("train.train_batch_size", _int)),
    "--batch_size": Rule(S5, to("train.train_batch_size", _int)),
    "--gradient_accumulation_steps": Rule(BOTH, to("train.gradient_accumulation_steps", _int)),
    "--gradient_checkpointing": Rule(BOTH, switch("train.gradient_checkpointing"), nargs=0),
    # the optimiser
    "--learning_rate": Rule(BOTH, to("train.learning_rate", _float)),
    "--scale_lr": Rule(S2, nargs=0, refuse="the scaled rate depends on the GPU count at run time: give "
                       "train.learning_rate already multiplied (x batch x accumulation x GPUs)"),  # fmt: skip
    "--lr_scheduler": Rule(S2, to("train.lr_scheduler")),
    "--lr_warmup_steps": Rule(S2, to("train.lr_warmup_steps", _int)),
    "--lr_num_cycles": Rule(S2, to("train.lr_num_cycles", _int)),
    "--lr_power": Rule(S2, to("train.lr_power", _float)),
    "--use_8bit_adam": Rule(S2, switch("train.use_8bit_adam"), nargs=0),
    "--adam_beta1": Rule(BOTH, to("train.adam_beta1", _float)),
    "--adam_beta2": Rule(BOTH, to("train.adam_beta2", _float)),
    "--adam_epsilon": Rule(S2, to("train.adam_epsilon", _float)),
    "--adam_weight_decay": Rule(BOTH, to("train.weight_decay", _float)),
    "--max_grad_norm": Rule(BOTH, to("train.max_grad_norm", _float)),
    # the loss
    "--snr_gamma": Rule(S2, to("train.snr_gamma", _float)),
    "--noise_offset": Rule(S2, to("train.noise_offset", _float)),
    "--proportion_empty_prompts": Rule(S2, to("train.proportion_empty_prompts", _float)),
    "--prediction_type": Rule(S2, to("train.prediction_type", _choice("epsilon", "v_prediction"))),
    "--use_ema": Rule(BOTH, switch("train.use_ema"), nargs=0),
    "--ema_decay": Rule(S5, to("train.ema_decay", _float)),
    # precision and speed
    "--mixed_precision": Rule(S2, to("train.mixed_precision", _choice("no", "fp16", "bf16"))),
    "--precision": Rule(S5, to("train.mixed_precision", _precision)),
    "--allow_tf32": Rule(S2, nargs=0, refuse="no field for TF32 matmuls: diffplat keeps PyTorch's default (off)"),
    "--enable_xformers_memory_efficient_attention": Rule(S2, nargs=0, note=SDPA),
    # outputs and checkpoints
    "--output_dir": Rule(BOTH, to("train.output")),
    "--checkpointing_steps": Rule(S2, to("train.checkpointing_steps", _int)),
    "--checkpoints_total_limit": Rule(S2, to("train.checkpoints_total_limit", _int)),
    "--save_interval": Rule(S5, refuse=EPOCHS.format(field="train.checkpointing_steps")),
    "--resume_from_checkpoint": Rule(S2, _resume),
    "--resume_from": Rule(S5, refuse="a source 5 .pt checkpoint: diffplat goes on only from its own checkpoints"),
    # validation
    "--validation_prompt": Rule(S2, lambda values: {"train.validation.prompts": list(values)}, nargs="+"),
    "--num_validation_images": Rule(S2, to("train.validation.num_images", _int)),  # see _validation
    "--validation_epochs": Rule(S2, refuse=EPOCHS.format(field="train.validation.every_n_steps")),
    # tracking and the rest
    "--report_to": Rule(S2, _report_to),
    "--logging_dir": Rule(S2, note="a TensorBoard folder: diffplat logs metrics to MLflow"),
    "--wandb_project": Rule(S5, refuse=WANDB),
    "--wandb_run_name": Rule(S5, refuse=WANDB),
    "--log_interval": Rule(S5, to("train.log_every", _int)),
    "--seed": Rule(BOTH, to("train.seed", _int)),
    "--push_to_hub": Rule(S2, nargs=0, refuse=NO_UPLOAD),
    "--hub_token": Rule(S2, refuse=NO_UPLOAD),
    "--hub_model_id": Rule(S2, refuse=NO_UPLOAD),
    "--local_rank": Rule(S2, note="set by the launcher: " + RAY_WORKERS),
    "--device": Rule(S5, note="Ray places the workers (train.scaling.use_gpu); nothing to set"),
}

SECRETS = {"--hub_token"}  # shown as *** wherever a flag is echoed

# What the source does when a flag is not given, where diffplat's default differs: diffusers'
# argparse defaults for source 2, the documented ones for source 5. (--num_train_epochs and
# --num_validation_images: see _length and _validation.)
SOURCE_DEFAULTS: dict[str, dict[str, Fields]] = {
    S2: {
        "--rank": {"train.lora.rank": 4, "train.lora.alpha": 4},
        "--train_batch_size": {"train.train_batch_size": 16},
        "--center_crop": {"train.center_crop": False},  # not given: diffusers crops at random
        "--checkpointing_steps": {"train.checkpointing_steps": 500},
        "--output_dir": {"train.output": "sd-model-finetuned-lora"},
    },
    S5: {
        "--lora_rank": {"train.lora.rank": 8},
        "--lora_alpha": {"train.lora.alpha": 32},
    },
}
S2_WARMUP = 500  # diffusers' --lr_warmup_steps default; only matters with a warming scheduler
S2_EPOCHS = 100  # diffusers' --num_train_epochs default
S2_VALIDATION_IMAGES = 4  # diffusers' --num_validation_images default

SOURCE_NAMES = {S2: "source 2 (diffusers' train_text_to_image_lora_sdxl.py)", S5: "source 5 (plain PyTorch SDXL)"}

# Launcher options that say something about the run; any other is noted and skipped.
LAUNCHER_WORKERS = ("--num_processes", "--nproc_per_node")  # accelerate: in all; torchrun: per node


@dataclass(frozen=True)
class Imported:
    job: dict  # accepted by diffplat.config.parse_config
    source: str  # "2" or "5"
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (flag as given, job fields)
    defaults: list[tuple[str, str]] = field(default_factory=list)  # (source flag not given, job fields)
    noted: list[tuple[str, str]] = field(default_factory=list)  # (flag, why nothing is set)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (flag, reason)

    def report_lines(self) -> list[str]:
        lines = [f"mapped  {flag} -> {fields}" for flag, fields in self.mapped]
        lines += [f"default {flag} -> {fields}" for flag, fields in self.defaults]
        lines += [f"noted   {flag}: {why}" for flag, why in self.noted]
        lines += [f"refused {flag}: {why}" for flag, why in self.refused]
        counts = [_count(len(self.mapped), "flag", "mapped"), _count(len(self.defaults), "source default", "used"),
                  _count(len(self.noted), "flag", "noted"), _count(len(self.refused), "flag", "refused")]
        lines.append(f"{SOURCE_NAMES[self.source]}: " + ", ".join(counts))
        return lines


def _count(n: int, what: str, done: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'} {done}"


def import_flags(argv: list[str]) -> Imported:
    """A training command line (launcher and script name optional) -> the job and its report.

    Raises ImportFlagsError for a malformed command line, one where no flag maps, or one that
    lacks what a job needs (base model, data, length); ConfigError if the job is invalid.
    """
    program, launcher, script = _split_program(list(argv))
    if not script:
        raise ImportFlagsError("no training flags given: diffplat import-flags [--out FILE] -- <command line>")
    refused: list[tuple[str, str]] = []
    flags = _tokenize(script, refused)
    state = _State(_detect_source(flags), refused=refused)
    _apply_launcher(state, program, launcher)
    for name, values in flags:
        _apply_flag(state, name, values)
    if not any(shown.startswith("--") for shown, _ in state.mapped):  # launcher options alone are no job
        raise ImportFlagsError("no flag could be mapped to a diffplat job", state.refused)
    _length(state)
    _validation(state)
    _source_defaults(state, {name for name, _ in flags})
    _require(state)
    job = _job(state)
    parse_config(job, "imported job")
    return Imported(job, state.source, _described(state.mapped), _described(state.defaults), state.noted,
                    state.refused)  # fmt: skip


# --- the command line ---


def _split_program(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(launcher words, launcher options, the script's flags). The script is the first word
    ending in .py: `accelerate launch ... train.py`, `torchrun ... train.py`, `python train.py`."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0].startswith("--"):
        return [], [], argv
    end = next((i + 1 for i, word in enumerate(argv) if _is_script(argv, i)), None)
    if end is None:  # a console script: its name, then flags
        end = next((i for i, word in enumerate(argv) if word.startswith("--")), len(argv))
    before = argv[:end]
    first_option = next((i for i, word in enumerate(before) if word.startswith("--")), len(before))
    words = before[:first_option] + [w for w in before[first_option:] if w.endswith(".py")]
    options = [w for w in before[first_option:] if not w.endswith(".py")]
    return words, options, argv[end:]


def _is_script(argv: list[str], i: int) -> bool:
    # a .py word that is no flag's value (`--config x.py` is not the script)
    return argv[i].endswith(".py") and not argv[i].startswith("-") and (i == 0 or argv[i - 1] not in FLAGS)


def _tokenize(argv: list[str], refused: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """`--flag v1 v2`, `--flag=v` and switches -> [(flag, values)]; words before any flag are
    refused (the scripts take only --flags)."""
    flags: list[tuple[str, list[str]]] = []
    for word in argv:
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            flags.append((name, [value] if eq else []))
        elif flags:
            flags[-1][1].append(word)
        else:
            refused.append((word, "not a flag: sources 2 and 5 take only --flags"))
    return flags


def _detect_source(flags: list[tuple[str, list[str]]]) -> str:
    """By the flags only one source has (source 5: --data_dir, --num_epochs, --image_size, ...);
    a tie (only shared flags) goes to source 2."""
    own = {s: sum(1 for name, _ in flags if name in FLAGS and FLAGS[name].sources == s) for s in (S2, S5)}
    return S5 if own[S5] > own[S2] else S2


# --- building the job ---


@dataclass
class _State:
    source: str
    fields: Fields = field(default_factory=dict)  # dotted field -> value
    origin: dict[str, str] = field(default_factory=dict)  # dotted field -> the flag that set it
    mapped: list[tuple[str, Fields | str]] = field(default_factory=list)  # (flag as given, fields or words)
    defaults: list[tuple[str, Fields | str]] = field(default_factory=list)
    noted: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)

    def set(self, shown: str, values: Fields) -> None:
        """Map a flag; one given again (or a script flag over a launcher option) wins, as in
        argparse, and the earlier one is noted as overridden."""
        for earlier in {self.origin[f] for f in values if f in self.origin}:
            self.mapped = [(flag, v) for flag, v in self.mapped if flag != earlier]
            self.noted.append((earlier, f"overridden by {shown}"))
        self.fields.update(values)
        self.origin.update({f: shown for f in values})
        self.mapped.append((shown, values))


def _shown(name: str, values: list[str]) -> str:
    shown = ["***"] * len(values) if name in SECRETS else [shlex.quote(v) for v in values]
    return " ".join([name, *shown])


def _apply_flag(state: _State, name: str, values: list[str]) -> None:
    shown = _shown(name, values)
    rule = FLAGS.get(name)
    if rule is None:
        state.refused.append((shown, "unknown to source 2 and source 5"))
        return
    _check_count(name, rule, values)
    if state.source not in rule.sources:
        other = S5 if state.source == S2 else S2
        state.refused.append((shown, f"a source {other} flag in a {SOURCE_NAMES[state.source]} command line"))
    elif rule.refuse:
        state.refused.append((shown, rule.refuse))
    elif rule.note:
        state.noted.append((shown, rule.note))
    else:
        try:
            state.set(shown, rule.apply(values))
        except _Refused as why:
            state.refused.append((shown, str(why)))
        except _Noted as why:
            state.noted.append((shown, str(why)))
        except ValueError as err:
            raise ImportFlagsError(f"{shown}: {err}") from None


def _check_count(name: str, rule: Rule, values: list[str]) -> None:
    if rule.nargs == 0 and values:
        raise ImportFlagsError(f"{name} is a switch and takes no value, got {' '.join(values)!r}")
    if rule.nargs != 0 and not values:
        raise ImportFlagsError(f"{name} needs a value ({name} VALUE or {name}=VALUE), and none was given")
    if rule.nargs == 1 and len(values) > 1:
        raise ImportFlagsError(f"{name} takes one value, got {len(values)}: {' '.join(values)}")


def _apply_launcher(state: _State, program: list[str], options: list[str]) -> None:
    """accelerate's --num_processes (all of them) or torchrun's --nproc_per_node (x --nnodes):
    one Ray worker per GPU process; accelerate's --mixed_precision, unless the script sets it."""
    launcher = " ".join(word for word in program if not word.endswith(".py"))
    given = dict(_tokenize(options, state.refused))
    nodes = given.pop("--nnodes", None) if "--nproc_per_node" in given else None
    for name, values in given.items():
        shown = f"{launcher} {_shown(name, values)}".strip()
        if name in LAUNCHER_WORKERS and len(values) == 1 and values[0].isdigit():
            workers = int(values[0])
            if nodes and len(nodes) == 1 and nodes[0].isdigit():  # torchrun: processes per node
                workers *= int(nodes[0])
                shown = f"{launcher} {_shown('--nnodes', nodes)} {_shown(name, values)}"
            state.set(shown, {"train.scaling.num_workers": workers, "train.scaling.use_gpu": True})
        elif name == "--mixed_precision" and values and values[0] in ("no", "fp16", "bf16"):
            state.set(shown, {"train.mixed_precision": values[0]})
        elif name == "--config_file":
            state.noted.append((shown, "accelerate's config file is not read: set train.scaling.num_workers and "
                                "train.mixed_precision from it by hand"))  # fmt: skip
        else:
            state.noted.append((shown, "a launcher option: " + RAY_WORKERS))


def _length(state: _State) -> None:
    """diffusers: --max_train_steps, when given, overrides --num_train_epochs (default 100)."""
    f = state.fields
    if "train.max_train_steps" in f and "train.num_train_epochs" in f:
        flag = state.origin.pop("train.num_train_epochs")
        del f["train.num_train_epochs"]
        state.mapped = [(shown, v) for shown, v in state.mapped if shown != flag]
        state.noted.append((flag, "--max_train_steps sets the length instead, as in diffusers"))
    elif state.source == S2 and "train.max_train_steps" not in f and "train.num_train_epochs" not in f:
        _default(state, "--num_train_epochs", {"train.num_train_epochs": S2_EPOCHS})
    if state.source == S2 and f.get("train.lr_scheduler", "constant") != "constant":
        if "train.lr_warmup_steps" not in f:  # diffusers warms up 500 steps unless told
            _default(state, "--lr_warmup_steps", {"train.lr_warmup_steps": S2_WARMUP})


def _validation(state: _State) -> None:
    """--num_validation_images is images per prompt (4 unless given). A diffplat lora makes one
    image per prompt, seeded seed + its index, so each prompt is listed that many times;
    validation.num_images counts training rows, and only for ic_lora and controlnet."""
    f = state.fields
    count = f.pop("train.validation.num_images", None)
    flag = state.origin.pop("train.validation.num_images", None)
    state.mapped = [(shown, v) for shown, v in state.mapped if shown != flag]
    prompts = f.get("train.validation.prompts")
    if not prompts:
        if flag:
            state.noted.append((flag, "no --validation_prompt: no validation images, as in the source"))
        return
    times = S2_VALIDATION_IMAGES if count is None else count
    repeated = {"train.validation.prompts": [p for p in prompts for _ in range(times)]}
    f.update(repeated)
    what = f"train.validation.prompts: each prompt {times} times (a lora makes one image per prompt)"
    if flag:
        state.mapped.append((flag, what))
    else:
        state.defaults.append((f"--num_validation_images (not given: {times})", what))


def _source_defaults(state: _State, given: set[str]) -> None:
    for name, values in SOURCE_DEFAULTS[state.source].items():
        if name not in given and not any(f in state.fields for f in values):
            _default(state, name, values)


def _default(state: _State, name: str, values: Fields, what: str | None = None) -> None:
    shown = f"{name} (not given: {what or _show(next(iter(values.values())))})"
    state.fields.update(values)
    state.defaults.append((shown, values))


def _require(state: _State) -> None:
    f = state.fields
    model_flag = "--pretrained_model_name_or_path" if state.source == S2 else "--pretrained_model"
    data_flag = "--train_data_dir" if state.source == S2 else "--data_dir"
    if "train.base_model" not in f:
        raise ImportFlagsError(f"no {model_flag}: a job needs its base model (train.base_model)", state.refused)
    if "train.data" not in f:
        if not any(flag.startswith("--dataset_name") for flag, _ in state.refused):
            raise ImportFlagsError(f"no {data_flag}: a job needs its training images (a folder of images with "
                                   "same-named .txt captions)", state.refused)  # fmt: skip
        # The hub dataset is refused; the job still reads shards, once they are made locally.
        f["train.data"] = "data/shards"
    if "train.num_train_epochs" not in f and "train.max_train_steps" not in f:
        raise ImportFlagsError("no --num_epochs: a job needs its length (train.num_train_epochs)", state.refused)


def _job(state: _State) -> dict:
    fields = {"name": _job_name(state.fields.get("train.output")), "train.kind": "lora", **state.fields}
    if "prepare.folder.images" not in fields:  # e.g. --caption_column of a refused hub dataset
        fields = {k: v for k, v in fields.items() if not k.startswith("prepare.")}
    job: dict = {}
    for dotted, value in fields.items():
        *parents, last = dotted.split(".")
        node = job
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    # train's keys in TrainConfig's order, prepare before train, as the shipped jobs read
    order = {name: i for i, name in enumerate(TrainConfig.model_fields)}
    job["train"] = dict(sorted(job["train"].items(), key=lambda kv: order.get(kv[0], len(order))))
    return {key: job[key] for key in ("name", "prepare", "train") if key in job}


def _job_name(output: str | None) -> str:
    """The output folder's last part, in letters, digits, `.`, `_` and `-` (it names Ray's run
    folder and the MLflow run)."""
    last = PurePosixPath(output.replace("\\", "/")).name if output else ""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip(".-_")
    return name or "imported"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _described(entries: list[tuple[str, Fields | str]]) -> list[tuple[str, str]]:
    return [(flag, values if isinstance(values, str) else ", ".join(f"{f}: {_show(v)}" for f, v in values.items()))
            for flag, values in entries]  # fmt: skip


# --- the command ---


def job_yaml(imported: Imported) -> str:
    """The job as YAML, headed by what was not carried over (refused) or came from defaults."""
    head = [f"# Imported by `diffplat import-flags` from a {SOURCE_NAMES[imported.source]} command line."]
    head += [f"# default {flag} -> {fields}" for flag, fields in imported.defaults]
    head += [f"# refused {flag}: {why}" for flag, why in imported.refused]
    body = yaml.safe_dump(imported.job, sort_keys=False, default_flow_style=None, width=100, allow_unicode=True)
    return "\n".join(head) + "\n" + body


def import_command(argv: list[str], out: str | None) -> None:
    """`diffplat import-flags [--out FILE] -- FLAGS`: YAML to stdout (or FILE, written whole),
    one line a flag on stderr. Raises ImportFlagsError (exit 2) when nothing maps."""
    from diffplat.fileio import write_text_atomic

    try:
        imported = import_flags(argv)
    except ImportFlagsError as err:
        for flag, why in err.refused:
            print(f"refused {flag}: {why}", file=sys.stderr)
        raise
    for line in imported.report_lines():
        print(line, file=sys.stderr)
    text = job_yaml(imported)
    if out:
        write_text_atomic(out, text)
        print(out)
    else:
        sys.stdout.write(text)
