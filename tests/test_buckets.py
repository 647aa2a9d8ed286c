"""Aspect-ratio buckets: derived from the data or listed, rows cropped to their bucket, one
bucket per batch, and a training run on images of two shapes."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from diffplat.data.buckets import bucket_batches, candidate_buckets, derive_buckets, nearest_bucket
from diffplat.data.pipeline import ToTrainingArrays


def _jpeg(width: int, height: int, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def test_buckets_keep_the_area_and_the_most_used_shapes():
    candidates = candidate_buckets(64 * 64, step=16)
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 for w, h in candidates)
    assert (64, 64) in candidates and (96, 32) in candidates and (32, 96) in candidates
    assert nearest_bucket(1280, 720, candidates) == (80, 48)  # 16:9 -> 5:3, the nearest in steps of 16
    sizes = [(1280, 720)] * 10 + [(480, 720)] * 5 + [(500, 500)]
    buckets, counts = derive_buckets(sizes, 64 * 64, 16, max_buckets=2)
    assert buckets == [(48, 80), (80, 48)]  # portrait first: sorted by aspect ratio
    assert counts == {(80, 48): 10, (48, 80): 6}  # the square row goes to the nearest kept bucket


def test_rows_are_cropped_to_their_bucket_and_batched_by_it():
    buckets = [(64, 32), (32, 64)]
    batch = {"id": np.array([f"r{i}" for i in range(7)], dtype=object),
             "image": [_jpeg(200, 90, 10), _jpeg(90, 200, 20), _jpeg(150, 80, 30), _jpeg(100, 260, 40),
                       _jpeg(160, 70, 50), b"broken", _jpeg(210, 100, 60)],
             "caption": np.array([f"c{i}" for i in range(7)], dtype=object), "layout": [None] * 7}  # fmt: skip
    transform = ToTrainingArrays((48, 48), center_crop=False, random_flip=True, seed=1, buckets=buckets)
    blocks = list(transform(batch))
    assert sorted((b["pixel_values"].shape[1:], list(b["caption"])) for b in blocks) == [
        ((3, 32, 64), ["c0", "c2", "c4", "c6"]), ((3, 64, 32), ["c1", "c3"])]  # (C, H, W); the broken row dropped
    wide = next(b for b in blocks if b["pixel_values"].shape[3] == 64)
    assert wide["original_size"].tolist()[0] == [90, 200]  # (height, width) as found
    # Ray Data may join the per-bucket blocks; batches still hold one bucket each, every row once
    ragged = np.empty(6, dtype=object)  # a joined block holds its tensors as a ragged object array
    ragged[:] = list(blocks[0]["pixel_values"]) + list(blocks[1]["pixel_values"])
    joined = {k: ragged if k == "pixel_values" else np.concatenate([blocks[0][k], blocks[1][k]]) for k in blocks[0]}
    batches = list(bucket_batches([joined], batch_size=2, seed=0, shuffle_rows=1))
    assert all(b["pixel_values"].shape[0] == 2 and len({r.shape for r in b["pixel_values"]}) == 1 for b in batches)
    seen = [c for b in batches for c in b["caption"]]
    assert len(seen) == len(set(seen)) == 6  # 4 wide + 2 tall, none twice, nothing left over here
    again = list(bucket_batches([joined], batch_size=2, seed=0, shuffle_rows=1))
    assert [list(b["caption"]) for b in again] == [list(b["caption"]) for b in batches]  # seeded


@pytest.mark.slow
def test_training_on_two_shapes_with_derived_buckets(tmp_path, tiny_sdxl, local_ray):
    from diffplat.config import parse_config
    from diffplat.runner import run_job

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(8):
        size = (96, 48) if i % 2 else (48, 96)
        Image.new("RGB", size, (30 * i, 120, 90)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a {'wide' if i % 2 else 'tall'} picture {i}")
    config = parse_config({
        "name": "buckets-test",
        "prepare": {"source": "folder", "folder": {"images": str(folder)}},
        "train": {"base_model": str(tiny_sdxl), "data": "data/shards", "resolution": [48, 48],
                  "buckets": {"step": 16, "max_buckets": 4}, "random_flip": True,
                  "lora": {"rank": 4}, "max_train_steps": 4, "train_batch_size": 2, "learning_rate": 1e-3,
                  # 2 workers: their buckets run out at different batches, and the epoch must end for both
                  "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, "deepspeed": {"zero_stage": 0}},
    })  # fmt: skip
    result = run_job(config, tmp_path)
    info = json.loads((tmp_path / "adapters" / "lora" / "adapter_info.json").read_text())
    assert info["step"] == 4 and result.outputs["train"]["step"] == 4  # mixed shapes never shared a batch
