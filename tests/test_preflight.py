"""Every model, adapter, VAE and data path of a job is checked before Ray starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffplat.config import parse_config
from diffplat.preflight import PreflightError, check_job_paths


def _job(**stages) -> dict:
    return {"name": "preflight", **stages}


def _check(tmp_path, job: dict) -> None:
    check_job_paths(parse_config(job), lambda v: (tmp_path / v).resolve() if not Path(v).is_absolute() else Path(v))


def test_a_wrong_model_path_fails_fast_with_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(generate={"base_model": "models/sdxl-typo", "prompts": ["a road"]})))
    proc = subprocess.run([sys.executable, "-m", "diffplat", "run", str(job), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=60)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2
    assert lines == ["diffplat: generate.base_model: models/sdxl-typo is not a folder here, and as a hub id it is not "
                     "in the local hub cache (HF_HUB_OFFLINE=1)"], proc.stderr[-2000:]  # fmt: skip
    # fast because nothing started (what is checked, rather than the clock): no Ray, not even
    # the job's MLflow run
    assert "Ray" not in proc.stderr and not (tmp_path / "mlflow.db").exists()


def test_every_kind_of_path_is_named(tmp_path, tiny_sdxl, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "model.pt").write_bytes(b"pickle")
    (tmp_path / "empty-shards").mkdir()
    job = _job(
        prepare={"source": "folder", "folder": {"images": "no-images"}},
        train={"base_model": "not-a-model", "vae": "someorg/vae-not-cached", "data": "empty-shards",
               "max_train_steps": 1},
        generate={"base_model": str(tiny_sdxl), "lora": "model.pt", "prompts_file": "prompts.txt"},
        filter={"images": "elsewhere", "model": "weights/yolo.pt"},
        evaluate={"real": "bdd-yolo", "val": {"images": "bdd/val", "labels": ["det_val.json"]},
                  "synthetic": {"kept": "gens/dataset"}, "mixes": [{"name": "m", "add": {"kept": 1}}],
                  "detector": {"model": "detectors/yolov8m.pt"}},
    )  # fmt: skip
    with pytest.raises(PreflightError) as err:
        _check(tmp_path, job)
    lines = str(err.value).splitlines()
    fields = [line.split(":")[0] for line in lines]
    assert fields == ["prepare.folder.images", "train.base_model", "train.vae", "train.data", "generate.lora",
                      "generate.prompts_file", "filter.model", "filter.images", "evaluate.real",
                      "evaluate.val.images", "evaluate.val.labels[0]", "evaluate.synthetic.kept",
                      "evaluate.detector.model"]  # fmt: skip
    assert "not-a-model has no model_index.json" in lines[1]
    assert "someorg/vae-not-cached" in lines[2] and "hub cache" in lines[2]
    assert "a pickled LoRA (.pt) is refused" in lines[4]


def test_what_an_earlier_stage_writes_is_not_checked(tmp_path, tiny_sdxl, bdd_dir):
    job = _job(
        prepare={"bdd": {"images": str(bdd_dir / "images"), "labels": [str(p) for p in (bdd_dir / "labels").glob("*.json")]}},
        train={"base_model": str(tiny_sdxl), "data": "data/shards", "max_train_steps": 1, "output": "adapters/lora"},
        generate={"base_model": str(tiny_sdxl), "lora": "adapters/lora", "prompts": ["a road"], "output": "gen"},
        filter={"images": "gen"},
        evaluate={"real": "data/yolo", "val": {"images": str(bdd_dir / "images"), "labels": [str(bdd_dir / "labels")]},
                  "synthetic": {"kept": "gen/dataset"}, "mixes": [{"name": "m", "add": {"kept": 1}}]},
    )  # fmt: skip
    _check(tmp_path, job)  # no error: shards, adapter, images, YOLO sets come from the job itself


def test_an_output_that_would_replace_the_work_folder_or_an_input_is_refused(tmp_path, tiny_sdxl):
    """The issue's slip, through the user's door: `--set train.output=.` replaced the whole work
    folder. Refused before anything starts, the user's files untouched."""
    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(prepare={"source": "folder", "folder": {"images": "images"}},
                                       train={"base_model": str(tiny_sdxl), "data": "data/shards", "max_train_steps": 2})))  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "diffplat", "run", str(job), "--workdir", str(work), "--set",
                           "train.output=."], capture_output=True, text=True, env=os.environ.copy(), timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "train.output" in proc.stderr and "is the work folder" in proc.stderr, proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["images", "notes.txt"]  # not even mlflow.db
    # the job file itself, kept in a folder an output names
    (work / "jobs").mkdir()
    kept = work / "jobs" / "job.yaml"
    kept.write_text(job.read_text())
    proc = subprocess.run([sys.executable, "-m", "diffplat", "run", str(kept), "--workdir", str(work), "--set",
                           "train.output=jobs"], capture_output=True, text=True, env=os.environ.copy(), timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "train.output" in proc.stderr and "holds the job file" in proc.stderr, proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["images", "jobs", "notes.txt"]
    # an output that holds an input, or another stage's output
    model = tmp_path / "out" / "model"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    with pytest.raises(PreflightError, match=r"generate.output: .*out holds generate.base_model"):
        _check(tmp_path, _job(generate={"base_model": "out/model", "prompts": ["a road"], "output": "out"}))
    with pytest.raises(PreflightError, match=r"train.output: .*cache holds cache.output"):
        _check(tmp_path, _job(cache={"data": "data/shards", "base_model": "out/model", "output": "cache"},
                              train={"base_model": "out/model", "data": "data/shards", "output": "cache",
                                     "max_train_steps": 2}))  # fmt: skip


def test_training_workers_that_hold_every_cpu_of_our_own_ray_are_refused(tmp_path, tiny_sdxl):
    """2 workers x 1 CPU on a Ray of 2 CPUs left Ray Data no CPU to read with: the run waited for
    its first batch forever. Refused before anything starts, naming the field and a way out; a
    cluster's CPUs (ray.address) are not checked."""
    (tmp_path / "images").mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(ray={"num_cpus": 2}, prepare={"source": "folder", "folder": {"images": "images"}},
                                       train={"base_model": str(tiny_sdxl), "data": "data/shards", "max_train_steps": 2,
                                              "scaling": {"num_workers": 2, "cpus_per_worker": 1}})))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "diffplat", "run", str(job), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.scaling: 2 worker(s) x 1 CPU hold 2 of the 2 CPUs" in proc.stderr, proc.stderr[-2000:]
    assert "cpus_per_worker (e.g. 0.5)" in proc.stderr and not (tmp_path / "mlflow.db").exists()
    from diffplat.preflight import check_job_cpus

    check_job_cpus(parse_config(yaml.safe_load(job.read_text()) | {"ray": {"address": "ray://head:10001"}}))
    ok = yaml.safe_load(job.read_text())
    ok["train"]["scaling"]["cpus_per_worker"] = 0.5
    check_job_cpus(parse_config(ok))
