"""The Ray Data training pipeline vs a plain loop over the same shards.

Both decode, resize and crop every row with the same function (data.pipeline.ToTrainingArrays);
the baseline reads the Parquet files with pyarrow in one process. Prints rows/s and the ratio
(Ray Data's streaming overhead on one machine; it earns its keep by spreading over a cluster).
    python bench/data_decode.py [--images 96] [--rounds 3]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray

    from diffplat.config import PrepareConfig
    from diffplat.data.pipeline import ToTrainingArrays, training_dataset
    from diffplat.data.prepare import prepare_bdd
    from diffplat.data.shards import shard_files
    from diffplat.data.synthetic_bdd import write_synthetic_bdd

    resolution = (512, 288)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_synthetic_bdd(tmp / "bdd", num_images=args.images, size=(1280, 720))
        prepare_bdd(PrepareConfig(bdd=paths, output=str(tmp / "data"), rows_per_shard=16), Path)
        shards = tmp / "data" / "shards"

        def bare() -> int:
            transform, rows = ToTrainingArrays(resolution, True, False, 0), 0
            for path in shard_files(shards):
                table = pq.read_table(path, columns=["id", "image", "caption", "layout"])
                rows += len(transform.arrays(table.to_pydict())["caption"])
            return rows

        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False

        def ours() -> int:
            ds = training_dataset(str(shards), resolution, True, False, 0)
            return sum(len(b["caption"]) for b in ds.iter_batches(batch_size=16, batch_format="numpy"))

        bare_rates, our_rates = [], []
        for _ in range(args.rounds):
            for fn, rates in ((bare, bare_rates), (ours, our_rates)):
                start = time.perf_counter()
                rows = fn()
                rates.append(rows / (time.perf_counter() - start))
        ray.shutdown()
    bare_med, our_med = statistics.median(bare_rates), statistics.median(our_rates)
    print(f"{rows} rows of 1280x720 JPEG -> {resolution[0]}x{resolution[1]} arrays, {args.rounds} rounds, 2 CPUs")
    print(f"bare pyarrow loop   median {bare_med:8.1f} rows/s")
    print(f"diffplat Ray Data   median {our_med:8.1f} rows/s")
    print(f"ratio diffplat / bare: {our_med / bare_med:.2f}")


if __name__ == "__main__":
    main()
