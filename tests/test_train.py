"""The train stage: Ray Data -> Ray Train workers running DeepSpeed -> a diffusers LoRA."""

import json

import pytest
from safetensors.torch import load_file

from diffplat.config import parse_config
from diffplat.runner import run_job

pytestmark = pytest.mark.slow


def test_one_worker_zero0_accumulation_and_checkpoints(tmp_path, tiny_sdxl, bdd_dir, local_ray):
    config = parse_config({
        "name": "train-test",
        "prepare": {"bdd": {"images": str(bdd_dir / "images"), "seg_masks": str(bdd_dir / "masks"),
                            "labels": [str(p) for p in (bdd_dir / "labels").glob("*.json")]}},
        "train": {
            "base_model": str(tiny_sdxl), "data": "data/shards", "resolution": [64, 64],
            "lora": {"rank": 4, "alpha": 2}, "max_train_steps": 4, "train_batch_size": 2,
            "gradient_accumulation_steps": 2, "checkpointing_steps": 2, "checkpoints_total_limit": 1,
            "lr_scheduler": "linear", "learning_rate": 1e-3, "log_every": 1,
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}, "deepspeed": {"zero_stage": 0},
        },
    })
    result = run_job(config, tmp_path)
    adapter = tmp_path / "adapters" / "lora"
    weights = load_file(adapter / "pytorch_lora_weights.safetensors")
    b_weights = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert b_weights and all(k.startswith("unet.") for k in weights)
    assert any(v.abs().max() > 0 for v in b_weights), "LoRA B starts at zero: training must have moved it"
    info = json.loads((adapter / "adapter_info.json").read_text())
    assert info["step"] == 4 and info["rank"] == 4 and info["alpha"] == 2 and info["kind"] == "lora"
    assert result.outputs["train"]["step"] == 4
    # checkpoints_total_limit: Ray Train keeps only the newest
    checkpoints = list((tmp_path / "ray_results").rglob("checkpoint_*"))
    assert len([c for c in checkpoints if c.is_dir()]) == 1

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    runs = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                              filter_string="tags.`diffplat.stage` = 'train'")
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]  # optimizer steps, each of 2 micro-batches
    lrs = [m.value for m in client.get_metric_history(runs[0].info.run_id, "lr")]
    assert lrs[0] > lrs[-1]  # the linear schedule decays
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "adapter")] == [
        "adapter/.diffplat", "adapter/adapter_info.json", "adapter/pytorch_lora_weights.safetensors"]  # marker: ours
    prepare = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                                 filter_string="tags.`diffplat.stage` = 'prepare'")[0]  # fmt: skip
    assert prepare.data.metrics["skipped/corrupt image"] == 1  # each reason counted in MLflow


