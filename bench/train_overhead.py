"""What the platform costs: a real `diffplat run` training stage vs a bare PyTorch loop.

diffplat: the job's prepare + train stages as `diffplat run` runs them (Ray Data streaming
decoded batches into a Ray Train worker running DeepSpeed ZeRO-2, MLflow logging every step).
Its step times and the share of each step its worker waited for a batch come from the run's
own MLflow metrics (`step_time_s`, `data_wait_share`).
Bare: one process reads the same Parquet shards with pyarrow, decodes them with the same
function (data.pipeline.ToTrainingArrays), and takes the same steps (same objective, LoRA,
batch, resolution) with torch.optim.AdamW: no Ray, no DeepSpeed, no MLflow.

Both use the same number of torch threads (the worker gets `--cpus` CPUs, Ray sets its
OMP_NUM_THREADS from them; the bare loop is given as many). Medians over the steady state
(the first --warmup steps of each are left out; the wait share is a mean). Targets: ratio <= 1.10, data wait < 5%.
    python bench/train_overhead.py [--steps 40] [--resolution 320] [--batch 4]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def job(base_model: Path, paths: dict, args) -> dict:
    return {
        "name": "overhead",
        "prepare": {"bdd": {k: str(v) if not isinstance(v, list) else [str(p) for p in v] for k, v in paths.items()},
                    "rows_per_shard": 16},  # fmt: skip
        "train": {
            "base_model": str(base_model), "data": "data/shards", "resolution": [args.resolution] * 2,
            "lora": {"rank": 8, "alpha": 8}, "max_train_steps": args.steps, "train_batch_size": args.batch,
            "learning_rate": 1e-4, "log_every": 1,
            "scaling": {"num_workers": 1, "cpus_per_worker": args.cpus}, "deepspeed": {"zero_stage": 2},
        },
    }  # fmt: skip


def diffplat_run(workdir: Path, spec: dict) -> tuple[list[float], list[float]]:
    """(step times, data wait shares) of the steps, from the run's MLflow metrics."""
    import mlflow

    from diffplat.config import parse_config
    from diffplat.runner import run_job

    result = run_job(parse_config(spec), workdir)
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    train = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                               filter_string="tags.`diffplat.stage` = 'train'")[0]  # fmt: skip

    def history(name: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(train.info.run_id, name), key=lambda m: m.step)]

    return history("step_time_s"), history("data_wait_share")


def bare_loop(shards: Path, spec: dict, threads: int) -> list[float]:
    """Step times of the plain loop: read, decode and step, one after the other, in one process."""
    import pyarrow.parquet as pq
    import torch

    from diffplat.config import TrainConfig
    from diffplat.data.pipeline import ToTrainingArrays
    from diffplat.data.shards import shard_files
    from diffplat.train.objectives import LoraObjective

    torch.set_num_threads(threads)
    config = TrainConfig.model_validate({**spec["train"], "data": str(shards)})
    objective = LoraObjective(config, torch.device("cpu"))
    params = [p for p in objective.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    transform = ToTrainingArrays(config.resolution, config.center_crop, config.random_flip, config.seed)

    def batches():
        while True:  # epochs
            for path in shard_files(shards):
                table = pq.read_table(path, columns=["id", "image", "caption", "layout"])
                for start in range(0, table.num_rows - config.train_batch_size + 1, config.train_batch_size):
                    yield table.slice(start, config.train_batch_size).to_pydict()

    times, rows = [], batches()
    for _ in range(config.max_train_steps):
        start = time.perf_counter()
        batch = transform.arrays(next(rows))
        loss = objective.loss(objective.module, batch, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8, help="first steps of each left out")
    parser.add_argument("--resolution", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs of the training worker (and bare threads)")
    args = parser.parse_args()

    from diffplat.data.synthetic_bdd import write_synthetic_bdd
    from diffplat.models.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "tiny-sdxl", "sdxl")
        paths = write_synthetic_bdd(tmp / "bdd", num_images=args.images, size=(1280, 720))
        spec = job(model, paths, args)
        ours, waits = diffplat_run(tmp / "work", spec)
        threads = max(1, int(args.cpus))
        bare = bare_loop(tmp / "work" / "data" / "shards", spec, threads)
    steady = slice(args.warmup, None)
    bare_med, our_med = statistics.median(bare[steady]), statistics.median(ours[steady])
    wait = statistics.fmean(waits[steady])  # the mean: a few long waits are the cost, not the typical step
    print(f"tiny SDXL (random weights), LoRA rank 8, {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"{args.steps} steps ({args.warmup} warm-up left out), {threads} torch thread(s) each, CPU")  # fmt: skip
    print(f"bare loop (pyarrow + decode + AdamW, one process)   median step {bare_med:6.3f} s")
    print(f"diffplat run (Ray Data -> Ray Train + DeepSpeed)    median step {our_med:6.3f} s")
    print(f"ratio diffplat / bare: {our_med / bare_med:.2f}   (target <= 1.10)")
    print(f"worker waiting for its batch: {100 * wait:.1f}% of a step   (target < 5%)")
    if bare_med < 0.3:
        print(f"note: a bare step of {bare_med:.2f} s is under 0.3 s; fixed costs weigh more: raise --resolution")


if __name__ == "__main__":
    main()
