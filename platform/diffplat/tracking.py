"""MLflow: one run per job, one nested run per stage; only rank 0 of a training job logs.

The store is `$MLFLOW_TRACKING_URI` when set, else the job's `tracking.uri`, else a SQLite file
in the work folder. For a local store, experiments get an explicit artifact folder next to it:
without one, artifacts land in `./mlruns` of whatever process logs them (inside a Ray worker, a
temporary session folder that is later deleted).
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from diffplat.config import JobConfig, TrackingConfig, to_yaml

_PARAM_MAX = 6000  # MLflow's limit on one param value


def tracking_uri(config: TrackingConfig, workdir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or config.uri or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def _local_artifacts(uri: str, workdir: Path) -> str | None:
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (workdir / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides where artifacts go


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """{"train": {"lora": {"rank": 4}}} -> {"train.lora.rank": "4"}."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        text = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)
        out[prefix.rstrip(".")] = text[:_PARAM_MAX]
    return out


def _experiment_id(mlflow, name: str, artifact_location: str | None) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it first
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def run_tags(config: JobConfig) -> dict[str, str]:
    """What the MLflow runs table compares runs by: job, adapter kind, base model, dataset."""
    tags = {"diffplat.job": config.name}
    for section in (config.train, config.generate, config.cache):
        if section is not None and "diffplat.base_model" not in tags:
            tags["diffplat.base_model"] = section.base_model
    if config.train is not None:
        tags["diffplat.kind"] = config.train.kind
    elif config.generate is not None:
        tags["diffplat.kind"] = config.generate.kind
    if config.prepare is not None:
        source = getattr(config.prepare, config.prepare.source)
        where = next((getattr(source, f) for f in ("images", "csv", "path", "list_file") if getattr(source, f, None)), "")
        tags["diffplat.dataset"] = f"{config.prepare.source}:{where}"
    elif config.train is not None:
        tags["diffplat.dataset"] = config.train.cache or config.train.data
    return tags


@contextmanager
def job_run(config: JobConfig, workdir: Path) -> Iterator[str]:
    """The job's parent run; params are the whole resolved config. Yields the run id."""
    import mlflow

    uri = tracking_uri(config.tracking, workdir)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; put the user's value back afterwards so
    # that the next job in this process resolves its own store.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = _experiment_id(mlflow, config.tracking.experiment, _local_artifacts(uri, workdir))
        with mlflow.start_run(experiment_id=experiment_id, run_name=config.name) as run:
            mlflow.set_tags({**run_tags(config), "diffplat.stages": ",".join(config.stages())})
            mlflow.log_params(flatten(config.model_dump(mode="json", exclude_none=True)))
            mlflow.log_text(to_yaml(config), "config.yaml")
            yield run.info.run_id
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@contextmanager
def stage_run(stage: str, params: dict, tags: dict[str, str] | None = None, variant: str | None = None) -> Iterator[str]:
    """A run nested in the current run, for one stage (or one `variant` inside a stage's run),
    named `<job>/<stage>[/<variant>]` and tagged like its job, so the runs table can be filtered
    and compared by stage across jobs."""
    import mlflow

    parent = mlflow.active_run()
    # Without experiment_id a nested run lands in the "Default" experiment, not its parent's.
    experiment_id = parent.info.experiment_id if parent else None
    name = f"{tags['diffplat.job']}/{stage}" if tags else stage
    extra = {"diffplat.stage": stage}
    if variant is not None:
        name, extra["diffplat.variant"] = f"{name}/{variant}", variant
    with mlflow.start_run(run_name=name, nested=True, experiment_id=experiment_id) as run:
        mlflow.set_tags({**(tags or {}), **extra})
        mlflow.log_params(flatten(params))
        yield run.info.run_id


def metric_key(name: str) -> str:
    """A name MLflow takes as a metric key (letters, digits, `_-. :/`): "real+kept/map50" -> "real_kept/map50"."""
    return re.sub(r"[^\w.\-/: ]+", "_", name)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()}, step=step)


def log_artifacts(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path)


class RankZeroLogger:
    """Logs into an existing run from a training worker; a no-op on every rank but 0."""

    def __init__(self, uri: str | None, run_id: str | None, rank: int):
        self.enabled = rank == 0 and uri is not None and run_id is not None
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)
            self._run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_image(self, image, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_image(self._run_id, image, artifact_file=artifact_file)
