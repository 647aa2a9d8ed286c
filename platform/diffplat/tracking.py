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


KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI opens an experiment of no kind on its GenAI overview


def _experiment_id(mlflow, name: str, artifact_location: str | None) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another process created it first
            pass
        experiment = mlflow.get_experiment_by_name(name)
    if KIND_TAG not in experiment.tags:  # the runs table, as for any training work (a kind set by hand stays)
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, "custom_model_development")
    return experiment.experiment_id


def runs_page(address: str, experiment_id: str) -> str:
    """The dashboard page of an experiment's runs table."""
    return f"{address.rstrip('/')}/#/experiments/{experiment_id}/runs"


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


def set_tags(tags: dict[str, str]) -> None:
    """Tags on the active (stage) run."""
    import mlflow

    mlflow.set_tags(tags)


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

    def log_image(self, image, artifact_file: str | None = None, key: str | None = None, step: int | None = None) -> None:
        """An image as a file (`artifact_file`), or as MLflow's image log: `key` at `step`, which
        the run page shows with a step slider."""
        if self.enabled:
            self._client.log_image(self._run_id, image, artifact_file=artifact_file, key=key, step=step, synchronous=True)


# --- datasets: what trained what, in the runs table's Dataset column ---


def shards_digest(folder: Path) -> tuple[str, int]:
    """(digest, rows) of a folder of Parquet shards, from each file's name, size and footer (its
    row groups' offsets, sizes and statistics): cheap on terabytes, and a rewrite changes it."""
    import hashlib

    import pyarrow.parquet as pq

    digest, rows = hashlib.sha256(), 0
    for path in sorted(Path(folder).rglob("*.parquet")):
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 65536))
            digest.update(f"{path.relative_to(folder)}:{size}:".encode() + f.read())
        rows += pq.read_metadata(path).num_rows
    return digest.hexdigest()[:16], rows


def log_dataset(folder: Path, name: str, context: str) -> None:
    """Log a folder of shards (prepare's, or the cache's) as an input of the active run: its name,
    digest, source (where it is) and row count."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class Shards(MetaDataset):  # MetaDataset has no profile; the row count is what a reader wants
        def __init__(self, source, name, digest, rows):
            super().__init__(source, name=name, digest=digest)
            self._rows = rows

        @property
        def profile(self):
            return {"num_rows": self._rows}

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    if not Path(folder).is_dir():  # a store diffplat does not read as files: no dataset to describe
        return
    digest, rows = shards_digest(folder)
    source = resolve_dataset_source(Path(folder).resolve().as_uri())
    mlflow.log_input(Shards(source, name, digest, rows), context=context)


# --- the model registry: adapters by name, version and alias ---

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # the pyfunc, logged as code (no pickle)
_MODELS_URI = re.compile(r"^models:/([A-Za-z0-9][\w.-]{0,255})(?:/(\d+)|@([A-Za-z][\w-]{0,254}))$")
_RUNS_URI = re.compile(r"^runs:/[0-9a-f]{32}/[A-Za-z0-9._/-]{1,256}$")


def is_mlflow_ref(ref: str | None) -> bool:
    """`runs:/<run id>/<path>`, `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    return bool(ref) and ".." not in ref and bool(_RUNS_URI.match(ref) or _MODELS_URI.match(ref))


def pinned_ref(ref: str, uri: str | None) -> str:
    """An alias resolved to the version it names now (`models:/bdd-lora@production` ->
    `models:/bdd-lora/3`): what a cache of fetched adapters is keyed by. Others unchanged."""
    match = _MODELS_URI.match(ref)
    if not match or not match[3]:
        return ref
    from mlflow.tracking import MlflowClient

    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(match[1], match[3]).version
    return f"models:/{match[1]}/{version}"


def fetch_adapter(ref: str, into: Path, uri: str | None) -> Path:
    """The local folder of an adapter logged to MLflow (a run's artifact folder, or a registered
    model's), fetched once into `into`: whole, then renamed, so a failed fetch leaves nothing."""
    import shutil
    import tempfile

    import mlflow.artifacts

    from diffplat.models.lora import WEIGHTS_NAME

    pinned = pinned_ref(ref, uri)
    target = Path(into) / re.sub(r"\W", "_", pinned)
    if not target.exists():
        Path(into).mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=into, prefix=".fetching-"))
        try:
            source = pinned
            if pinned.startswith("models:/"):  # the version's own artifact location, read from this store's registry
                from mlflow.tracking import MlflowClient

                name, version = pinned.removeprefix("models:/").split("/")
                source = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(name, version)
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(partial), tracking_uri=uri)
            partial.rename(target)
        except Exception:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    # a registered model holds the adapter under artifacts/adapter/; a run's folder is the adapter
    for candidate in (target / "artifacts" / "adapter", target):
        if (candidate / "adapter_info.json").is_file() or (candidate / WEIGHTS_NAME).is_file():
            return candidate
    found = sorted(target.rglob("adapter_info.json")) or sorted(target.rglob(WEIGHTS_NAME))
    if not found:
        raise FileNotFoundError(f"{ref}: no adapter (adapter_info.json or {WEIGHTS_NAME}) in what MLflow holds there")
    return found[0].parent


def register_adapter(folder: Path, name: str, alias: str | None, tags: dict[str, str]) -> str:
    """Log the trained adapter in the active run as an MLflow model that loads on its base with
    diffusers (`mlflow.pyfunc.load_model`), register it as a new version of `name` tagged with
    `tags` (kind, base model, dataset), and point `alias` at it. Returns `models:/<name>/<version>`."""
    import contextlib
    import io
    import warnings

    import mlflow
    from mlflow.tracking import MlflowClient

    from diffplat.models.lora import adapter_info, weights_name

    info, weights = adapter_info(folder), weights_name(Path(folder))
    model_config = {"kind": info.get("kind", tags.get("diffplat.kind", "lora")),
                    "base_model": info.get("base_model", tags.get("diffplat.base_model", "")),
                    "weight_name": weights}  # fmt: skip
    # MLflow prints its registration and a hint about type hints to stderr; diffplat says it in one line
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logged = mlflow.pyfunc.log_model(name="adapter", python_model=str(MODEL_CODE), artifacts={"adapter": str(folder)},
                                         model_config=model_config, registered_model_name=name, await_registration_for=60,
                                         signature=_model_signature(), pip_requirements=_model_requirements())  # fmt: skip
    client = MlflowClient()
    version = logged.registered_model_version
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    return f"models:/{name}/{version}"


def _model_signature():
    """Rows of prompt (+ image and mask, base64, for In-Context LoRA fills and ControlNet maps) in,
    base64 PNGs out; sampling options as params (0: the pipeline's own default)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    rows = Schema([ColSpec("string", "prompt"), ColSpec("string", "image", required=False),
                   ColSpec("string", "mask", required=False)])  # fmt: skip
    params = ParamSchema([ParamSpec("num_inference_steps", "long", 30), ParamSpec("guidance_scale", "double", 5.0),
                          ParamSpec("seed", "long", 0), ParamSpec("width", "long", 0), ParamSpec("height", "long", 0)])  # fmt: skip
    return ModelSignature(inputs=rows, outputs=Schema([ColSpec("string")]), params=params)


def _model_requirements() -> list[str]:
    """What the logged model's environment needs: the versions this one runs."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("torch", "diffusers", "transformers", "peft", "safetensors", "accelerate", "pillow", "pandas"):
        try:
            out.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return out
