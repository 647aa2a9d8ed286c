"""One MLflow run per job, a nested run per stage, in a real SQLite store."""

import mlflow
import pytest

from diffplat import tracking
from diffplat.config import parse_config


@pytest.fixture
def job():
    return parse_config({"name": "tracked", "tracking": {"experiment": "exp-t"},
                         "train": {"base_model": "m", "data": "d", "max_train_steps": 3, "lora": {"rank": 2}}})


def test_job_and_stage_runs(tmp_path, job):
    with tracking.job_run(job, tmp_path) as parent_id:
        with tracking.stage_run("train", {"lr": 0.1}) as stage_id:
            tracking.log_metrics({"loss": 0.5}, step=1)
            tracking.log_metrics({"loss": 0.25}, step=2)
            (tmp_path / "report.json").write_text("{}")
            tracking.log_artifacts(tmp_path / "report.json")
    assert (tmp_path / "mlflow.db").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, stage = client.get_run(parent_id), client.get_run(stage_id)
    assert parent.data.params["train.lora.rank"] == "2"
    assert parent.data.params["train.resolution"] == "[1024, 1024]"
    assert stage.data.tags["mlflow.parentRunId"] == parent_id
    assert stage.info.experiment_id == parent.info.experiment_id
    assert [m.value for m in client.get_metric_history(stage_id, "loss")] == [0.5, 0.25]
    assert [a.path for a in client.list_artifacts(parent_id)] == ["config.yaml"]
    assert [a.path for a in client.list_artifacts(stage_id)] == ["report.json"]
    # artifacts stay in the work folder, not in ./mlruns of whatever process logged them
    assert stage.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri())


def test_env_uri_wins(tmp_path, monkeypatch, job):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert tracking.tracking_uri(job.tracking, tmp_path) == f"sqlite:///{tmp_path / 'other.db'}"


def test_only_rank_zero_logs(tmp_path, job):
    with tracking.job_run(job, tmp_path) as run_id:
        pass
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.RankZeroLogger(uri, run_id, rank=1).log_metrics({"loss": 9.0}, step=1)
    tracking.RankZeroLogger(uri, run_id, rank=0).log_metrics({"loss": 1.0}, step=1)
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
    assert [m.value for m in history] == [1.0]


def test_flatten_nests_and_truncates():
    flat = tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 7000})
    assert flat["a.b"] == "1" and flat["a.c"] == "[1, 2]" and len(flat["d"]) == 6000
