"""Run a job: its stages in order, on one Ray, each in its own MLflow run, each timed."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from diffplat import tracking
from diffplat.config import STAGES, JobConfig, RayConfig
from diffplat.pictures import contact_sheet, list_images

log = logging.getLogger("diffplat")


@dataclass
class Workdir:
    """Relative paths in a job file are relative to its work folder."""

    root: Path

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()

    def model(self, value: str) -> str:
        """A local folder if one is there, else the value as given (a hub id)."""
        local = self.path(value)
        return str(local) if local.exists() else value


@dataclass
class JobResult:
    run_id: str
    tracking_uri: str
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)


def _quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's progress bars (off a terminal: a block of progress log lines every few
    seconds) and its per-dataset INFO lines would bury the stages' own progress lines."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)


def _session_dir() -> str:
    import ray

    try:
        return ray._private.worker.global_worker.node.get_session_dir_path()
    except AttributeError:  # a client connection: the logs are on the head
        return "<ray temp dir>/session_latest"


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Join the job's cluster (cluster.py's rule), or start a Ray of this process's own; leave it after."""
    import ray
    import ray.data

    from diffplat import console
    from diffplat.cluster import init_options, settle_on_one_machine, starts_own_ray

    console.setup(config.verbose)
    if ray.is_initialized():
        _quiet_ray_data(config.verbose)
        yield
        return
    options = init_options(config.address, config.num_cpus, config.dashboard)
    if starts_own_ray(options):
        settle_on_one_machine()
    ray.init(**options, log_to_driver=True, **console.ray_init_options(config.verbose))
    if not config.verbose:
        log.info("other libraries' output: %s/logs (--verbose shows it here)", _session_dir())
    _quiet_ray_data(config.verbose)
    try:
        yield
    finally:
        ray.shutdown()


def _prepare(config: JobConfig, work: Workdir, run_id: str, uri: str) -> dict:
    from diffplat.data.prepare import prepare

    report = prepare(config.prepare, work.path)
    skipped = report["skipped"]
    tracking.log_metrics({"rows_written": report["rows_written"], "rows_skipped": sum(skipped.values()),
                          **{"skipped/" + reason: n for reason, n in skipped.items()}})  # fmt: skip
    tracking.log_artifacts(work.path(config.prepare.output) / "prepare_report.json")
    return report


def _cache(config: JobConfig, work: Workdir, run_id: str, uri: str) -> dict:
    from diffplat.data.cache import CACHE_INFO, run_cache

    c = config.cache
    resolved = c.model_copy(update={"data": str(work.path(c.data)), "base_model": work.model(c.base_model),
                                    "vae": work.model(c.vae) if c.vae else None})  # fmt: skip
    output = work.path(c.output)
    tracking.log_dataset(Path(resolved.data), f"{config.name}:{c.data}", "encoding")
    report = run_cache(resolved, output)
    # nodes and bytes: where the work ran, and how little of it passed through the driver
    tracking.log_metrics({k: report[k] for k in ("rows", "rows_left_out", "shards", "rows_per_s", "nodes",
                                                 "output_bytes", "driver_bytes")})  # fmt: skip
    tracking.log_artifacts(output / CACHE_INFO)
    return report


