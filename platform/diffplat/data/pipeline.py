"""Ray Data: Parquet shards -> decoded, cropped training batches, streamed to Ray Train workers."""

from __future__ import annotations

import io
import logging
import zlib
from contextlib import contextmanager

import numpy as np
from PIL import Image

log = logging.getLogger("diffplat")


class ToTrainingArrays:
    """Decode, resize (shorter side first) and crop to (width, height), as SDXL training does.

    Keeps the original size and the crop's top-left corner: SDXL is conditioned on both.
    A composite (a row with a layout) is resized to (width, height) whole and never flipped: a
    crop would cut panels and a flip would swap them against their caption's scene order.
    With `conditioning` (ControlNet), each row's conditioning image goes through exactly the same
    resize, crop and flip as its image (nearest-neighbour, so a segmentation map keeps its
    palette colours), and rows without one are left out. With `ids`, each row's id goes along
    (the cache stage keys its rows by it).
    Undecodable rows are dropped with a warning (prepare has already checked them once).
    """

    def __init__(self, resolution: tuple[int, int], center_crop: bool, random_flip: bool, seed: int,
                 conditioning: bool = False, ids: bool = False, buckets: list[tuple[int, int]] | None = None):  # fmt: skip
        self.width, self.height = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.conditioning = conditioning
        self.ids = ids
        self.seed = seed
        self.buckets = [tuple(b) for b in buckets] if buckets else None

    def _geometry(self, row_id: str, width: int, height: int, layout: str | None):
        """(resized size, crop box, flip) for one row. The random crop and flip are drawn from
        the seed and the row's id alone, so a row gets the same ones however Ray Data blocks and
        schedules the rows: a resumed run sees exactly the batches the stopped one would have.
        With buckets, the row is cropped to its bucket instead of the one resolution."""
        from diffplat.data.buckets import nearest_bucket

        target_w, target_h = nearest_bucket(width, height, self.buckets) if self.buckets else (self.width, self.height)
        if layout:
            return (target_w, target_h), (0, 0, target_w, target_h), False
        scale = max(target_w / width, target_h / height)
        size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
        spare_x, spare_y = size[0] - target_w, size[1] - target_h
        rng = np.random.default_rng([self.seed, zlib.crc32(str(row_id).encode())])
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
        flip = bool(self.random_flip and rng.random() < 0.5)
        return size, (left, top, left + target_w, top + target_h), flip

    @staticmethod
    def _apply(data: bytes, size, box, flip: bool, resample) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB").resize(size, resample).crop(box)
        pixels = np.asarray(img, dtype=np.float32)
        return (pixels[:, ::-1] if flip else pixels).transpose(2, 0, 1)

    def _one(self, row_id: str, data: bytes, layout: str | None = None, conditioning: bytes | None = None):
        with Image.open(io.BytesIO(data)) as img:
            original = (img.height, img.width)
        size, box, flip = self._geometry(row_id, original[1], original[0], layout)
        pixels = self._apply(data, size, box, flip, Image.BICUBIC) / 127.5 - 1.0
        cond = self._apply(conditioning, size, box, flip, Image.NEAREST) / 255.0 if conditioning else None
        left = size[0] - box[2] if flip else box[0]  # SDXL's crop coordinate, as seen after the flip
        return pixels, original, (box[1], left), cond

    chunk_rows = 16  # rows per output batch: a shard's worth of float arrays would be gigabytes

    def __call__(self, batch: dict):
        """Output batches of at most chunk_rows rows (of one bucket each, with buckets)."""
        for start in range(0, len(batch["id"]), self.chunk_rows):
            chunk = {k: v[start : start + self.chunk_rows] for k, v in batch.items()}
            if self.buckets:
                yield from self._per_bucket(chunk)
            else:
                yield self.arrays(chunk)

    def _per_bucket(self, batch: dict):
        """One output batch per bucket the rows fall into (each stacks: one size)."""
        from diffplat.data.buckets import nearest_bucket

        groups: dict[tuple, list[int]] = {}
        for i, data in enumerate(batch["image"]):
            try:
                with Image.open(io.BytesIO(data)) as img:
                    key = nearest_bucket(img.width, img.height, self.buckets)
            except Exception:  # undecodable: arrays() names and drops it
                key = self.buckets[0]
            groups.setdefault(key, []).append(i)
        for (width, height), rows in groups.items():
            arrays = self.arrays({k: [v[i] for i in rows] for k, v in batch.items()}, (width, height))
            if len(arrays["caption"]):
                yield arrays

    def arrays(self, batch: dict, size: tuple[int, int] | None = None) -> dict:
        out = {k: [] for k in ("pixel_values", "original_size", "crop_top_left", "caption", "layout",
                               "conditioning_pixel_values", "id")}  # fmt: skip
        conditionings = batch["conditioning"] if self.conditioning else [None] * len(batch["id"])
        for row_id, data, caption, layout, cond in zip(batch["id"], batch["image"], batch["caption"], batch["layout"],
                                                       conditionings):  # fmt: skip
            if self.conditioning and cond is None:
                continue  # e.g. a BDD image with labels but no mask
            try:
                p, o, c, k = self._one(row_id, data, layout, cond)
            except Exception as err:  # a bad row must not stop a long training run
                log.warning("skipping row %s: cannot decode image (%s)", row_id, err)
                continue
            for key, value in zip(out, (p, o, c, caption, layout or "", k, row_id)):
                out[key].append(value)
        width, height = size or (self.width, self.height)
        empty = np.zeros((0, 3, height, width), np.float32)
        arrays = {
            "pixel_values": np.stack(out["pixel_values"]).astype(np.float32) if out["caption"] else empty,
            "original_size": np.array(out["original_size"], dtype=np.int64).reshape(-1, 2),
            "crop_top_left": np.array(out["crop_top_left"], dtype=np.int64).reshape(-1, 2),
            "caption": np.array(out["caption"], dtype=object),
            "layout": np.array(out["layout"], dtype=object),
        }
        if self.conditioning:
            stacked = out["conditioning_pixel_values"]
            arrays["conditioning_pixel_values"] = np.stack(stacked).astype(np.float32) if stacked else empty
        if self.ids:
            arrays["id"] = np.array(out["id"], dtype=object)
        return arrays


