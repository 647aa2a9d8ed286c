"""Data at scale. So far: peak memory of caption generation over a BDD label file of 100,000
frames, streamed (diffplat) against `json.load` of the whole file (how source 4's scripts and
diffplat before read it). Each runs in a fresh process; peak = its maximum resident set.
Target: under 1 GiB.
    python bench/data_scale.py [--frames 100000]
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
    code = (f"import resource, time\nfrom pathlib import Path\npath = Path({str(path)!r})\nstart = time.perf_counter()\n"
            f"{CHILD[way]}\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - start, n)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=100_000)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