def test_resume_round_trip_equals_one_uninterrupted_run(tmp_path, tiny_sdxl, bdd_dir, local_ray):
    """8 steps in one run == 3 steps, then a resume from that checkpoint for the other 5: the
    same batches (shuffled, randomly cropped and flipped, across an epoch boundary), the same
    noise, timesteps, caption dropout and LoRA dropout, the same optimizer, lr and EMA. Then
    `resume_from_checkpoint: latest` goes on from the newest checkpoint of the job's runs."""
    import mlflow
    import torch

    def job(**train):
        return parse_config({
            "name": "roundtrip",
            "prepare": {"bdd": {"images": str(bdd_dir / "images"), "seg_masks": str(bdd_dir / "masks"),
                                "labels": [str(p) for p in (bdd_dir / "labels").glob("*.json")]}},
            "train": {"base_model": str(tiny_sdxl), "data": "data/shards", "resolution": [64, 64],
                      "center_crop": False, "random_flip": True, "proportion_empty_prompts": 0.3,
                      "lora": {"rank": 4, "alpha": 4, "dropout": 0.1}, "use_ema": True, "ema_decay": 0.9,
                      "max_train_steps": 8, "train_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "linear",
                      "log_every": 1, "checkpointing_steps": 3, "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
                      "deepspeed": {"zero_stage": 2}, **train},
        })  # fmt: skip

    def train_run(result):
        client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
        return client, client.search_runs([client.get_run(result.run_id).info.experiment_id],
                                          filter_string=f"tags.`diffplat.stage` = 'train' and tags.`mlflow.parentRunId` = '{result.run_id}'")[0]  # fmt: skip

    def history(result, metric: str) -> dict[int, float]:
        client, train = train_run(result)
        return {m.step: m.value for m in client.get_metric_history(train.info.run_id, metric)}

    whole = run_job(job(), tmp_path)
    adapter = tmp_path / "adapters" / "lora" / "pytorch_lora_weights.safetensors"
    uninterrupted = load_file(adapter)
    states = {json.loads(p.read_text())["step"]: p.parent for p in (tmp_path / "ray_results").glob("roundtrip-train-*/checkpoint_*/trainer_state.json")}
    state = json.loads((states[3] / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (0, 3)  # 12 rows, 2 a batch: 6 batches an epoch
    assert (states[3] / "rng" / "rank_000.safetensors").is_file() and (states[3] / "ema.safetensors").is_file()

    resumed = run_job(job(resume_from_checkpoint=str(states[3])), tmp_path)
    after_resume = load_file(adapter)
    assert set(after_resume) == set(uninterrupted)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(after_resume[key], value, rtol=1e-5, atol=1e-6, msg=key)
    first, second = history(whole, "loss"), history(resumed, "loss")
    assert sorted(second) == [4, 5, 6, 7, 8]
    assert [second[s] for s in second] == pytest.approx([first[s] for s in second], rel=1e-5)

    # `latest`: the newest checkpoint of the job's runs (the resumed run's last, step 8), on to 10
    latest = run_job(job(resume_from_checkpoint="latest", max_train_steps=10), tmp_path)
    assert json.loads((tmp_path / "adapters" / "lora" / "adapter_info.json").read_text())["step"] == 10
    assert any(not (load_file(adapter)[k] == after_resume[k]).all() for k in after_resume)
    assert sorted(history(latest, "loss")) == [9, 10]  # went on from 8, not from 0
    assert history(latest, "lr")[9] < 1e-3  # the schedule went on too; it did not restart
    assert len({whole.run_id, resumed.run_id, latest.run_id}) == 3

    from diffplat.config import ConfigError

    with pytest.raises(ConfigError, match="resume_from_checkpoint: .*nope is not a checkpoint"):
        run_job(job(resume_from_checkpoint=str(tmp_path / "nope")), tmp_path)
    # Load what was saved, not a guess: a LoRA of another shape is refused by name (the check
    # each resume makes in the loop before loading, on the module a rank-8 run would train)
    from diffplat.train.checkpoint import CheckpointMismatch, check_trained
    from diffplat.train.objectives import OBJECTIVES

    other = job(lora={"rank": 8, "alpha": 4}).train
    with pytest.raises(CheckpointMismatch, match="does not match this run: .*lora"):
        check_trained(state["trained"], OBJECTIVES["lora"](other, torch.device("cpu")).module, "checkpoint")


def test_a_lost_worker_restarts_from_the_last_checkpoint(tmp_path, tiny_sdxl, bdd_dir, local_ray):
    """A Ray Train worker killed by its pid mid-run: the group restarts from the last checkpoint
    and the run still ends at max_train_steps."""
    import os
    import signal
    import threading
    import time

    import mlflow
    import psutil

    config = parse_config({
        "name": "failure-test",
        "prepare": {"bdd": {"images": str(bdd_dir / "images"), "seg_masks": str(bdd_dir / "masks"),
                            "labels": [str(p) for p in (bdd_dir / "labels").glob("*.json")]}},
        "train": {"base_model": str(tiny_sdxl), "data": "data/shards", "resolution": [128, 128],
                  "lora": {"rank": 4, "alpha": 4}, "max_train_steps": 16, "train_batch_size": 2,
                  "learning_rate": 1e-3, "log_every": 1, "checkpointing_steps": 4,
                  "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 2},
                  "deepspeed": {"zero_stage": 0}},
    })  # fmt: skip
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(result=run_job(config, tmp_path)), daemon=True)
    job.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and job.is_alive():
        # Ray registers a reported checkpoint asynchronously: kill once a second one is on disk,
        # so that the first is surely registered and the restart can go on from it.
        if len(list((tmp_path / "ray_results").glob("failure-test-train-*/checkpoint_*/trainer_state.json"))) >= 2:
            # this test's own Ray only (its raylet is a child of this process): another test
            # process on the machine runs Ray Train workers of its own
            workers = [p for p in psutil.Process().children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline() or [])]  # fmt: skip
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    job.join(timeout=480)
    assert killed is not None, "the run ended before a worker could be killed"
    result = outcome["result"]
    info = json.loads((tmp_path / "adapters" / "lora" / "adapter_info.json").read_text())
    assert info["step"] == 16
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    train = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                               filter_string="tags.`diffplat.stage` = 'train'")[0]  # fmt: skip
    steps = [m.step for m in client.get_metric_history(train.info.run_id, "loss")]
    assert not psutil.pid_exists(killed) and set(steps) == set(range(1, 17))
    # The run finished although a worker died, so the group restarted; it went on from a
    # checkpoint (step 4 or later), not from step 0: only steps after it can repeat.
    repeated = [s for s in set(steps) if steps.count(s) > 1]
    assert not repeated or min(repeated) >= 5, steps


