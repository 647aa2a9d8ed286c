"""The `cache` stage: latents and text embeddings computed once, and training's reader of them.

A cache folder holds
  shard-NNNNN.parquet        one row per training row (SCHEMA below)
  empty_prompt.safetensors   the empty caption's embeddings, one window: caption dropout
                             (`proportion_empty_prompts`) swaps them in
  cache_info.json            what made the rows (base_model, vae, variant, resolution, center_crop,
                             random_flip, seed, max_token_length), the dtype and shapes of the
                             arrays, the family, the VAE's scaling and shift factors, the row count, and each shard's
                             rows and the Ray node that wrote it (replicas write their own shards)

A row is what ToTrainingArrays makes of a shard row (the same crop and flip: both come from the
seed and the row's id), encoded: the VAE's latent distribution as mean and std (training draws
mean + std * noise from its own generator, as `latent_dist.sample` does, then scales), the
caption's prompt embeddings encoded on its own (`windows` of `tokens_per_window` tokens: SDXL's
77-token CLIP windows, FLUX's one T5 sequence; a batch pads shorter captions with the empty
prompt's window, which is what encoding them together gives), the pooled embedding, the original size and crop corner for SDXL's time ids, and with `conditioning` the
conditioning pixels (uint8, exactly what ToTrainingArrays scales to 0..1).

Arrays are binary columns, one row's array each: its raw bytes in C order, of cache_info's
`dtype` (conditioning: uint8), shaped by cache_info: `latent_shape`, (tokens_per_window * windows,
`embed_dim`), (`pooled_dim`,), (3, height, width). Any Arrow tool reads them, e.g.
np.frombuffer(row["latent_mean"], "float32").reshape(info["latent_shape"]) (bfloat16: torch).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from diffplat.cluster import record_bytes
from diffplat.config import CacheConfig, ConfigError, TrainConfig
from diffplat.console import Ticker
from diffplat.fileio import replace_dir, write_json_atomic

log = logging.getLogger("diffplat")

CACHE_INFO = "cache_info.json"
EMPTY_PROMPT = "empty_prompt.safetensors"

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("caption", pa.string()),
        ("layout", pa.string()),  # null unless a composite
        ("original_size", pa.list_(pa.int64(), 2)),  # (height, width), as ToTrainingArrays
        ("crop_top_left", pa.list_(pa.int64(), 2)),
        ("windows", pa.int32()),
        ("latent_mean", pa.binary()),
        ("latent_std", pa.binary()),
        ("prompt_embeds", pa.binary()),
        ("pooled_prompt_embeds", pa.binary()),
        ("conditioning", pa.binary()),  # null unless cache.conditioning
    ]
)
ARRAYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds")

# What makes a cached row: a training run must have the same, else the cache is not what it would encode.
MADE_BY = ("base_model", "vae", "variant", "resolution", "center_crop", "random_flip", "seed", "max_token_length",
           "max_sequence_length")
# Recorded by later versions only: a cache without the field was made with its default.
MADE_BY_DEFAULTS = {"max_sequence_length": 512}


def cache_differs(made: dict, train: TrainConfig, where: str) -> str | None:
    """The first MADE_BY field in which `train` differs from what made a cache, as a message;
    None when all match. `where` names the recorded field ("cache.{field}"). The seed only
    counts where the crop or the flip is random."""
    for field in MADE_BY:
        if field == "seed" and train.center_crop and not train.random_flip:
            continue
        want = getattr(train, field)
        want, have = list(want) if isinstance(want, tuple) else want, made.get(field, MADE_BY_DEFAULTS.get(field))
        if want != have:
            return (f"train.{field} is {json.dumps(want)}, but {where.format(field=field)} is {json.dumps(have)}: "
                    "the cache holds what a training run with that value would see; make the cache again with "
                    "train's value, or train with the cache's")  # fmt: skip
    return None


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / CACHE_INFO
    if not path.is_file():
        raise ConfigError(f"train.cache: {folder} has no {CACHE_INFO}; it is not a folder a cache stage wrote")
    return json.loads(path.read_text())


def check_cache(config: TrainConfig) -> dict:
    """The cache's info, after checking that `config` can train from it (ConfigError naming the
    field otherwise)."""
    if "://" in config.cache:
        raise ConfigError(f"train.cache: {config.cache} must be a folder this machine reads (a shared mount)")
    info = read_info(config.cache)
    problem = cache_differs(info, config, str(Path(config.cache) / CACHE_INFO) + "'s {field}")
    if problem:
        raise ConfigError(problem)
    if config.kind == "controlnet" and not info.get("conditioning"):
        raise ConfigError(f"train.cache: {config.cache} holds no conditioning pixels; controlnet needs a cache made "
                          "with cache.conditioning: true")  # fmt: skip
    return info


def _tensor(data: bytes, dtype, shape):
    import torch

    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _pairs(column) -> np.ndarray:
    """(B, 2) int64 from a pair column (a 2-D array, or one array per row, as Arrow hands it over)."""
    return np.stack([np.asarray(v, dtype=np.int64) for v in column]).reshape(-1, 2)


class CachedInputs:
    """A training batch of cache rows -> what a step needs: latents drawn from the stored
    distributions, prompt embeddings (caption dropout swaps in the empty prompt's), sizes,
    conditioning pixels. Used by the objective in place of the VAE and text encoders."""

    def __init__(self, folder: str | Path, device):
        import torch
        from safetensors.torch import load_file

        from diffplat.models.loading import DTYPES

        self.info = read_info(folder)
        self.device = device
        self.dtype = DTYPES[self.info["dtype"]]
        empty = load_file(Path(folder) / EMPTY_PROMPT)
        self.empty = empty["prompt_embeds"].to(device, torch.float32)  # (tokens_per_window, embed_dim): one window
        self.empty_pooled = empty["pooled_prompt_embeds"].to(device, torch.float32)

    def _stack(self, column, shape):
        import torch

        return torch.stack([_tensor(b, self.dtype, shape) for b in column]).to(self.device, torch.float32)

    def latents(self, batch: dict, generator):
        """`latent_dist.sample(generator)`, shifted and scaled as the family's encode_images does,
        from the stored mean and std."""
        import torch

        from diffplat.models.families import scale_latents

        shape = self.info["latent_shape"]
        mean, std = self._stack(batch["latent_mean"], shape), self._stack(batch["latent_std"], shape)
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return scale_latents(sample, self.info.get("shift_factor"), self.info["scaling_factor"])

    def prompts(self, batch: dict, dropped: list[bool]):
        """(prompt_embeds, pooled) as encoding the batch's captions together (dropped ones as "")
        gives: every row padded to the most windows with the empty prompt's window."""
        import torch

        windows = [int(w) for w in batch["windows"]]
        count = max([1] + [w for w, d in zip(windows, dropped) if not d])
        embeds, pooled = [], []
        for data, pooled_data, w, drop in zip(batch["prompt_embeds"], batch["pooled_prompt_embeds"], windows, dropped):
            if drop:
                embeds.append(self.empty.repeat(count, 1))
                pooled.append(self.empty_pooled)
                continue
            own = self._stack([data], (self.info["tokens_per_window"] * w, self.info["embed_dim"]))[0]
            embeds.append(torch.cat([own, self.empty.repeat(count - w, 1)]))
            pooled.append(self._stack([pooled_data], (self.info["pooled_dim"],))[0])
        return torch.stack(embeds), torch.stack(pooled)

    def sizes(self, batch: dict):
        import torch

        return torch.from_numpy(_pairs(batch["original_size"])), torch.from_numpy(_pairs(batch["crop_top_left"]))

    def conditioning(self, batch: dict) -> np.ndarray:
        width, height = self.info["resolution"]
        return np.stack([np.frombuffer(b, np.uint8).reshape(3, height, width) for b in batch["conditioning"]]).astype(
            np.float32) / 255.0  # fmt: skip


class Encoder:
    """One Ray Data actor of the cache stage: the VAE and the text encoders (never the denoiser),
    on a GPU when Ray gave it one. Maps ToTrainingArrays batches to cache rows."""

    def __init__(self, config: dict):
        import torch

        from diffplat.models.families import family_of
        from diffplat.models.loading import DTYPES

        self.config = c = CacheConfig.model_validate(config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = DTYPES[c.dtype]
        self.family = family_of(c.base_model)
        parts = self.family.load_encoders(c.base_model, c.vae, c.variant)
        self.tokenizers = parts["tokenizers"]
        self.text_encoders = tuple(e.requires_grad_(False).to(self.device, self.dtype).eval() for e in parts["text_encoders"])
        # As in training: the SDXL VAE overflows in fp16, so float32 unless an fp16-safe VAE is given.
        vae_dtype = self.dtype if c.vae else torch.float32
        self.vae = parts["vae"].requires_grad_(False).to(self.device, vae_dtype).eval()

    def _bytes(self, tensor) -> np.ndarray:
        import torch

        t = tensor.detach().to("cpu", self.dtype).contiguous()
        t = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16; the bytes are the same
        return np.array([row.numpy().tobytes() for row in t], dtype=object)

    def prompts(self, captions: list[str]):
        """Each caption's embeddings encoded on its own windows (captions that fill as many
        windows are encoded together), its pooled embedding, and its window count."""
        length = self.family.prompt_length(self.config)
        counts = self.family.prompt_windows(self.tokenizers, captions, length)
        embeds, pooled = np.empty(len(captions), object), np.empty(len(captions), object)
        for count in sorted(set(counts)):
            rows = [i for i, n in enumerate(counts) if n == count]
            p = self.family.encode_prompts(self.tokenizers, self.text_encoders, [captions[i] for i in rows], self.device,
                                           length)  # fmt: skip
            embeds[rows], pooled[rows] = self._bytes(p.embeds), self._bytes(p.pooled)
        return embeds, pooled, np.array(counts, np.int32)

    def __call__(self, batch: dict) -> dict:
        import torch

        captions = [str(c) for c in batch["caption"]]
        out = {"id": batch["id"], "caption": np.array(captions, dtype=object), "layout": batch["layout"],
               "original_size": batch["original_size"], "crop_top_left": batch["crop_top_left"]}  # fmt: skip
        if not captions:  # every row of the block was left out
            return {**out, "windows": np.zeros(0, np.int32), **{k: np.empty(0, object) for k in ARRAYS}}
        with torch.no_grad():
            pixels = torch.tensor(batch["pixel_values"], device=self.device, dtype=self.vae.dtype)
            dist = self.vae.encode(pixels).latent_dist
            out["prompt_embeds"], out["pooled_prompt_embeds"], out["windows"] = self.prompts(captions)
        out["latent_mean"], out["latent_std"] = self._bytes(dist.mean), self._bytes(dist.std)
        if self.config.conditioning:  # back to the uint8 pixels ToTrainingArrays divided by 255
            cond = np.rint(np.asarray(batch["conditioning_pixel_values"]) * 255).astype(np.uint8)
            out["conditioning"] = np.array([c.tobytes() for c in cond], dtype=object)
        return out

    def describe(self) -> tuple[dict, dict]:
        """What cache_info.json records of the models, and the empty prompt's embeddings."""
        import torch

        with torch.no_grad():  # one window: the empty caption fills one
            empty = self.family.encode_prompts(self.tokenizers, self.text_encoders, [""], self.device,
                                               self.family.prompt_length(self.config))  # fmt: skip
        embeds, pooled = empty.embeds, empty.pooled
        vae = self.vae.config
        scale = 2 ** (len(vae.block_out_channels) - 1)
        width, height = self.config.resolution
        shift = getattr(vae, "shift_factor", None)
        facts = {"family": self.family.name, "scaling_factor": float(vae.scaling_factor),
                 "shift_factor": None if shift is None else float(shift),
                 "latent_shape": [vae.latent_channels, height // scale, width // scale], "embed_dim": embeds.shape[-1],
                 "pooled_dim": pooled.shape[-1], "tokens_per_window": embeds.shape[1]}  # fmt: skip
        empty = {"prompt_embeds": embeds[0].to("cpu", self.dtype).contiguous(),
                 "pooled_prompt_embeds": pooled[0].to("cpu", self.dtype).contiguous()}  # fmt: skip
        return facts, empty


def write_cache_meta(folder: Path, config: CacheConfig, facts: dict, empty: dict, rows: int,
                     shards: list[dict] | None = None) -> dict:  # fmt: skip
    """cache_info.json and empty_prompt.safetensors into `folder`; `shards`: each file's rows and
    the Ray node that wrote it."""
    from safetensors.torch import save_file

    spec = config.model_dump(mode="json")
    info = {**{k: spec[k] for k in MADE_BY}, "conditioning": config.conditioning, "dtype": config.dtype, **facts,
            "rows": rows, "data": config.data, "shards": shards or []}  # fmt: skip
    save_file(empty, str(Path(folder) / EMPTY_PROMPT))
    write_json_atomic(Path(folder) / CACHE_INFO, info)
    return info


def rows_table(batch: dict) -> pa.Table:
    """An Encoder batch as a table of SCHEMA (a composite's layout kept, others null)."""
    n = len(batch["id"])

    def pairs(key):
        return pa.FixedSizeListArray.from_arrays(pa.array(_pairs(batch[key]).reshape(-1)), 2)

    columns = {
        "id": pa.array([str(v) for v in batch["id"]], pa.string()),
        "caption": pa.array([str(v) for v in batch["caption"]], pa.string()),
        "layout": pa.array([str(v) if v else None for v in batch["layout"]], pa.string()),
        "original_size": pairs("original_size"),
        "crop_top_left": pairs("crop_top_left"),
        "windows": pa.array(np.asarray(batch["windows"], np.int32)),
        **{k: pa.array(list(batch[k]), pa.binary()) for k in ARRAYS},
        "conditioning": pa.array(list(batch["conditioning"]) if "conditioning" in batch else [None] * n, pa.binary()),
    }
    return pa.table(columns, schema=SCHEMA)


class _ShardWriter:
    """Tables in, Parquet files of rows_per_shard rows out, named `<prefix>-NNNNN.parquet` (the
    folder is swapped in whole afterwards, so files need no atomic writes of their own)."""

    def __init__(self, folder: Path, rows_per_shard: int, prefix: str):
        self.folder, self.size, self.prefix = folder, rows_per_shard, prefix
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.written: list[dict] = []  # {file, rows, bytes} of each file written

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        while sum(t.num_rows for t in self.pending) >= self.size:
            self._flush(self.size)

    def _flush(self, count: int | None = None) -> None:
        import pyarrow.parquet as pq

        table = pa.concat_tables(self.pending)
        count = table.num_rows if count is None else count
        path = self.folder / f"{self.prefix}-{len(self.written):05d}.parquet"
        pq.write_table(table.slice(0, count), path)
        self.written.append({"file": path.name, "rows": count, "bytes": path.stat().st_size})
        rest = table.slice(count)
        self.pending = [rest] if rest.num_rows else []

    def close(self) -> None:
        if self.pending:
            self._flush()


class CacheReplica:
    """One replica of the cache stage (a Ray actor, a GPU each where there are): encodes its
    share of the rows (one stream of Ray Data's split) and writes them as shards itself, into
    the stage's folder on storage every node sees. The driver gets back file names and counts."""

    def __init__(self, config: dict, folder: str, rank: int):
        self.encoder = Encoder(config)
        c = self.encoder.config
        self.writer = _ShardWriter(Path(folder), c.rows_per_shard, prefix=f"part-{rank:03d}")

    def run(self, rows) -> list[dict]:
        """Encode and write every batch of the stream `rows`; the files written, each with the node that wrote it."""
        import ray

        for batch in rows.iter_batches(batch_size=self.encoder.config.batch_size, batch_format="numpy"):
            encoded = self.encoder(batch)
            if len(encoded["id"]):
                self.writer.add(rows_table(encoded))
        self.writer.close()
        node = ray.get_runtime_context().get_node_id()
        return [{**f, "node": node} for f in self.writer.written]

    def progress(self) -> int:
        """Rows encoded so far (answered while `run` works: the actor has a second thread)."""
        return self.writer.rows

    def describe(self) -> tuple[dict, dict]:
        return self.encoder.describe()


def _rows_in(shards: str) -> int | None:
    if "://" in shards:
        return None
    import pyarrow.parquet as pq

    from diffplat.data.shards import shard_files

    return sum(pq.ParquetFile(p).metadata.num_rows for p in shard_files(Path(shards)))


def run_cache(config: CacheConfig, output: Path) -> dict:
    """Encode every usable row of `config.data` (paths already resolved) into the cache folder
    `output`, which replaces any earlier one whole when done. The replicas write the shards; the
    driver streams nothing but file names and counts, then writes cache_info.json."""
    import ray

    from diffplat.data.pipeline import training_dataset

    c = config
    spec = c.model_dump(mode="json")
    start = time.perf_counter()
    rows_in = _rows_in(c.data)
    width, height = c.resolution
    decoded = training_dataset(c.data, c.resolution, c.center_crop, c.random_flip, c.seed, conditioning=c.conditioning,
                               ids=True)  # fmt: skip
    streams = decoded.streaming_split(c.replicas, equal=False)
    # SPREAD: the encoders on as many nodes as there are (each writes what it encodes)
    replica = ray.remote(CacheReplica).options(num_gpus=c.gpus_per_replica, num_cpus=c.cpus_per_replica,
                                               max_concurrency=2, scheduling_strategy="SPREAD")  # fmt: skip
    with replace_dir(output, "cache", (CACHE_INFO,)) as tmp:
        replicas = [replica.remote(spec, str(tmp), rank) for rank in range(c.replicas)]
        pending = [r.run.remote(s) for r, s in zip(replicas, streams)]
        ticker = Ticker()
        while True:
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=ticker.seconds)
            if len(ready) == len(pending):
                break
            if ticker.due():
                done = sum(ray.get([r.progress.remote() for r in replicas]))
                log.info("cache: %d/%s rows (%.1f rows/s)", done, rows_in if rows_in is not None else "?",
                         done / (time.perf_counter() - start))  # fmt: skip
        written = [f for files in ray.get(pending) for f in files]
        rows = sum(f["rows"] for f in written)
        if not rows:
            why = " (cache.conditioning: no row has a conditioning image)" if c.conditioning else ""
            raise ValueError(f"cache: no row of {c.data} could be encoded{why}")
        # One numbering for the whole cache, in the order of the replicas and their files.
        shards = []
        for i, f in enumerate(written):
            (tmp / f["file"]).rename(tmp / f"shard-{i:05d}.parquet")
            shards.append({"file": f"shard-{i:05d}.parquet", "rows": f["rows"], "node": f["node"]})
        facts, empty = ray.get(replicas[0].describe.remote())  # the empty prompt, from models already loaded
        info = write_cache_meta(tmp, c, facts, empty, rows, shards)
    elapsed = time.perf_counter() - start
    left_out = rows_in - rows if rows_in is not None else 0
    log.info("cache: %d rows at %dx%d (%d replica%s) in %d shards in %s, %.1f s%s", rows, width, height,
             c.replicas, "s"[: c.replicas > 1], len(written), output, elapsed,
             f"; {left_out} rows left out (undecodable, or no conditioning image)" if left_out else "")  # fmt: skip
    return {"cache": str(output), "rows": rows, "rows_left_out": left_out, "shards": len(written),
            "rows_per_s": rows / elapsed, "latent_shape": info["latent_shape"],
            "nodes": len({f["node"] for f in written}), "output_bytes": sum(f["bytes"] for f in written),
            "driver_bytes": sum(record_bytes(f) for f in written)}  # fmt: skip


def cached_dataset(folder: str, conditioning: bool, repeats: int = 1):
    """The cache's rows as a Ray Data dataset for Ray Train: read, nothing decoded (the objective
    turns the bytes into tensors on the worker); each file `repeats` times (train.repeats)."""
    import ray.data

    files = [str(p) for p in sorted(Path(folder).glob("shard-*.parquet"))]
    if not files:
        raise ConfigError(f"train.cache: {folder} holds no shard-*.parquet")
    columns = [name for name in SCHEMA.names if conditioning or name != "conditioning"]
    from diffplat.data.pipeline import dataset_settings, repeated

    # As training_dataset reads shards: the v1 reader (a task per file) and no resource
    # reservations. With the v2 reader the workers waited on 40% of a full fine-tune's steps.
    with dataset_settings(use_datasource_v2=False, op_resource_reservation_enabled=False):
        ds = ray.data.read_parquet(files, columns=columns, override_num_blocks=len(files))
        return repeated(ds, repeats)
