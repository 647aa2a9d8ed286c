"""Data at scale, in one run:

0. prepare: BDD images (1280x720 JPEG, half with masks) -> shards, as parallel Ray Data tasks on
   2 CPUs against the same shard code run in one process (target: at least 1.6x);
1. the training feed: diffplat's Ray Data pipeline (read shards, decode, resize, crop) against a
   `torch.utils.data.DataLoader` with 2 workers doing the same decode and crop per row (target:
   at least 1.0x);
2. peak memory of caption generation over a BDD label file of 100,000 frames, streamed (diffplat)
   against `json.load` of the whole file (how source 4's scripts and diffplat before read it),
   each in a fresh process; peak = its maximum resident set (target: under 1 GiB).
3. a training step from cached latents and embeddings against encoding on the fly
   (bench/cached_latents.py: tiny SDXL LoRA, 128x128, batch 2).
    python bench/data_scale.py [--frames 100000] [--images 384]
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATEGORIES = ["car", "car", "car", "person", "traffic sign", "traffic light", "truck", "bus", "bike", "rider"]
ATTRIBUTES = {"weather": ["clear", "overcast", "rainy", "snowy", "partly cloudy", "foggy", "undefined"],
              "scene": ["city street", "highway", "residential", "parking lot", "gas stations", "tunnel"],
              "timeofday": ["daytime", "night", "dawn/dusk"]}  # fmt: skip


def write_label_file(path: Path, frames: int) -> None:
    """A 2018-format list file (boxes and the lane/drivable polygons BDD's files carry), written as a stream."""
    rng = random.Random(0)
    with open(path, "w") as f:
        f.write("[")
        for i in range(frames):
            labels = [{"category": rng.choice(CATEGORIES), "attributes": {"occluded": False, "truncated": False},
                       "box2d": {"x1": rng.uniform(0, 1200), "y1": rng.uniform(0, 600), "x2": 1270.5, "y2": 710.25},
                       "id": i * 100 + j} for j in range(rng.randint(3, 20))]  # fmt: skip
            labels.append({"category": "drivable area", "poly2d": [{"vertices": [[rng.uniform(0, 1280), 700.0]
                                                                                 for _ in range(12)], "closed": True}]})  # fmt: skip
            record = {"name": f"{i:08x}-frame.jpg", "attributes": {k: rng.choice(v) for k, v in ATTRIBUTES.items()},
                      "timestamp": 10000, "labels": labels}  # fmt: skip
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")


CHILD = {
    "stream": "from diffplat.data import bdd\n"
              "n = sum(1 for item in bdd.iter_label_file(path) if not isinstance(item, bdd.LabelError) and bdd.caption_from_labels(item))",  # fmt: skip
    "json.load": "import json\nfrom diffplat.data import bdd\n"
                 "n = sum(1 for r in json.load(open(path)) if bdd.caption_from_labels(bdd.parse_frame(r)))",  # fmt: skip
}


def measure(way: str, path: Path) -> tuple[float, float, int]:
    """(peak MiB, seconds, captions) of one way, in its own process."""
    # VmHWM, not ru_maxrss: the latter carries over the parent's peak through fork and exec
    peak = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"
    code = (f"import time\nfrom pathlib import Path\npath = Path({str(path)!r})\nstart = time.perf_counter()\n"
            f"{CHILD[way]}\nprint({peak}, time.perf_counter() - start, n)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


class ShardRows:
    """The shards' rows as a map-style dataset: what a DataLoader-based trainer would read."""

    def __init__(self, shards: Path, resolution: tuple[int, int]):
        import pyarrow.parquet as pq

        from diffplat.data.pipeline import ToTrainingArrays
        from diffplat.data.shards import shard_files

        self.files = [(p, pq.ParquetFile(p).metadata.num_rows) for p in shard_files(shards)]
        self.index = [(f, i) for f, n in self.files for i in range(n)]
        self.transform = ToTrainingArrays(resolution, True, False, 0)
        self.tables = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        import pyarrow.parquet as pq

        path, i = self.index[k]
        if path not in self.tables:  # each worker reads a shard once
            self.tables[path] = pq.read_table(path, columns=["id", "image", "caption", "layout"])
        row = self.tables[path].slice(i, 1).to_pydict()
        out = self.transform.arrays(row)
        return {"pixel_values": out["pixel_values"][0], "caption": out["caption"][0]}


def feed(images: int, batch: int = 4, rounds: int = 3) -> tuple[float, float]:
    """(DataLoader rows/s, diffplat Ray Data rows/s), medians over rounds, same shards."""
    import statistics

    import ray
    import torch

    from diffplat.config import PrepareConfig
    from diffplat.data.pipeline import training_dataset
    from diffplat.data.prepare import prepare_bdd
    from diffplat.data.synthetic_bdd import write_synthetic_bdd

    resolution = (512, 288)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_synthetic_bdd(tmp / "bdd", num_images=images, size=(1280, 720))
        prepare_bdd(PrepareConfig(bdd=paths, output=str(tmp / "data"), rows_per_shard=16), Path)
        shards = tmp / "data" / "shards"
        loader = torch.utils.data.DataLoader(ShardRows(shards, resolution), batch_size=batch, num_workers=2,
                                             collate_fn=lambda rows: rows, persistent_workers=False)  # fmt: skip
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        theirs, ours = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            rows = sum(len(b) for b in loader)
            theirs.append(rows / (time.perf_counter() - start))
            start = time.perf_counter()
            ds = training_dataset(str(shards), resolution, True, False, 0)
            rows = sum(len(b["caption"]) for b in ds.iter_batches(batch_size=batch, batch_format="numpy"))
            ours.append(rows / (time.perf_counter() - start))
        ray.shutdown()
    return statistics.median(theirs), statistics.median(ours)


def prepare_speed(images: int, rounds: int = 3) -> tuple[float, float]:
    """(one process rows/s, Ray Data rows/s), medians over rounds, same images and settings."""
    import shutil
    import statistics

    import ray

    from diffplat.config import PrepareConfig
    from diffplat.data.prepare import prepare_bdd
    from diffplat.data.synthetic_bdd import write_synthetic_bdd

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_synthetic_bdd(tmp / "bdd", num_images=images, size=(1280, 720))

        def run() -> float:
            shutil.rmtree(tmp / "data", ignore_errors=True)  # nothing to reuse: every shard built
            start = time.perf_counter()
            report = prepare_bdd(PrepareConfig(bdd=paths, output=str(tmp / "data"), rows_per_shard=16), Path)
            return report["rows_written"] / (time.perf_counter() - start)

        alone = [run() for _ in range(rounds)]  # no Ray running: the shard tasks run in this process
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        run()  # warm-up: Ray starts its worker processes once
        parallel = [run() for _ in range(rounds)]
        ray.shutdown()
    return statistics.median(alone), statistics.median(parallel)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=384)
    args = parser.parse_args()
    alone, parallel = prepare_speed(args.images)
    print(f"prepare: {args.images} BDD images 1280x720 (labels, masks) -> shards of 16, 2 CPUs, medians of 3")
    print(f"  one process  {alone:7.1f} rows/s   diffplat Ray Data  {parallel:7.1f} rows/s   "
          f"ratio {parallel / alone:.2f}x (target >= 1.6x)")
    theirs, ours = feed(args.images)
    print(f"training feed: {args.images} rows of 1280x720 JPEG -> 512x288 arrays, 2 CPUs, medians of 3")
    print(f"  DataLoader, 2 workers  {theirs:7.1f} rows/s   diffplat Ray Data  {ours:7.1f} rows/s   "
          f"ratio {ours / theirs:.2f}x (target >= 1.0x)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "det_train.json"
        start = time.perf_counter()
        write_label_file(path, args.frames)
        size = path.stat().st_size / 2**20
        print(f"label file: {args.frames} frames, {size:.0f} MiB ({time.perf_counter() - start:.0f} s to write)")
        base = measure("json.load", path)
        ours = measure("stream", path)
    assert base[2] == ours[2] == args.frames
    print(f"caption generation  json.load whole file  peak {base[0]:7.0f} MiB  {base[1]:6.1f} s")
    print(f"caption generation  diffplat, streamed     peak {ours[0]:7.0f} MiB  {ours[1]:6.1f} s   (target < 1024 MiB)")
    print(f"memory ratio streamed / whole: {ours[0] / base[0]:.2f}")
    sys.path.insert(0, str(Path(__file__).parent))
    from cached_latents import step_times

    fly, cached, device, steps = step_times()
    print(f"training step, tiny SDXL LoRA 128x128 batch 2, {device}, median of {steps}")
    print(f"  encoding on the fly {fly * 1000:7.1f} ms   from the cache {cached * 1000:7.1f} ms   "
          f"ratio {cached / fly:.2f} (below 1: the encoders' share saved)")


if __name__ == "__main__":
    main()