def training_dataset(shards: str, resolution: tuple[int, int], center_crop: bool, random_flip: bool, seed: int,
                     conditioning: bool = False, ids: bool = False, buckets: list | None = None,
                     repeats: int = 1):  # fmt: skip
    import ray.data

    from diffplat.data.shards import shard_files

    files = [str(p) for p in shard_files(shards)] if "://" not in shards else shards
    # The v2 Parquet reader packs small files into one read task, and the decode after it then
    # runs as one task on one CPU; the v1 reader makes a task per file (0.43 -> 0.94 of a bare loop
    # in bench/data_decode.py). Without reservations, decode tasks start on every free CPU at once.
    with dataset_settings(use_datasource_v2=False, op_resource_reservation_enabled=False):
        columns = ["id", "image", "caption", "layout"] + (["conditioning"] if conditioning else [])
        ds = ray.data.read_parquet(files, columns=columns, **({"override_num_blocks": len(files)} if isinstance(files, list) else {}))
        ds = repeated(ds, repeats)
        # Tasks, not an actor pool: an actor would hold a CPU for the whole run, and on a small
        # machine the reader then waits forever for the CPU the training workers left over.
        # batch_size None: the decode fuses into the read task (one task per shard file, no
        # second trip through the object store); the transform yields batches of chunk_rows.
        return ds.map_batches(ToTrainingArrays(resolution, center_crop, random_flip, seed, conditioning, ids, buckets),
                              batch_size=None, batch_format="numpy")  # fmt: skip


def repeated(ds, repeats: int):
    """kohya's num_repeats: each block's rows `repeats` times over, one pass after another, so an
    epoch is that many passes. A tiny dataset otherwise ends its epoch every few steps, and each
    new epoch restarts Ray Data's reading (seconds on a small machine, most of a short run)."""
    if repeats == 1:
        return ds
    import pyarrow as pa

    return ds.map_batches(lambda table: pa.concat_tables([table] * repeats), batch_size=None, batch_format="pyarrow")


@contextmanager
def dataset_settings(**values):
    """Ray Data context settings for the datasets made inside (a dataset keeps the context it
    was created with); the process's own settings come back after.

    `op_resource_reservation_enabled=False`: with reservations on, Ray Data holds CPUs back for
    operators a one-map job does not have and starts one task at a time at first (on 2 CPUs, one
    stays idle for the first seconds)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before = {name: getattr(context, name) for name in values}
    for name, value in values.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(context, name, value)
