"""The one training loop: runs inside each Ray Train worker, for every adapter kind.

Data comes from the worker's Ray Data shard; DeepSpeed owns the optimizer, gradient
accumulation, clipping, mixed precision and ZeRO. Rank 0 logs to MLflow and saves adapters;
saved adapters go back to the driver as Ray Train checkpoints, so this works the same when the
workers sit on other machines.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

from diffplat.aitoolkit import SAMPLES_DIR
from diffplat.train.checkpoint import (ADAPTER_DIR, EMA_FILE, STATE_DIR, STATE_TAG, check_trained, own_checkpoints,
                                       read_state, restore_rng, save_rng, trained_shapes, write_state)  # fmt: skip
from diffplat.train.deepspeed_config import select_accelerator

log = logging.getLogger("diffplat")


def _optimizer(config, params):
    """8-bit AdamW where bitsandbytes and a GPU are there; otherwise DeepSpeed's own AdamW."""
    if not config.use_8bit_adam:
        return None
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        log.warning("use_8bit_adam: bitsandbytes is not installed; using AdamW")
        return None
    if not torch.cuda.is_available():
        log.warning("use_8bit_adam: needs a GPU; using AdamW")
        return None
    return bnb.optim.AdamW8bit(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                               eps=config.adam_epsilon, weight_decay=config.weight_decay)  # fmt: skip


def _over_workers(values, op: str = "sum"):
    """`values` all-reduced over the workers (as they are with one worker)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return values


def mean_over_workers(loss_sum, count: int, device) -> float:
    """The mean loss over every worker's micro-batches since the last log line (one all-reduce
    per log line; every rank logs at the same steps)."""
    import torch

    totals = _over_workers(torch.stack([torch.as_tensor(loss_sum, dtype=torch.float32, device=device).reshape(()),
                                        torch.tensor(float(count), device=device)]))  # fmt: skip
    return float(totals[0] / totals[1].clamp_min(1))


def all_workers(ok: bool, device) -> bool:
    """True only if `ok` on every worker (an all-reduce of the minimum)."""
    import torch

    return bool(_over_workers(torch.tensor([1 if ok else 0], device=device), op="min").item())


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every worker, by rank (where a run's workers really are)."""
    import ray
    import torch.distributed as dist

    own = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [own]
    nodes = [None] * world
    dist.all_gather_object(nodes, own)
    return nodes


