"""Ray Data: Parquet shards -> decoded, cropped training batches, streamed to Ray Train workers."""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

log = logging.getLogger("diffplat")


class ToTrainingArrays:
    """Decode, resize (shorter side first) and crop to (width, height), as SDXL training does.

    Keeps the original size and the crop's top-left corner: SDXL is conditioned on both.
    A composite (a row with a layout) is resized to (width, height) whole and never flipped: a
    crop would cut panels and a flip would swap them against their caption's scene order.
    Undecodable rows are dropped with a warning (prepare has already checked them once).
    """

    def __init__(self, resolution: tuple[int, int], center_crop: bool, random_flip: bool, seed: int):
        self.width, self.height = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.rng = np.random.default_rng(seed)

    def _one(self, data: bytes, layout: str | None = None):
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            original = (img.height, img.width)
            if layout:
                img = img.resize((self.width, self.height), Image.BICUBIC)
                return (np.asarray(img, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1), original, (0, 0)
            scale = max(self.width / img.width, self.height / img.height)
            size = (max(self.width, round(img.width * scale)), max(self.height, round(img.height * scale)))
            img = img.resize(size, Image.BICUBIC)
        spare_x, spare_y = size[0] - self.width, size[1] - self.height
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = int(self.rng.integers(0, spare_x + 1)), int(self.rng.integers(0, spare_y + 1))
        img = img.crop((left, top, left + self.width, top + self.height))
        pixels = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        if self.random_flip and self.rng.random() < 0.5:
            pixels = pixels[:, ::-1]
            left = spare_x - left
        return pixels.transpose(2, 0, 1), original, (top, left)

    def __call__(self, batch: dict) -> dict:
        pixels, originals, crops, captions, layouts = [], [], [], [], []
        for row_id, data, caption, layout in zip(batch["id"], batch["image"], batch["caption"], batch["layout"]):
            try:
                p, o, c = self._one(data, layout)
            except Exception as err:  # a bad row must not stop a long training run
                log.warning("skipping row %s: cannot decode image (%s)", row_id, err)
                continue
            pixels.append(p)
            originals.append(o)
            crops.append(c)
            captions.append(caption)
            layouts.append(layout or "")
        shape = (0, 3, self.height, self.width)
        return {
            "pixel_values": np.stack(pixels) if pixels else np.zeros(shape, np.float32),
            "original_size": np.array(originals, dtype=np.int64).reshape(-1, 2),
            "crop_top_left": np.array(crops, dtype=np.int64).reshape(-1, 2),
            "caption": np.array(captions, dtype=object),
            "layout": np.array(layouts, dtype=object),
        }


def training_dataset(shards: str, resolution: tuple[int, int], center_crop: bool, random_flip: bool, seed: int):
    import ray.data

    from diffplat.data.shards import shard_files

    files = [str(p) for p in shard_files(shards)] if "://" not in shards else shards
    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    # The v2 Parquet reader packs small files into one read task, and the decode after it then
    # runs as one task on one CPU; the v1 reader makes a task per file (0.43 -> 0.94 of a bare loop
    # in bench/data_decode.py). The dataset keeps the context it was created with.
    context.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet(files, columns=["id", "image", "caption", "layout"])
    finally:
        context.use_datasource_v2 = before
    # Tasks, not an actor pool: an actor would hold a CPU for the whole run, and on a small
    # machine the reader then waits forever for the CPU the training workers left over.
    return ds.map_batches(
        ToTrainingArrays(resolution, center_crop, random_flip, seed), batch_size=16, batch_format="numpy"
    )
