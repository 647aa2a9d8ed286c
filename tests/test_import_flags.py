"""`diffplat import-flags`: source 2 and source 5 command lines -> job files (no Ray, no models)."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffplat.config import ConfigError, load_config, parse_config
from diffplat.import_flags import ImportFlagsError, import_flags

REPO = Path(__file__).resolve().parents[1]

# SOURCES.md section 2: diffusers' train_text_to_image_lora_sdxl.py as its shell scripts call it.
SOURCE_2 = shlex.split(
    "accelerate launch train_text_to_image_lora_sdxl.py"
    " --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0"
    " --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix --train_data_dir=data/bdd_lora"
    " --resolution 1280 720 --num_train_epochs 500 --learning_rate 5e-5 --train_batch_size 4 --rank 32"
    " --mixed_precision fp16 --gradient_checkpointing --checkpointing_steps 500 --resume_from_checkpoint latest"
    ' --validation_prompt "a street at night" "a highway in rain" --num_validation_images 2 --report_to wandb'
    " --output_dir runs/integration_test_sdxl_lora_train"
)
# SOURCES.md section 5: SDXL fine-tuning in plain PyTorch.
SOURCE_5 = shlex.split(
    "python train.py --data_dir data/pairs --use_lora --lora_rank 8 --lora_alpha 32 --lora_target_mode attention"
    " --batch_size 1 --gradient_accumulation_steps 4 --num_epochs 10 --learning_rate 1e-4 --output_dir out/sdxl"
    " --pretrained_model stabilityai/stable-diffusion-xl-base-1.0 --image_size 512 --precision bf16 --save_interval 2"
)
BASE = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]  # the least a source 2 line needs


def _refused(imported) -> list[str]:
    return [flag.split()[0] for flag, _ in imported.refused]


def test_source_2_example():
    imported = import_flags(SOURCE_2)
    job = parse_config(imported.job)
    train = job.train
    assert imported.source == "2" and job.name == "integration_test_sdxl_lora_train"
    assert job.prepare.source == "folder" and job.prepare.folder.images == "data/bdd_lora"
    assert (train.kind, train.base_model, train.vae) == ("lora", "stabilityai/stable-diffusion-xl-base-1.0",
                                                         "madebyollin/sdxl-vae-fp16-fix")  # fmt: skip
    assert (train.data, train.output) == ("data/shards", "runs/integration_test_sdxl_lora_train")
    assert train.resolution == (1280, 720)  # width height
    assert (train.num_train_epochs, train.max_train_steps) == (500, None)
    assert (train.learning_rate, train.train_batch_size) == (5e-5, 4)
    assert (train.lora.rank, train.lora.alpha) == (32, 32)  # diffusers: lora_alpha = rank
    assert train.lora.target_modules is None  # the family's default: on SDXL to_k, to_q, to_v, to_out.0, as diffusers
    assert (train.mixed_precision, train.gradient_checkpointing) == ("fp16", True)
    assert (train.checkpointing_steps, train.resume_from_checkpoint) == (500, "latest")
    # two images per prompt: each prompt twice, seeded apart
    assert train.validation.prompts == ["a street at night"] * 2 + ["a highway in rain"] * 2
    assert train.center_crop is False  # not given: diffusers crops at random
    assert _refused(imported) == ["--report_to"]
    assert "MLflow" in imported.refused[0][1]
    assert ("--rank 32", "train.lora.rank: 32, train.lora.alpha: 32") in imported.mapped
    assert not any("accelerate" in flag or ".py" in flag for flag, _ in imported.mapped + imported.refused)
    assert "scaling" not in imported.job["train"]  # no flag maps there: its defaults stay out


def test_source_5_example():
    imported = import_flags(SOURCE_5)
    job = parse_config(imported.job)
    train = job.train
    assert imported.source == "5" and job.name == "sdxl"
    assert job.prepare.source == "folder" and job.prepare.folder.images == "data/pairs"
    assert (train.kind, train.base_model, train.data, train.output) == (
        "lora", "stabilityai/stable-diffusion-xl-base-1.0", "data/shards", "out/sdxl")  # fmt: skip
    assert (train.lora.rank, train.lora.alpha) == (8, 32)
    assert train.lora.target_modules == ["to_k", "to_q", "to_v"]  # q/k/v; attention_out adds to_out.0
    assert (train.train_batch_size, train.gradient_accumulation_steps, train.num_train_epochs) == (1, 4, 10)
    assert (train.learning_rate, train.resolution, train.mixed_precision) == (1e-4, (512, 512), "bf16")
    assert _refused(imported) == ["--save_interval"]
    reason = imported.refused[0][1]
    assert "epochs" in reason and "checkpointing_steps" in reason
    assert "scaling" not in imported.job["train"]


@pytest.mark.parametrize("mode, modules", [
    ("attention", ["to_k", "to_q", "to_v"]),
    ("attention_out", ["to_k", "to_q", "to_v", "to_out.0"]),
    ("all", ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
             "time_emb_proj", "linear_1", "linear_2"]),
])  # fmt: skip
def test_lora_target_modes(mode, modules):
    imported = import_flags(["--data_dir", "d", "--pretrained_model", "m", "--num_epochs", "1",
                             "--lora_target_mode", mode])  # fmt: skip
    assert parse_config(imported.job).train.lora.target_modules == modules


def test_precision_fp32_is_no_mixed_precision():
    imported = import_flags(["--data_dir", "d", "--pretrained_model", "m", "--num_epochs", "1", "--precision", "fp32"])
    assert parse_config(imported.job).train.mixed_precision == "no"


def test_every_mapped_flag_family():
    imported = import_flags([*BASE, "--lr_scheduler", "cosine", "--snr_gamma", "5", "--noise_offset=0.05",
                             "--proportion_empty_prompts", "0.1", "--max_grad_norm", "0.5", "--adam_beta1", "0.8",
                             "--adam_beta2", "0.99", "--adam_epsilon", "1e-6", "--adam_weight_decay", "0.001",
                             "--use_8bit_adam", "--use_ema", "--train_text_encoder", "--prediction_type",
                             "v_prediction", "--gradient_accumulation_steps", "2", "--seed", "7", "--random_flip",
                             "--center_crop", "--resolution=1024", "--max_train_steps", "300"])  # fmt: skip
    train = parse_config(imported.job).train
    assert (train.lr_scheduler, train.lr_warmup_steps) == ("cosine", 500)  # diffusers warms up 500 unless told
    assert (train.snr_gamma, train.noise_offset, train.proportion_empty_prompts) == (5.0, 0.05, 0.1)
    assert (train.max_grad_norm, train.adam_beta1, train.adam_beta2, train.adam_epsilon) == (0.5, 0.8, 0.99, 1e-6)
    assert (train.weight_decay, train.use_8bit_adam, train.use_ema, train.train_text_encoder) == (0.001, True, True,
                                                                                                  True)  # fmt: skip
    assert (train.prediction_type, train.gradient_accumulation_steps, train.seed) == ("v_prediction", 2, 7)
    assert (train.random_flip, train.center_crop, train.resolution) == (True, True, (1024, 1024))
    assert (train.max_train_steps, train.num_train_epochs) == (300, None)
    assert imported.refused == []


def test_source_2_defaults_where_diffplat_differs():
    imported = import_flags(BASE)
    train = parse_config(imported.job).train
    assert (train.lora.rank, train.lora.alpha, train.train_batch_size, train.num_train_epochs) == (4, 4, 16, 100)
    assert (train.checkpointing_steps, train.center_crop, train.output) == (500, False, "sd-model-finetuned-lora")
    assert train.lr_warmup_steps == 0  # constant schedule: diffusers' 500 warm-up steps would do nothing
    assert any(flag.startswith("--rank (not given: 4)") for flag, _ in imported.defaults)


def test_max_train_steps_overrides_epochs_as_in_diffusers():
    imported = import_flags([*BASE, "--num_train_epochs", "3", "--max_train_steps", "50"])
    train = parse_config(imported.job).train
    assert (train.max_train_steps, train.num_train_epochs) == (50, None)
    assert [flag for flag, _ in imported.noted] == ["--num_train_epochs 3"]


def test_unknown_flag_is_refused_by_name():
    imported = import_flags([*BASE, "--frobnicate", "3", "--rank", "8"])
    assert ("--frobnicate 3", "unknown to source 2 and source 5") in imported.refused
    assert parse_config(imported.job).train.lora.rank == 8


def test_the_other_sources_flag_is_refused():
    imported = import_flags([*BASE, "--lora_rank", "8"])
    assert _refused(imported) == ["--lora_rank"] and "a source 5 flag" in imported.refused[0][1]


def test_missing_value_names_the_flag():
    with pytest.raises(ImportFlagsError, match=r"--rank needs a value"):
        import_flags([*BASE, "--rank", "--mixed_precision", "bf16"])
    with pytest.raises(ImportFlagsError, match=r"--learning_rate needs a value"):
        import_flags([*BASE, "--learning_rate"])


def test_bad_values_name_the_flag():
    with pytest.raises(ImportFlagsError, match=r"--rank abc: expected a whole number"):
        import_flags([*BASE, "--rank", "abc"])
    with pytest.raises(ImportFlagsError, match=r"--gradient_checkpointing is a switch"):
        import_flags([*BASE, "--gradient_checkpointing=yes"])
    with pytest.raises(ImportFlagsError, match=r"--precision fp8: expected one of bf16, fp16, fp32"):
        import_flags(["--data_dir", "d", "--precision", "fp8"])
    with pytest.raises(ConfigError, match=r"train.resolution"):  # parse_config's own check
        import_flags([*BASE, "--resolution", "1280", "721"])


def test_hub_dataset_is_refused_and_the_job_waits_for_shards():
    imported = import_flags(["--pretrained_model_name_or_path", "m", "--dataset_name", "lambdalabs/x",
                             "--caption_column", "text"])  # fmt: skip
    job = parse_config(imported.job)
    assert job.prepare is None and job.train.data == "data/shards"
    assert _refused(imported) == ["--dataset_name"] and "downloaded" in imported.refused[0][1]
    assert "prepare.folder.caption_column" in dict(imported.mapped).get("--caption_column text", "")


def test_report_to_mlflow_or_tensorboard_is_accepted():
    for tracker in ("mlflow", "tensorboard"):
        imported = import_flags([*BASE, "--report_to", tracker])
        assert imported.refused == [] and imported.noted[0][0] == f"--report_to {tracker}"


def test_launcher_options():
    argv = ["torchrun", "--nnodes", "2", "--nproc_per_node=8", "train_text_to_image_lora_sdxl.py", *BASE]
    scaling = parse_config(import_flags(argv).job).train.scaling
    assert (scaling.num_workers, scaling.use_gpu) == (16, True)
    argv = ["accelerate", "launch", "--mixed_precision", "fp16", "train.py", *BASE, "--mixed_precision", "bf16"]
    imported = import_flags(argv)
    assert parse_config(imported.job).train.mixed_precision == "bf16"  # the script's flag wins, as in diffusers
    assert imported.noted == [("accelerate launch --mixed_precision fp16", "overridden by --mixed_precision bf16")]


def test_secrets_are_not_echoed():
    imported = import_flags([*BASE, "--push_to_hub", "--hub_token", "hf_secret"])
    assert "hf_secret" not in repr(imported) and _refused(imported) == ["--push_to_hub", "--hub_token"]


def test_job_name_is_the_output_folder_sanitised():
    imported = import_flags([*BASE, "--output_dir", "runs/my run (v2)/"])
    assert imported.job["name"] == "my-run-v2"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffplat", "import-flags", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip


def test_cli_writes_the_job(tmp_path):
    out = tmp_path / "jobs" / "imported.yaml"
    done = _cli("--out", str(out), "--", *SOURCE_2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    lines = done.stderr.splitlines()
    assert "mapped  --rank 32 -> train.lora.rank: 32, train.lora.alpha: 32" in lines
    assert any(line.startswith("refused --report_to wandb: ") for line in lines)
    assert lines[-1].endswith("1 flag refused")
    config = load_config(out)  # the repo's loader reads what was written
    assert config.train.lora.rank == 32 and config.train.resolution == (1280, 720)
    assert config.model_dump() == parse_config(import_flags(SOURCE_2).job).model_dump()
    assert not list(out.parent.glob(".*tmp*"))  # written whole, under its own name


def test_cli_prints_the_job_and_exits_2_when_nothing_maps():
    done = _cli("--", *SOURCE_5)
    assert done.returncode == 0, done.stderr
    lora = yaml.safe_load(done.stdout)["train"]["lora"]
    assert lora == {"rank": 8, "alpha": 32, "target_modules": ["to_k", "to_q", "to_v"]}
    assert "refused --save_interval 2: " in done.stderr
    done = _cli("--", "--frobnicate", "3")
    assert done.returncode == 2 and done.stdout == ""
    assert "refused --frobnicate 3: unknown to source 2 and source 5" in done.stderr
    assert "no flag could be mapped" in done.stderr
    done = _cli("--", "--pretrained_model_name_or_path", "m", "--rank")
    assert done.returncode == 2 and "--rank needs a value" in done.stderr