def _while_all_have(batches, device):
    """The batches, for as long as every worker still has one (one all-reduce per batch)."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if not all_workers(batch is not None, device):
            return
        yield batch


def _timed(batches, waited: list[float]):
    """The batches, adding the seconds spent waiting for each to waited[0]."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        waited[0] += time.perf_counter() - start
        if batch is None:
            return
        yield batch


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def train_loop_per_worker(loop_config: dict) -> None:
    select_accelerator()
    from diffplat import console

    # A fresh worker process: diffplat's lines on stderr, which Ray forwards to the driver; the
    # other libraries as quiet as there, unless verbose.
    console.setup(loop_config.get("verbose", False))
    import deepspeed
    import ray.train
    import torch
    from diffusers.optimization import get_scheduler
    from ray.train import Checkpoint

    from diffplat.config import TrainConfig
    from diffplat.tracking import RankZeroLogger
    from diffplat.train.checkpoint import CheckpointMismatch
    from diffplat.train.deepspeed_config import deepspeed_config, skip_inference_comm_op
    from diffplat.train.ema import MovingAverage
    from diffplat.train.objectives import OBJECTIVES

    config = TrainConfig.model_validate(loop_config["train"])
    if not torch.cuda.is_available():
        skip_inference_comm_op()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed + rank)
    generator = torch.Generator(device=device).manual_seed(config.seed + rank)
    logger = RankZeroLogger(loop_config.get("tracking_uri"), loop_config.get("run_id"), rank)

    objective = OBJECTIVES[config.kind](config, device)
    generators = {"noise": generator, **objective.generators()}
    params = [p for p in objective.module.parameters() if p.requires_grad]
    client_optimizer = _optimizer(config, params)

    def lr_scheduler(optimizer):
        return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                             num_training_steps=config.max_train_steps, num_cycles=config.lr_num_cycles,
                             power=config.lr_power, step_rules=config.lr_step_rules)  # fmt: skip

    with console.quiet_stdout(loop_config.get("verbose", False)):  # DeepSpeed prints as it builds its ops
        engine, _, _, _ = deepspeed.initialize(
            model=objective.module,
            model_parameters=params,
            optimizer=client_optimizer,
            lr_scheduler=lr_scheduler,
            config=deepspeed_config(config, client_optimizer=client_optimizer is not None),
        )
    # The average lives on rank 0 only, which saves and validates (ZeRO 0-2 keep every
    # rank's parameters whole, so rank 0 sees all of them).
    ema = MovingAverage(engine.module, config.ema_decay) if config.use_ema and rank == 0 else None
    trainable = sum(p.numel() for p in params)
    nodes = _worker_nodes(world)
    if rank == 0:
        log.info("train: %s, %d trainable parameters, %d workers on %d node%s, ZeRO %d, %s%s", config.kind, trainable,
                 world, len(set(nodes)), "s"[: len(set(nodes)) > 1], config.deepspeed.zero_stage,
                 config.mixed_precision, ", EMA" if ema else "")  # fmt: skip

    shard = ray.train.get_dataset_shard("train")
    info = {"base_model": config.base_model, "resolution": list(config.resolution), "workers": world,
            "worker_nodes": len(set(nodes)),
            **({"cache": config.cache} if config.cache else {})}  # fmt: skip
    step, micro, epoch, batch_in_epoch, loss = 0, 0, 0, 0, None

    def averaged():
        return ema.applied(engine.module) if ema else contextlib.nullcontext()

    def report(metrics: dict, save: bool) -> None:
        """Every rank calls report (it is a barrier). A checkpoint holds what checkpoint.py
        lists: each rank writes its own parts, Ray merges the ranks' folders."""
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            engine.save_checkpoint(str(folder / STATE_DIR), tag=STATE_TAG, exclude_frozen_parameters=True)
            save_rng(folder, rank, generators)
            if rank == 0:
                with averaged():
                    objective.save(engine.module, folder / ADAPTER_DIR, {**info, "step": step, **metrics})
                if ema:
                    ema.save(folder / EMA_FILE)
                write_state(folder, {"step": step, "micro": micro, "epoch": epoch, "batch": batch_in_epoch,
                                     "workers": world, "trained": trained_shapes(engine.module)})  # fmt: skip
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    # After a lost worker: this run's own newest checkpoint on storage (Ray registers reported
    # checkpoints asynchronously, so get_checkpoint() can lag behind by one or more), else
    # Ray's; on a fresh start, the one resume_from_checkpoint asked for.
    candidates = own_checkpoints(loop_config.get("run_dir"))
    if not candidates and ray.train.get_checkpoint() is not None:
        candidates = [ray.train.get_checkpoint()]
    if not candidates and loop_config.get("resume"):
        candidates = [Checkpoint.from_directory(loop_config["resume"])]
    failures = []
    for candidate in candidates:
        try:
            with candidate.as_directory() as folder:
                state = read_state(folder)
                if "trained" in state:  # checkpoints of diffplat before 0.2 lack it
                    check_trained(state["trained"], engine.module, f"checkpoint {candidate.path}")
                engine.load_checkpoint(str(Path(folder) / STATE_DIR), tag=STATE_TAG, load_module_strict=False)
                if not restore_rng(folder, rank, generators):
                    log.warning("train: %s has no random state for worker %d; draws will differ", candidate.path, rank)
                if ema and (Path(folder) / EMA_FILE).is_file():
                    ema.load(Path(folder) / EMA_FILE)
                elif ema:  # saved without use_ema: the average starts from the weights resumed
                    log.warning("train: %s has no moving average; it starts from the resumed weights", candidate.path)
                    ema = MovingAverage(engine.module, config.ema_decay)
            loaded = True
        except CheckpointMismatch:
            raise  # a wrong run's checkpoint: falling back to an older one would not help
        except Exception as err:  # a checkpoint cut short by the crash: take the one before it
            failures.append(f"{candidate.path}: {err}")
            loaded = False
        # Every worker goes on from the same checkpoint or none does: one that failed here
        # makes all of them try the next (each load replaces all that the last one set).
        if not all_workers(loaded, device):
            log.warning("train: cannot resume from %s on every worker; trying an older checkpoint", candidate.path)
            continue
        step, micro, epoch, batch_in_epoch = state["step"], state["micro"], state.get("epoch", 0), state.get("batch", 0)
        if rank == 0:
            log.info("train: resumed at step %d (epoch %d, batch %d) from %s", step, epoch, batch_in_epoch,
                     candidate.path)  # fmt: skip
        break
    else:
        if candidates:  # starting from step 0 on half-loaded state would be worse than stopping
            raise RuntimeError("train: no checkpoint to resume from could be read: " + "; ".join(failures[-3:]))

    def validate(step: int) -> None:
        """Rank 0 draws the validation picture with the adapter as it is at `step` (its moving
        average, with use_ema)."""
        if rank != 0:
            return
        start = time.perf_counter()
        engine.module.eval()
        dtype = next(engine.module.parameters()).dtype
        with averaged(), torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            images = objective.validation_images(engine.module)
        engine.module.train()
        if images:
            logger.log_image(objective.grid(images), key="validation", step=step)  # a step slider in the run page
            if config.ai_toolkit_layout:  # each image as ai-toolkit names its samples; the driver copies them out
                stamp = int(time.time() * 1000)
                for i, image in enumerate(images):
                    logger.log_image(image, f"{SAMPLES_DIR}/{stamp}__{step:09d}_{i}.jpg")
            if time.perf_counter() - start >= 10:  # worth a line only when it held the run up
                log.info("train: validation images at step %d (%.1f s)", step, time.perf_counter() - start)

    every = config.validation.every_n_steps
    # Losses add up on the device and are read once per log line: .item() each step would
    # make the GPU wait for the host.
    window_loss, window_micro, window_steps, window_images = 0.0, 0, 0, 0
    window_start, waited = time.perf_counter(), [0.0]
    printed = window_start
    if config.validation.before_training:
        validate(step)
    engine.train()
    while step < config.max_train_steps:
        # The shuffle is reseeded each epoch from (seed, rank, epoch): a resumed run replays
        # the stopped epoch's order and skips the batches already trained on.
        skip, batch_in_epoch = batch_in_epoch, 0
        if skip and rank == 0:
            log.info("train: skipping the %d batches of epoch %d trained before the resume", skip, epoch)
        order_seed = (config.seed + 7919 * rank + 104729 * epoch) % 2**32
        if config.buckets:  # rows of several sizes: batched per bucket here, not by Ray Data
            from diffplat.data.buckets import bucket_batches

            batches = bucket_batches(shard.iter_batches(batch_size=None, batch_format="numpy"),
                                     config.train_batch_size, order_seed,
                                     config.shuffle_buffer // len(config.buckets.resolutions))  # fmt: skip
            # Each worker's buckets leave a different remainder: the epoch ends for all as soon as
            # one runs out, or the others would wait forever in the next step's all-reduce.
            batches = _while_all_have(batches, device)
        else:
            batches = shard.iter_batches(batch_size=config.train_batch_size, batch_format="numpy", drop_last=True,
                                         local_shuffle_buffer_size=config.shuffle_buffer or None,
                                         local_shuffle_seed=order_seed)  # fmt: skip
        for batch in _timed(batches, waited):
            batch_in_epoch += 1
            if batch_in_epoch <= skip:
                continue
            loss = objective.loss(engine, batch, generator)
            engine.backward(loss)
            engine.step()
            micro += 1
            window_loss += loss.detach()
            window_micro += 1
            window_images += len(batch["caption"]) * world
            if micro % config.gradient_accumulation_steps:
                continue
            step += 1
            window_steps += 1
            if ema:
                ema.update(engine.module, step)
            if step % config.log_every == 0 or step == config.max_train_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": mean_over_workers(window_loss, window_micro, device),  # every worker's micro-batches
                    "lr": engine.get_lr()[0],
                    "images_per_s": window_images / elapsed,  # all workers
                    "step_time_s": elapsed / window_steps,  # one optimizer step, accumulation included
                    # the share of the time this worker (rank 0) sat waiting for its next batch
                    "data_wait_share": min(1.0, waited[0] / elapsed),
                }
                logger.log_metrics(metrics, step)
                # the console: a line every 10 s at most (MLflow has every log_every; the driver prints
                # the end: steps, final loss, where the adapter went)
                if rank == 0 and time.perf_counter() - printed >= 10 and step < config.max_train_steps:
                    printed = time.perf_counter()
                    eta = (config.max_train_steps - step) * metrics["step_time_s"]
                    log.info("train: step %d/%d epoch %d loss %.4f lr %.2e %.1f img/s %.2f s/step data wait %.0f%% "
                             "eta %s", step, config.max_train_steps, epoch, metrics["loss"], metrics["lr"],
                             metrics["images_per_s"], metrics["step_time_s"], 100 * metrics["data_wait_share"],
                             _duration(eta))  # fmt: skip
                window_loss, window_micro, window_steps, window_images = 0.0, 0, 0, 0
                window_start, waited[0] = time.perf_counter(), 0.0
            if every and step % every == 0 and step < config.max_train_steps:
                validate(step)
            checkpoint_now = config.checkpointing_steps and step % config.checkpointing_steps == 0
            if checkpoint_now and step < config.max_train_steps:
                report({"step": step}, save=True)
            if step >= config.max_train_steps:
                break
        else:
            if batch_in_epoch == 0:
                raise RuntimeError(
                    f"train: worker {rank} got no batch of {config.train_batch_size} rows; "
                    "the dataset is smaller than train_batch_size x num_workers"
                )
            epoch, batch_in_epoch = epoch + 1, 0
    validate(step)
    # A run resumed at its last step takes no step: it saves what it resumed from.
    report({"step": step, "worker_nodes": len(set(nodes)), **({"final_loss": loss.item()} if loss is not None else {})},
           save=True)  # fmt: skip
