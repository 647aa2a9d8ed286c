"""The `generate` stage: prompts -> images, in bulk, with pipeline replicas on Ray Data.

Each replica loads the pipeline (and LoRA) once; the driver streams the results and writes
COCO-style numbered images plus one `metadata.jsonl` line per image.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

from diffplat.config import GenerateConfig
from diffplat.fileio import replace_dir

log = logging.getLogger("diffplat")


def read_prompts(config: GenerateConfig, prompts_file: Path | None) -> list[str]:
    prompts = list(config.prompts)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise FileNotFoundError(f"generate.prompts_file: {prompts_file} is not a file")
        lines = [line.strip() for line in prompts_file.read_text().splitlines()]
        prompts += [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"generate: no prompts (prompts_file {prompts_file} is empty)")
    return prompts


def generation_requests(config: GenerateConfig, prompts: list[str]) -> list[dict]:
    """One row per image; the seed is fixed by position, so a rerun makes the same images."""
    rows = []
    for p, prompt in enumerate(prompts):
        for g in range(config.num_generations):
            index = p * config.num_generations + g
            rows.append({"index": index, "prompt": prompt, "seed": config.seed + index})
    return rows


class Generator:
    """A pipeline replica (a Ray Data actor): loads once, then turns prompt rows into PNG bytes."""

    def __init__(self, config: dict):
        import torch

        from diffplat.models.loading import DTYPES, load_pipeline, set_scheduler

        self.config = GenerateConfig.model_validate(config)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = DTYPES[self.config.dtype]
        self.pipe = load_pipeline(self.config.base_model, self.config.vae, self.config.variant, dtype)
        set_scheduler(self.pipe, self.config.scheduler)
        if self.config.lora:
            self.pipe.load_lora_weights(self.config.lora)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        c = self.config
        width, height = c.resolution
        prompts = [str(p) for p in batch["prompt"]]
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in batch["seed"]]
        start = time.perf_counter()
        images = self.pipe(
            prompt=prompts,
            negative_prompt=[c.negative_prompt] * len(prompts) if c.negative_prompt else None,
            width=width,
            height=height,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            generator=generators,
            cross_attention_kwargs={"scale": c.adapter_scale} if c.lora else None,
        ).images
        seconds = (time.perf_counter() - start) / len(images)
        encoded = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            encoded.append(buf.getvalue())
        return {
            "index": batch["index"],
            "prompt": batch["prompt"],
            "seed": batch["seed"],
            "png": np.array(encoded, dtype=object),
            "seconds": np.full(len(images), seconds),
        }


def run_generation(config: GenerateConfig, output: Path, prompts_file: Path | None = None) -> dict:
    """Generate every image of `config` (paths already resolved) into the folder `output`."""
    import ray.data

    prompts = read_prompts(config, prompts_file)
    requests = generation_requests(config, prompts)
    log.info("generate: %d images from %d prompts on %d replica(s)", len(requests), len(prompts), config.replicas)
    ds = ray.data.from_items(requests).map_batches(
        Generator,
        fn_constructor_args=(config.model_dump(mode="json"),),
        batch_size=config.batch_size,
        batch_format="numpy",
        concurrency=config.replicas,
        num_gpus=config.gpus_per_replica,
        num_cpus=config.cpus_per_replica,
    )
    width, height = config.resolution
    start = time.perf_counter()
    written = 0
    with replace_dir(output) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "metadata.jsonl", "w") as meta:
            for row in ds.iter_rows():
                name = f"{int(row['index']):06d}.png"
                (tmp / "images" / name).write_bytes(row["png"])
                meta.write(json.dumps({
                    "file_name": f"images/{name}",
                    "prompt": row["prompt"],
                    "negative_prompt": config.negative_prompt,
                    "seed": int(row["seed"]),
                    "base_model": config.base_model,
                    "adapter": config.lora,
                    "adapter_scale": config.adapter_scale,
                    "width": width,
                    "height": height,
                    "steps": config.num_inference_steps,
                    "guidance_scale": config.guidance_scale,
                    "scheduler": config.scheduler,
                    "seconds": round(float(row["seconds"]), 4),
                }) + "\n")  # fmt: skip
                written += 1
                if written % 10 == 0 or written == len(requests):
                    log.info("generate: %d/%d images", written, len(requests))
    elapsed = time.perf_counter() - start
    return {"images": written, "images_per_s": written / elapsed if elapsed else 0.0}
