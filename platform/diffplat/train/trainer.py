"""The `train` stage on the driver: Ray Data in, a Ray Train TorchTrainer, the adapter out."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from diffplat.config import ConfigError, TrainConfig
from diffplat.console import TRAIN_LOG_LEVEL
from diffplat.data.pipeline import training_dataset
from diffplat.fileio import check_ours, replace_dir
from diffplat.train.checkpoint import ADAPTER_DIR, STATE_FILE, read_state
from diffplat.train.loop import train_loop_per_worker

ADAPTER_SIGNS = ("adapter_info.json",)  # in every adapter folder diffplat writes

log = logging.getLogger("diffplat")


def _shard_summary(shards: str, conditioning: bool) -> tuple[int, set[str]]:
    """Rows (with a conditioning image, if asked) and distinct layouts of the training shards."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from diffplat.data.shards import shard_files

    rows, layouts = 0, set()
    for path in shard_files(Path(shards)):
        table = pq.read_table(path, columns=["layout", "conditioning"] if conditioning else ["layout"])
        rows += table.num_rows - (table.column("conditioning").null_count if conditioning else 0)
        layouts.update(pc.unique(table.column("layout")).to_pylist())
    return rows, layouts


def check_training_data(config: TrainConfig) -> TrainConfig:
    """Fail before any worker starts on data or a model that cannot train this kind; turn
    `num_train_epochs` into steps (the lr schedule needs the total). With a cache, the cache's
    rows are what trains, and it must have been made as this config would encode."""
    if config.timestep_bias.strategy != "none":
        from diffplat.models.families import family_of

        family = family_of(config.base_model)
        if not family.ddpm_timesteps:  # FLUX.1: flow matching's noise levels
            raise ConfigError(f"train.timestep_bias: {config.base_model} is a {family.name} model, which draws its "
                              "noise levels by train.flow.timestep_sampling; timestep_bias weights a DDPM schedule's "
                              "timesteps (SDXL's)")  # fmt: skip
        steps = family.schedule_length(config.base_model)  # what the workers' noising will draw from
        if config.timestep_bias.end > steps:
            raise ConfigError(f"train.timestep_bias.end is {config.timestep_bias.end}, but {config.base_model}'s "
                              f"schedule has {steps} timesteps")  # fmt: skip
    if config.cache:
        from diffplat.data.cache import check_cache

        check_cache(config)
    elif "://" in config.data:
        if config.num_train_epochs:
            raise ConfigError("train.num_train_epochs needs local shards to count rows; give max_train_steps")
        return config
    field, source = ("train.cache", config.cache) if config.cache else ("train.data", config.data)
    rows, layouts = _shard_summary(source, conditioning=config.kind == "controlnet")
    if config.kind == "controlnet":
        from diffplat.models.families import family_of

        family = family_of(config.base_model)
        if not family.controlnets:
            raise ConfigError(f"train.kind controlnet: ControlNets are trained on SDXL base models; {config.base_model} "
                              f"is {family.name}")  # fmt: skip
    if config.kind == "controlnet" and rows == 0:
        raise ConfigError(f"{field}: {source} has no row with a conditioning image; controlnet trains on "
                          "image + map pairs (BDD images with masks, or source: pairs)")  # fmt: skip
    if config.kind == "ic_lora":
        from diffplat.data.composites import CompositeError, Layout

        if None in layouts:
            raise ConfigError(f"{field}: {source} has rows without a layout; ic_lora trains on composites "
                              "(prepare them with source: composites)")  # fmt: skip
        for text in sorted(layouts):
            try:
                Layout.parse(text).check_size(*config.resolution, f"train.resolution {list(config.resolution)}", 8)
            except CompositeError as err:
                raise ConfigError(str(err)) from None
        if config.ic_lora.mode == "masked" or config.cache:
            from diffplat.models.families import family_of
            from diffplat.train.objectives import cache_needs_plain_model, needs_inpainting_model

            family = family_of(config.base_model)
            denoiser = family.denoiser_config(config.base_model)
            if config.ic_lora.mode == "masked" and not family.is_inpainting(denoiser):
                raise ConfigError(needs_inpainting_model(config.base_model, family, denoiser))
            if config.cache and family.is_inpainting(denoiser):
                raise ConfigError(cache_needs_plain_model(config.base_model))
    if config.num_train_epochs:
        per_step = config.train_batch_size * config.scaling.num_workers * config.gradient_accumulation_steps
        steps = max(1, rows * config.repeats // per_step) * config.num_train_epochs
        log.info("train: %d epochs of %d rows%s = %d steps", config.num_train_epochs, rows,
                 f" x {config.repeats} repeats" if config.repeats > 1 else "", steps)  # fmt: skip
        config = config.model_copy(update={"max_train_steps": steps})
    return config


def resume_checkpoint(config: TrainConfig, name: str) -> str | None:
    """The checkpoint folder that `resume_from_checkpoint` names: `latest` is the newest of
    this job's earlier runs under storage_path (none yet: a fresh start, as diffusers does)."""
    value = config.resume_from_checkpoint
    if value is None:
        return None
    if value == "latest":
        storage = config.scaling.storage_path
        if "://" in storage:
            raise ConfigError("train.resume_from_checkpoint: latest needs a local storage_path; name the checkpoint")
        found = [p.parent for p in Path(storage).glob(f"{name}-*/checkpoint_*/{STATE_FILE}")]
        if not found:
            log.info("train: resume_from_checkpoint latest: no checkpoint of %s under %s yet, starting afresh", name, storage)
            return None
        folder = max(found, key=lambda p: p.stat().st_mtime)
    else:
        folder = Path(value)
        if not (folder / STATE_FILE).is_file():
            raise ConfigError(f"train.resume_from_checkpoint: {value} is not a checkpoint of a diffplat run (no {STATE_FILE})")
    state = read_state(folder)
    if state["workers"] != config.scaling.num_workers:
        raise ConfigError(f"train.resume_from_checkpoint: {folder} was written by {state['workers']} workers; "
                          f"resume with scaling.num_workers: {state['workers']} (optimizer state is split per worker)")  # fmt: skip
    log.info("train: resuming from %s (step %d)", folder, state["step"])
    return str(folder)


def resolve_buckets(config: TrainConfig) -> TrainConfig:
    """With buckets and no list of them: the buckets derived from the shards' image sizes. The
    buckets and their row counts are logged: a bucket with fewer rows than a batch never trains."""
    from collections import Counter

    from diffplat.data.buckets import derive_buckets, nearest_bucket

    b = config.buckets
    if b is None:
        return config
    if b.resolutions and "://" in config.data:
        return config
    if "://" in config.data:
        raise ConfigError("train.buckets: shards on remote storage cannot be measured here; list buckets.resolutions")
    import pyarrow.parquet as pq

    from diffplat.data.shards import shard_files

    sizes = [(w, h) for path in shard_files(config.data)
             for w, h in zip(*pq.read_table(path, columns=["width", "height"]).to_pydict().values())]  # fmt: skip
    if b.resolutions:
        buckets, counts = [tuple(r) for r in b.resolutions], Counter(nearest_bucket(w, h, b.resolutions) for w, h in sizes)
    else:
        buckets, counts = derive_buckets(sizes, config.resolution[0] * config.resolution[1], b.step, b.max_buckets)
    log.info("train: aspect-ratio buckets %s", ", ".join(f"{w}x{h} ({counts[(w, h)]} rows)" for w, h in buckets))
    small = [f"{w}x{h}" for w, h in buckets if counts[(w, h)] < config.train_batch_size]
    if small:
        log.warning("train: buckets %s have fewer rows than a batch (%d) and never train", ", ".join(small),
                    config.train_batch_size)  # fmt: skip
    return config.model_copy(update={"buckets": b.model_copy(update={"resolutions": [list(x) for x in buckets]})})


def _ordered_ingest():
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _run_dir(storage: str, run_name: str) -> str:
    return f"{storage.rstrip('/')}/{run_name}" if "://" in storage else str(Path(storage) / run_name)


def run_training(config: TrainConfig, output: Path, tracking_uri: str | None, run_id: str | None, name: str,
                 verbose: bool = False) -> dict:  # fmt: skip
    """Train with `config` (paths already resolved) and write the adapter to `output`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config = check_training_data(config)
    check_ours(output, "adapter", ADAPTER_SIGNS)  # before any worker starts, not after the run
    scaling = config.scaling
    resume = resume_checkpoint(config, name)
    # Each run gets its own folder: Ray Train would otherwise hand a rerun the previous run's
    # checkpoint. Going on from one is asked for explicitly, with resume_from_checkpoint.
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if config.cache:  # latents and embeddings as the cache stage wrote them: nothing to decode
        from diffplat.data.cache import cached_dataset

        dataset = cached_dataset(config.cache, conditioning=config.kind == "controlnet", repeats=config.repeats)
    else:
        config = resolve_buckets(config)
        dataset = training_dataset(config.data, config.resolution, config.center_crop, config.random_flip,
                                   config.seed, conditioning=config.kind == "controlnet",
                                   buckets=config.buckets.resolutions if config.buckets else None,
                                   repeats=config.repeats)  # fmt: skip
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": config.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": run_id,
                           "verbose": verbose,
                           "resume": resume, "run_dir": _run_dir(scaling.storage_path, run_name)},  # fmt: skip
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            # Fractional CPUs leave Ray Data room to feed the workers on a small machine.
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            # Ray Train's own lines (and what workers print, which it routes through them)
            logging_config=ray.train.LoggingConfig(log_level=TRAIN_LOG_LEVEL[verbose]),
            name=run_name,
            storage_path=scaling.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoints_total_limit),
            # A lost worker (a preempted node, an OOM kill) restarts the group, which goes on from
            # the run's last checkpoint (the loop reads ray.train.get_checkpoint()).
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
        ),
        datasets={"train": dataset},
        # Blocks reach the workers in shard order, so the seeded shuffle, and a resume's replay of
        # an epoch, see the same rows in the same order (with several workers, which rows go
        # to which worker is still Ray Data's dynamic split).
        dataset_config=ray.train.DataConfig(execution_options=_ordered_ingest()),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"train: the Ray Train run failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("train: the run ended without saving an adapter")
    with replace_dir(output, "adapter", ADAPTER_SIGNS) as tmp:
        with result.checkpoint.as_directory() as folder:
            shutil.copytree(Path(folder) / ADAPTER_DIR, tmp, dirs_exist_ok=True)
        if config.kind == "full":  # the trained denoiser, with the base's other parts: a whole model
            from diffplat.models.families import family_of
            from diffplat.models.loading import complete_model

            complete_model(tmp, config.base_model, family_of(config.base_model).denoiser, config.vae)
        if config.ai_toolkit_layout:
            _ai_toolkit_layout(tmp, config, result, tracking_uri, run_id)
    metrics = dict(result.metrics or {})
    loss = f", final loss {metrics['final_loss']:.4f}" if "final_loss" in metrics else ""
    log.info("train: %s steps%s; adapter written to %s", metrics.get("step", "?"), loss, output)
    return metrics


def _ai_toolkit_layout(folder: Path, config: TrainConfig, result, tracking_uri: str | None, run_id: str | None) -> None:
    """The adapter folder as ai-toolkit lays out its output: the kept checkpoints' LoRAs from
    Ray Train's checkpoints, the samples from the run's MLflow artifacts."""
    import contextlib
    import tempfile

    from diffplat.aitoolkit import SAMPLES_DIR, write_layout
    from diffplat.models.lora import WEIGHTS_NAME

    with contextlib.ExitStack() as stack:
        kept = []
        for checkpoint, metrics in result.best_checkpoints or []:
            folder_of = Path(stack.enter_context(checkpoint.as_directory()))
            if "step" in metrics and (folder_of / ADAPTER_DIR / WEIGHTS_NAME).is_file():
                kept.append((folder_of / ADAPTER_DIR / WEIGHTS_NAME, int(metrics["step"])))
        samples = None
        if tracking_uri and run_id:
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=tracking_uri)
            if client.list_artifacts(run_id, SAMPLES_DIR):
                tmp = stack.enter_context(tempfile.TemporaryDirectory())
                samples = Path(client.download_artifacts(run_id, SAMPLES_DIR, tmp))
        step = int((result.metrics or {}).get("step", 0))
        write_layout(folder, config.ai_toolkit_layout, folder / WEIGHTS_NAME, step, kept, samples)
