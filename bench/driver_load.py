"""Driver load: what reaches the job's driver, and how its memory grows when the work doubles.

The replicas of `generate` and `cache` write their own files; the driver should receive small
records only. For each stage this runs N and 2N items on 2 replicas, each size in a fresh
process (a fresh local Ray), and prints:
  - the bytes that reached the driver (the stage's own count of every record it received)
    against the bytes the replicas wrote: the baseline is the output itself;
  - the driver's peak resident memory during the stage (sampled every 20 ms), at N and at 2N.
Targets: driver bytes under 1% of the output bytes; the driver's peak under 1.10x when N doubles.
    python bench/driver_load.py [--images 12] [--rows 48] [--size 256]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class PeakRss:
    """The process's peak resident memory while the block runs, sampled on a thread."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def child(stage: str, count: int, size: int, model: str, out: Path) -> dict:
    """One stage at one size, in this process (the driver), on a local Ray of 2 CPUs."""
    import ray

    from diffplat.config import CacheConfig, GenerateConfig, parse_config

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    if stage == "generate":
        from diffplat.infer.generate import run_generation

        config = GenerateConfig(base_model=model, prompts=[f"a driving scene, street {i}" for i in range(count)],
                                resolution=(size, size), num_inference_steps=2, replicas=2, cpus_per_replica=1,
                                batch_size=2)  # fmt: skip
        with PeakRss() as rss:
            result = run_generation(config, out / "gens")
    else:
        from diffplat.data.cache import run_cache
        from diffplat.data.prepare import prepare
        from diffplat.data.synthetic_bdd import write_synthetic_bdd

        paths = write_synthetic_bdd(out / "bdd", num_images=count)
        job = parse_config({"name": "bench", "prepare": {"bdd": {"images": paths["images"], "labels": paths["labels"]},
                                                          "rows_per_shard": 16}})  # fmt: skip
        prepare(job.prepare, lambda p: out / p)
        # half a CPU each: the other CPU decodes the shards for them
        config = CacheConfig(data=str(out / "data" / "shards"), base_model=model, resolution=(size, size * 9 // 16),
                             replicas=2, cpus_per_replica=0.5, batch_size=8, rows_per_shard=64)  # fmt: skip
        with PeakRss() as rss:
            result = run_cache(config, out / "cache")
    ray.shutdown()
    return {"driver_bytes": result["driver_bytes"], "output_bytes": result["output_bytes"],
            "peak_mb": rss.peak / 2**20, "base_mb": rss.base / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12, help="N for generate (2N is run too)")
    parser.add_argument("--rows", type=int, default=48, help="N for cache (2N is run too)")
    parser.add_argument("--size", type=int, default=256, help="image side (cache: width, 16:9)")
    parser.add_argument("--child", nargs=4, metavar=("STAGE", "N", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, count, model, out = args.child
        print(json.dumps(child(stage, int(count), args.size, model, Path(out))))
        return

    from diffplat.models.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny-sdxl", "sdxl")
        rows = {}
        for stage, n in (("generate", args.images), ("cache", args.rows)):
            for count in (n, 2 * n):
                out = Path(tmp) / f"{stage}-{count}"
                proc = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", stage, str(count),
                                       str(model), str(out)], capture_output=True, text=True, timeout=900)  # fmt: skip
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                rows[(stage, count)] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\ndriver_load: tiny SDXL, 2 replicas, 2 CPUs; generate at {args.size}x{args.size}, cache at "
          f"{args.size}x{args.size * 9 // 16}")
    print(f"{'stage':<9} {'items':>5} {'output MB':>10} {'to driver KB':>13} {'share':>8} {'driver peak MB':>15}")
    for (stage, count), r in rows.items():
        share = r["driver_bytes"] / r["output_bytes"]
        print(f"{stage:<9} {count:>5} {r['output_bytes'] / 2**20:>10.2f} {r['driver_bytes'] / 1024:>13.1f} "
              f"{share:>8.3%} {r['peak_mb']:>15.0f}")
    for stage, n in (("generate", args.images), ("cache", args.rows)):
        small, big = rows[(stage, n)], rows[(stage, 2 * n)]
        worst = max(small["driver_bytes"] / small["output_bytes"], big["driver_bytes"] / big["output_bytes"])
        growth = big["peak_mb"] / small["peak_mb"]
        print(f"{stage}: driver bytes at most {worst:.3%} of the output (target < 1%); driver peak "
              f"{growth:.3f}x when the work doubles (target < 1.10x)")


if __name__ == "__main__":
    main()
