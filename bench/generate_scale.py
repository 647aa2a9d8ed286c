"""Bulk generation and filtering on Ray Data vs one process doing the same work.

Generation: the `generate` stage with 2 replicas (Ray Data actors, one CPU each) against one
process that loads the same pipeline once and makes the same images one prompt at a time.
Filtering: the `filter` stage with 2 detector replicas against one process running the same
YOLO on one image at a time. Model loading is left out of the baselines and left in for
diffplat (its replicas load while the run is timed). Target for generation: >= 1.6x on 2 cores.
The baseline calls the pipeline once per prompt, as a plain loop does; diffplat's replicas take
batches of --batch (4). The detector runs at ultralytics' default 640 pixels in both.
    python bench/generate_scale.py [--images 240] [--resolution 128] [--steps 20]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="prompts a replica takes at once")
    args = parser.parse_args()

    import ray
    import torch

    from diffplat.config import FilterConfig, FilterRules, GenerateConfig
    from diffplat.filter.yolo import _detections, load_detector, run_filter
    from diffplat.infer.generate import run_generation
    from diffplat.models.loading import load_pipeline
    from diffplat.models.tiny import write_tiny_model
    from diffplat.pictures import list_images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "tiny-sdxl", "sdxl")
        prompts = [f"a driving scene, street {i}, daytime, with {i % 5} cars" for i in range(args.images)]
        config = GenerateConfig(base_model=str(model), prompts=prompts, resolution=(args.resolution,) * 2,
                                num_inference_steps=args.steps, replicas=args.replicas, cpus_per_replica=1,
                                batch_size=args.batch)  # fmt: skip

        pipe = load_pipeline(str(model))
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            pipe(prompt, width=args.resolution, height=args.resolution, num_inference_steps=args.steps,
                 generator=torch.Generator().manual_seed(i))  # fmt: skip
        bare_gen = len(prompts) / (time.perf_counter() - start)

        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_operator_progress_bars = False
        start = time.perf_counter()
        result = run_generation(config, tmp / "gens")
        ours_gen = result["images"] / (time.perf_counter() - start)

        images = list_images(tmp / "gens" / "images")
        detector = load_detector("yolov8n.yaml")
        start = time.perf_counter()
        for path in images:
            _detections(detector.predict(str(path), imgsz=640, conf=0.25, verbose=False)[0])
        bare_filter = len(images) / (time.perf_counter() - start)
        start = time.perf_counter()
        run_filter(FilterConfig(imgsz=640, rules=FilterRules(), replicas=args.replicas, batch_size=8,
                                save_annotated=False), tmp / "gens", "yolov8n.yaml")  # fmt: skip
        ours_filter = len(images) / (time.perf_counter() - start)
        ray.shutdown()
    print(f"{args.images} images, tiny SDXL {args.resolution}x{args.resolution}, {args.steps} steps; yolov8n "
          f"(random weights); {args.replicas} replicas; 2 CPUs")  # fmt: skip
    print(f"generate  one process {bare_gen:7.2f} img/s   diffplat {ours_gen:7.2f} img/s   "
          f"ratio {ours_gen / bare_gen:.2f}x (target >= 1.6x)")
    print(f"filter    one image at a time {bare_filter:7.2f} img/s   diffplat {ours_filter:7.2f} img/s   "
          f"ratio {ours_filter / bare_filter:.2f}x")


if __name__ == "__main__":
    main()
