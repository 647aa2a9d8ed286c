"""Aspect-ratio buckets: training at the data's own shapes instead of one fixed crop.

Each row goes to the bucket whose aspect ratio is nearest its own (by log ratio, so 2:1 and 1:2
are as far from 1:1), is resized to cover it and cropped to it; every batch holds one bucket's
rows, so it stacks. Buckets come from the job file, or are derived from the data as kohya's
bucketing does: every (width, height) in steps of `step` with about the resolution's pixel
area, of which the `max_buckets` that the most rows fall into are kept.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Iterator

import numpy as np

Size = tuple[int, int]  # (width, height)


def candidate_buckets(area: int, step: int = 64, max_ratio: float = 4.0) -> list[Size]:
    """Sizes in multiples of `step` whose area is at most `area` and as close to it as the step
    allows, from max_ratio:1 portrait to max_ratio:1 landscape."""
    sizes = set()
    width = step
    while width <= int(math.sqrt(area * max_ratio)):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes, key=lambda s: s[0] / s[1])


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def derive_buckets(sizes: Iterable[Size], area: int, step: int, max_buckets: int) -> tuple[list[Size], Counter]:
    """The buckets the most rows fall into (at most max_buckets), and how many rows each gets."""
    candidates = candidate_buckets(area, step)
    counts: Counter = Counter()
    for (w, h), n in Counter(sizes).items():  # a million rows come in a few sizes: match each size once
        counts[nearest_bucket(w, h, candidates)] += n
    kept = sorted((b for b, _ in counts.most_common(max_buckets)), key=lambda s: s[0] / s[1])
    if not kept:
        raise ValueError("no rows to derive aspect-ratio buckets from")
    rows: Counter = Counter()
    for (w, h), n in counts.items():
        rows[nearest_bucket(w, h, kept)] += n
    return kept, rows


def bucket_batches(blocks: Iterable[dict], batch_size: int, seed: int, shuffle_rows: int = 0) -> Iterator[dict]:
    """Batches of `batch_size` rows of one bucket each. Rows are sorted into their bucket by
    shape (a block may hold several: Ray Data joins the per-bucket batches ToTrainingArrays
    yields). A bucket gives a batch once it holds batch_size + shuffle_rows rows, drawn at
    random (seeded) among them: the local shuffle, per bucket. At the end of the epoch the
    buckets are emptied in whole batches; the rest is dropped, as drop_last does."""
    rng = np.random.default_rng(seed)
    pending: dict[tuple, list[dict]] = {}

    def take(key: tuple) -> dict:
        rows = pending[key]
        chosen = set(rng.choice(len(rows), batch_size, replace=False).tolist())
        batch = [rows[j] for j in sorted(chosen)]
        pending[key] = [r for j, r in enumerate(rows) if j not in chosen]
        return {k: np.stack([r[k] for r in batch]) if isinstance(batch[0][k], np.ndarray)
                else np.array([r[k] for r in batch], dtype=object) for k in batch[0]}  # fmt: skip

    for block in blocks:
        for i in range(len(block["caption"])):
            # copies: a waiting row must not keep its whole block of arrays alive
            row = {k: v[i].copy() if isinstance(v[i], np.ndarray) else v[i] for k, v in block.items()}
            key = np.shape(row["pixel_values"])
            pending.setdefault(key, []).append(row)
            if len(pending[key]) >= batch_size + shuffle_rows:
                yield take(key)
    for key in sorted(pending):
        while len(pending[key]) >= batch_size:
            yield take(key)