def _train(config: JobConfig, work: Workdir, run_id: str, uri: str) -> dict:
    from diffplat.train.trainer import run_training

    c = config.train
    resolved = c.model_copy(update={
        "base_model": work.model(c.base_model),
        "vae": work.model(c.vae) if c.vae else None,
        "data": str(work.path(c.data)),
        "cache": str(work.path(c.cache)) if c.cache else None,
        "controlnet": c.controlnet.model_copy(update={"init": work.model(c.controlnet.init) if c.controlnet.init else None}),
        "scaling": c.scaling.model_copy(update={"storage_path": _storage(c.scaling.storage_path, work)}),
    })  # fmt: skip
    output = work.path(c.output)
    dataset = Path(resolved.cache or resolved.data)
    tracking.log_dataset(dataset, f"{config.name}:{c.cache or c.data}", "training")
    metrics = run_training(resolved, output, uri, run_id, name=f"{config.name}-train", verbose=config.ray.verbose)
    if c.kind == "full":  # a whole model (GBs at full size): its record only, unless registered below
        tracking.log_artifacts(output / "adapter_info.json", "model")
    else:
        tracking.log_artifacts(output, "adapter")
    out = {"adapter": str(output), **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    if config.tracking.register_as:
        tags = {**tracking.run_tags(config), "diffplat.dataset_digest": tracking.shards_digest(dataset)[0]}
        out["model"] = tracking.register_adapter(output, config.tracking.register_as, config.tracking.alias, tags)
        log.info("train: registered as %s%s", out["model"],
                 f" (alias {config.tracking.alias})" if config.tracking.alias else "")  # fmt: skip
    return out


def _generate(config: JobConfig, work: Workdir, run_id: str, uri: str) -> dict:
    from diffplat.infer.generate import run_generation

    c = config.generate
    update = {
        "base_model": work.model(c.base_model),
        "vae": work.model(c.vae) if c.vae else None,
        # a local folder or file if one is there, an adapter in MLflow (fetched here), else a hub id
        "lora": _adapter(c.lora, work, uri) if c.lora else None,
        "loras": [a.model_copy(update={"path": _adapter(a.path, work, uri)}) for a in c.loras],
        "prompts_file": str(work.path(c.prompts_file)) if c.prompts_file else None,
        "prompts_from_shards": str(work.path(c.prompts_from_shards)) if c.prompts_from_shards else None,
    }
    if c.ic_lora:
        update["ic_lora"] = c.ic_lora.model_copy(update={"inputs": str(work.path(c.ic_lora.inputs))})
    if c.controlnet:
        n = c.controlnet
        update["controlnet"] = n.model_copy(update={
            "model": work.model(n.model), "maps": str(work.path(n.maps)),
            "captions": str(work.path(n.captions)) if n.captions else None,
            "bdd_labels": [str(work.path(p)) for p in n.bdd_labels]})  # fmt: skip
    output = work.path(c.output)
    result = run_generation(c.model_copy(update=update), output)
    tracking.log_metrics({k: result[k] for k in ("images", "made_now", "skipped", "images_per_s", "nodes",
                                                 "output_bytes", "driver_bytes")})  # fmt: skip
    tracking.log_artifacts(output / "metadata.jsonl")
    tracking.log_artifacts(output / "coco_images.json")
    _log_sheet(output / "images", output / "contact_sheet.png")
    _log_sheet(output / "comparisons", output / "comparison_sheet.png", columns=1, thumb_width=768)
    return {"folder": str(output), **result}


def _filter(config: JobConfig, work: Workdir, run_id: str, uri: str) -> dict:
    from diffplat.filter.yolo import run_filter

    c = config.filter
    # a model yaml names a file inside ultralytics; anything else is a weights file of the user's
    model = c.model if c.model.endswith((".yaml", ".yml")) else str(work.path(c.model))
    folder = work.path(c.images)
    report = run_filter(c, folder, model)
    tracking.log_metrics({k: report[k] for k in ("images", "kept", "rejected", "keep_rate", "nodes", "driver_bytes")})
    tracking.log_artifacts(folder / "filter_report.json")
    tracking.log_artifacts(folder / "coco_annotations.json")
    tracking.log_artifacts(folder / "gallery", "gallery")  # its pictures stay beside the images
    _log_sheet(folder / "annotated", folder / "annotated_sheet.png")
    return {k: v for k, v in report.items() if k != "per_image"}


def _evaluate(config: JobConfig, work: Workdir, run_id: str, uri: str) -> dict:
    from diffplat.evaluate.stage import run_evaluate

    c = config.evaluate
    report = run_evaluate(c, work.path)
    out = work.path(c.output)
    tags = tracking.run_tags(config)
    for v in report["variants"]:  # one nested run per variant: the runs table compares them
        params = {"train_images": v["train_images"], "seeds": v["seeds"], "weights": [r["weights"] for r in v["runs"]]}
        with tracking.stage_run("evaluate", params, tags, variant=v["name"]):
            metrics = {m: v[m] for m in ("map50", "map50_95", "precision", "recall")}
            metrics.update({f"delta_{m}": d for m, d in v.get("delta", {}).items() if m != "per_class"})
            metrics.update({f"{m}/{c}": per[m] for c, per in v["per_class"].items() for m in ("map50", "map50_95")})
            tracking.log_metrics(metrics)
        tracking.log_metrics({f"{v['name']}/{m}": v[m] for m in ("map50", "map50_95")})
    for name in ("report.json", "report.txt", "comparison.png"):
        tracking.log_artifacts(out / name)
    best = max(report["variants"], key=lambda v: v["map50_95"])
    return {"report": str(out / "report.json"), "variants": len(report["variants"]), "best": best["name"],
            "val_images": report["val"]["images"],
            **{f"{v['name']}/map50_95": v["map50_95"] for v in report["variants"]}}  # fmt: skip


STAGE_RUNNERS = {"prepare": _prepare, "cache": _cache, "train": _train, "generate": _generate, "filter": _filter,
                 "evaluate": _evaluate}  # fmt: skip
assert tuple(STAGE_RUNNERS) == STAGES


def _adapter(ref: str, work: Workdir, uri: str) -> str:
    """An adapter a job names: `runs:/...` and `models:/...` are fetched from MLflow into the work
    folder once (per version), then read like any folder; anything else as a model path."""
    if tracking.is_mlflow_ref(ref):
        pinned = tracking.pinned_ref(ref, uri)  # an alias, read once: the version this run uses
        folder = tracking.fetch_adapter(pinned, work.root / ".diffplat" / "adapters", uri)
        log.info("generate: adapter %s is %s, in %s", ref, pinned, folder)
        tracking.set_tags({"diffplat.adapter." + tracking.metric_key(ref): pinned})  # which version made it
        return str(folder)
    return work.model(ref)


def _storage(value: str, work: Workdir) -> str:
    return value if "://" in value else str(work.path(value))


def _log_sheet(images: Path, out: Path, columns: int = 4, thumb_width: int = 256) -> None:
    """One picture of a stage's images in its MLflow run (none if the folder is empty)."""
    sheet = contact_sheet(list_images(images), out, columns=columns, thumb_width=thumb_width)
    if sheet is not None:
        tracking.log_artifacts(sheet)


def run_job(config: JobConfig, workdir: str | Path = ".", job_file: str | Path | None = None) -> JobResult:
    from diffplat.extras import require_for_stages
    from diffplat.preflight import check_job_cpus, check_job_paths

    require_for_stages(config.stages())  # an optional part not installed: one line, before anything
    work = Workdir(Path(workdir).resolve())
    check_job_paths(config, work.path, job_file)  # before Ray or MLflow start: a wrong path is one line
    check_job_cpus(config)
    work.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = tracking.tracking_uri(config.tracking, work.root)
    with ray_session(config.ray), tracking.job_run(config, work.root) as parent_id:
        result = JobResult(run_id=parent_id, tracking_uri=uri)
        log.info("job %s: %s", config.name, " -> ".join(config.stages()))  # each stage then says what it did
        for name in config.stages():
            start = time.perf_counter()
            params = getattr(config, name).model_dump(mode="json", exclude_none=True)
            with tracking.stage_run(name, params, tracking.run_tags(config)) as stage_id:
                result.outputs[name] = STAGE_RUNNERS[name](config, work, stage_id, uri)
                result.seconds[name] = time.perf_counter() - start
                tracking.log_metrics({"stage_seconds": result.seconds[name]})
    return result
