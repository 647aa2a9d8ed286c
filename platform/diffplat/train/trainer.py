"""The `train` stage on the driver: Ray Data in, a Ray Train TorchTrainer, the adapter out."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from diffplat.config import TrainConfig
from diffplat.data.pipeline import training_dataset
from diffplat.fileio import replace_dir
from diffplat.train.loop import train_loop_per_worker

log = logging.getLogger("diffplat")


def run_training(config: TrainConfig, output: Path, tracking_uri: str | None, run_id: str | None, name: str) -> dict:
    """Train with `config` (paths already resolved) and write the adapter to `output`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling = config.scaling
    dataset = training_dataset(config.data, config.resolution, config.center_crop, config.random_flip, config.seed)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": config.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            # Fractional CPUs leave Ray Data room to feed the workers on a small machine.
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=scaling.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoints_total_limit),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"train: the Ray Train run failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("train: the run ended without saving an adapter")
    with replace_dir(output) as tmp:
        with result.checkpoint.as_directory() as folder:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
    log.info("train: adapter written to %s", output)
    return dict(result.metrics or {})