def test_text_encoder_lora_with_two_workers(tmp_path, tiny_sdxl, bdd_dir, local_ray):
    """LoRA on the UNet and both text encoders, 2 workers under ZeRO-2 (where other trainers
    break): one file stock diffusers loads whole, and its kohya export gives the same image."""
    import subprocess
    import sys

    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    config = parse_config({
        "name": "te-test",
        "prepare": {"bdd": {"images": str(bdd_dir / "images"), "seg_masks": str(bdd_dir / "masks"),
                            "labels": [str(p) for p in (bdd_dir / "labels").glob("*.json")]}},
        "train": {"base_model": str(tiny_sdxl), "data": "data/shards", "resolution": [64, 64],
                  "lora": {"rank": 4, "alpha": 8}, "train_text_encoder": True, "max_train_steps": 3,
                  "train_batch_size": 2, "learning_rate": 1e-2, "checkpointing_steps": 2,
                  "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, "deepspeed": {"zero_stage": 2}},
    })  # fmt: skip
    run_job(config, tmp_path)
    adapter = tmp_path / "adapters" / "lora"
    weights = load_file(adapter / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder", "text_encoder_2"}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        ups = [v for k, v in weights.items() if k.startswith(part + ".") and ("lora_B" in k or ".up." in k or "lora.up" in k)]
        assert ups and any(v.abs().max() > 0 for v in ups), f"{part}: its LoRA did not train"
    state = next((tmp_path / "ray_results").glob("te-test-train-*/checkpoint_*/trainer_state.json"))
    assert any(name.startswith("text_encoder_2.") for name in json.loads(state.read_text())["trained"])

    def image(folder=None, weight_name=None):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if folder:
            pipe.load_lora_weights(str(folder), weight_name=weight_name)
        embeds = pipe.encode_prompt("a road at night", device="cpu", do_classifier_free_guidance=False)[0]
        picture = pipe("a road at night", width=64, height=64, num_inference_steps=3, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
        return embeds, picture

    base_embeds, _ = image()
    embeds, picture = image(adapter)
    assert (embeds - base_embeds).abs().max() > 1e-4  # the text encoders' LoRA is loaded and acts
    out = tmp_path / "te_kohya.safetensors"
    proc = subprocess.run([sys.executable, "-m", "diffplat", "export-lora", str(adapter), "--format", "kohya",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    kohya = load_file(out)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    _, kohya_picture = image(out.parent, out.name)
    assert np.abs(kohya_picture - picture).max() < 1e-5
