"""The HTTP API under load, on the tiny SDXL, all in one run:

1. requests/s, p50 and p99 at concurrency 1 and 8, with batching on and off, and the ratios
   (target: batching gives at least 2x requests/s at concurrency 8);
2. Serve's added latency: p50 of an HTTP request at concurrency 1 against p50 of the same
   pipeline call in this process, on as many threads as a replica gets (target: under 10 ms);
3. 500 requests, 10% of them malformed: the status codes of the valid ones (target: no 5xx) and
   the Generator replica's memory before and after (target: back within 10%).

Every request loop is bounded in count and time and sends only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

SIZE, STEPS = 64, 2
BODY = {"prompt": "a car on a road at night", "num_inference_steps": STEPS, "width": SIZE, "height": SIZE}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def load(url: str, concurrency: int, requests_total: int, bodies=None, fmt: str = "json") -> dict:
    import json

    import requests

    session = requests.Session()
    bodies = bodies or [dict(BODY, seed=i) for i in range(requests_total)]

    def one(body):
        start = time.perf_counter()
        r = session.post(f"{url}/v1/generate?format={fmt}", json=body, timeout=120)
        seconds = time.perf_counter() - start
        timings = None
        if r.status_code == 200:  # the server's own split of its time
            timings = json.loads(r.headers["x-timings"]) if fmt == "png" else r.json()["timings"]
        return r.status_code, seconds, body, timings

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - start
    latencies = [s for _, s, _, _ in results]
    return {"rps": len(results) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * _percentile(latencies, 0.99), "results": results}  # fmt: skip


def breakdown(results: list) -> dict:
    """Medians, in ms, of where a request's time went: the pipeline in its replica, the hop from
    the ingress to that replica and back (with any batching wait), the ingress's own work
    (validation, JSON, PNG and base64), and the proxy with HTTP (the client's time less the
    ingress's)."""
    rows = [(seconds, t) for code, seconds, _, t in results if code == 200 and t]
    med = lambda f: 1000 * statistics.median(f(s, t) for s, t in rows)  # noqa: E731
    return {"pipeline": med(lambda s, t: t["generate_s"]),
            "hop + batch wait": med(lambda s, t: t["model_call_s"] - t["generate_s"]),
            "ingress (checks, encode)": med(lambda s, t: t["total_s"] - t["model_call_s"]),
            "of it, PNG + base64": med(lambda s, t: t["encode_s"]),
            "proxy + HTTP": med(lambda s, t: s - t["total_s"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="per measurement at concurrency 8")
    parser.add_argument("--wait", type=float, default=0.05, help="batch_wait_timeout_s")
    args = parser.parse_args()

    import ray
    import requests
    import torch
    from ray import serve

    from diffplat.models.loading import load_pipeline
    from diffplat.models.tiny import write_tiny_model
    from diffplat.serving.app import compose, resolve_settings

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny-sdxl", "sdxl")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        port = _port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        one_replica = {name: {"num_replicas": 1} for name in ("Generator", "Api")}
        one_replica["Generator"].update(max_ongoing_requests=16, max_queued_requests=64)

        def deploy(batching: bool) -> None:
            settings = {"base_model": str(model), "detector": None, "auth": "none",
                        "default_resolution": [SIZE, SIZE],
                        "batching": {"enabled": batching, "max_batch_size": 8, "batch_wait_timeout_s": args.wait}}  # fmt: skip
            serve.run(compose(resolve_settings(settings), one_replica), name="bench", route_prefix="/")
            load(url, 1, 3)  # warm up

        rows, mean_batch = {}, {}
        for batching in (False, True):
            deploy(batching)
            if not batching:  # the binary answer: no base64, no JSON around the image
                png = load(url, 1, max(8, args.requests // 4), fmt="png")
            rows[(batching, 1)] = load(url, 1, max(8, args.requests // 4))
            rows[(batching, 8)] = load(url, 8, args.requests)
            sizes = requests.get(f"{url}/v1/stats", timeout=30).json()["generator"]["batch_sizes"][-args.requests:]
            mean_batch[batching] = statistics.mean(sizes)
        print(f"\nserve_load: tiny SDXL, {SIZE}x{SIZE}, {STEPS} steps, one Generator replica, 2 CPUs")
        print(f"  {'batching':<9} {'conc.':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for (batching, conc), r in rows.items():
            print(f"  {'on' if batching else 'off':<9} {conc:>5} {r['rps']:>8.2f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")
        ratio = rows[(True, 8)]["rps"] / rows[(False, 8)]["rps"]
        print(f"  batching at concurrency 8: {ratio:.2f}x requests/s (target >= 2.0); mean batch "
              f"{mean_batch[True]:.1f} requests (off: {mean_batch[False]:.1f})")  # fmt: skip

        # Serve's added latency: the same call in this process, on the threads a replica gets.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # Ray gives a 0.25-CPU replica one thread (OMP_NUM_THREADS=1)
        pipe = load_pipeline(str(model))
        local = []
        for i in range(max(8, args.requests // 4)):
            start = time.perf_counter()
            pipe(BODY["prompt"], width=SIZE, height=SIZE, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(i)).images[0].tobytes()  # fmt: skip
            local.append(time.perf_counter() - start)
        torch.set_num_threads(threads)
        in_process = 1000 * statistics.median(local)
        for name, row in (("JSON (base64 PNG)", rows[(False, 1)]), ("format=png", png)):
            over_http = row["p50_ms"]
            print(f"  {name}: in-process pipeline p50 {in_process:.1f} ms, over HTTP p50 {over_http:.1f} ms: "
                  f"Serve adds {over_http - in_process:.1f} ms (target < 10); where a request's time goes (p50s):")  # fmt: skip
            print("    " + ", ".join(f"{part} {ms:.1f} ms" for part, ms in breakdown(row["results"]).items()))

        # 500 requests, 10% malformed; the replica's memory before and after.
        deploy(True)
        stats = lambda: requests.get(f"{url}/v1/stats", timeout=30).json()["generator"]["rss_mb"]  # noqa: E731
        load(url, 8, 40)  # settle allocator pools first
        before = stats()
        bad = [{"prompt": ""}, {"prompt": "x", "width": 100}, {"prompt": "x", "num_inference_steps": 0},
               {"prompt": "x", "adapter": "../etc"}, {"prompt": "x", "colour": 1}]  # fmt: skip
        bodies = [bad[i // 10 % len(bad)] if i % 10 == 0 else dict(BODY, seed=i) for i in range(500)]
        soak = load(url, 8, 500, bodies)
        after = stats()
        valid = [code for code, _, body, _ in soak["results"] if body.get("prompt") == BODY["prompt"]]
        invalid = [code for code, _, body, _ in soak["results"] if body.get("prompt") != BODY["prompt"]]
        server_errors = sum(code >= 500 for code in valid)
        print(f"  500 requests, 10% malformed: valid {len(valid)} -> {server_errors} 5xx (target 0); "
              f"malformed answered {sorted(set(invalid))}")  # fmt: skip
        print(f"  Generator replica memory {before:.0f} MB -> {after:.0f} MB: {after / before:.3f}x (target within 1.10)")
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
