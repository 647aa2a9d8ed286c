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


def fill_requests(config: GenerateConfig, inputs: Path) -> tuple[list[dict], list[str]]:
    """One row per filled composite (`num_generations` per input), and the inputs skipped, each
    with its reason. A composite's prompt is its same-named .txt, else the first of `prompts`."""
    from diffplat.data.composite_source import read_caption
    from diffplat.data.composites import CompositeError
    from diffplat.pictures import list_images

    if not inputs.is_dir():
        raise FileNotFoundError(f"generate.ic_lora.inputs: {inputs} is not a folder")
    rows, skipped = [], []
    for path in list_images(inputs):
        try:
            prompt = read_caption(path)
        except CompositeError as err:
            if not config.prompts:
                skipped.append(f"{path.name}: no prompt ({err}, and no generate.prompts)")
                continue
            prompt = config.prompts[0]
        for g in range(config.num_generations):
            index = len(rows)
            name = f"{path.stem}.png" if config.num_generations == 1 else f"{path.stem}_{g}.png"
            rows.append({"index": index, "prompt": prompt, "seed": config.seed + index, "input": str(path), "name": name})
    return rows, skipped


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Generator:
    """A pipeline replica (a Ray Data actor): loads once, then turns request rows into PNG bytes.

    text_to_image: prompts -> images. ic_lora: composites -> composites with panels filled.
    """

    def __init__(self, config: dict):
        import torch

        from diffplat.models.loading import DTYPES, load_pipeline, set_scheduler
        from diffplat.models.lora import adapter_info

        self.config = GenerateConfig.model_validate(config)
        c = self.config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = DTYPES[c.dtype]
        self.max_token_length = c.max_token_length or (adapter_info(c.lora).get("max_token_length", 75) if c.lora else 75)
        if c.kind == "ic_lora":
            from diffplat.infer.panels import FillOptions, load_fill_pipeline

            self.pipe = load_fill_pipeline(c.base_model, c.lora, c.vae, c.variant, dtype, c.scheduler)
            s = c.ic_lora
            self.fill_options = FillOptions(
                panels=tuple(s.panels_to_inpaint), layout=s.layout, negative_prompt=c.negative_prompt or None,
                num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale, strength=s.strength,
                use_gradient_mask=s.use_gradient_mask, gradient_width=s.gradient_width, adapter_scale=c.adapter_scale,
                max_token_length=self.max_token_length,
            )  # fmt: skip
        else:
            self.pipe = load_pipeline(c.base_model, c.vae, c.variant, dtype)
            set_scheduler(self.pipe, c.scheduler)
            if c.lora:
                self.pipe.load_lora_weights(c.lora)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        start = time.perf_counter()
        out = self._fill(batch) if self.config.kind == "ic_lora" else self._text(batch)
        count = len(batch["index"])
        out.update({"index": batch["index"], "prompt": batch["prompt"], "seed": batch["seed"],
                    "seconds": np.full(count, (time.perf_counter() - start) / count)})  # fmt: skip
        return out

    def _text(self, batch: dict) -> dict:
        import numpy as np
        import torch

        c = self.config
        width, height = c.resolution
        prompts = [str(p) for p in batch["prompt"]]
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in batch["seed"]]
        from diffplat.infer.panels import prompt_keywords

        images = self.pipe(
            **prompt_keywords(self.pipe, prompts, [c.negative_prompt] * len(prompts), self.max_token_length),
            width=width,
            height=height,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            generator=generators,
            cross_attention_kwargs={"scale": c.adapter_scale} if c.lora else None,
        ).images
        names = [f"{int(i):06d}.png" for i in batch["index"]]
        return {"name": np.array(names, dtype=object), "png": np.array([_png(im) for im in images], dtype=object),
                "comparison": np.array([b""] * len(images), dtype=object), "error": np.array([""] * len(images), dtype=object)}  # fmt: skip

    def _fill(self, batch: dict) -> dict:
        """One composite at a time: each has its own size, prompt and seed."""
        import numpy as np
        from PIL import Image

        from diffplat.data.composites import CompositeError
        from diffplat.infer.panels import fill_panels

        pngs, comparisons, errors = [], [], []
        for path, prompt, seed in zip(batch["input"], batch["prompt"], batch["seed"]):
            try:
                with Image.open(path) as img:
                    composite = img.convert("RGB")
                fill = fill_panels(self.pipe, composite, str(prompt), [int(seed)], self.fill_options, where=Path(path).name)[0]
            except (OSError, CompositeError) as err:  # one bad composite must not end a bulk run
                pngs.append(b"")
                comparisons.append(b"")
                errors.append(f"{Path(path).name}: {err}")
                continue
            pngs.append(_png(fill.image))
            comparisons.append(_png(fill.comparison) if self.config.ic_lora.save_comparison else b"")
            errors.append("")
        return {"name": batch["name"], "input": batch["input"], "png": np.array(pngs, dtype=object),
                "comparison": np.array(comparisons, dtype=object), "error": np.array(errors, dtype=object)}  # fmt: skip


def run_generation(config: GenerateConfig, output: Path, prompts_file: Path | None = None,
                   inputs: Path | None = None) -> dict:  # fmt: skip
    """Generate every image of `config` (paths already resolved) into the folder `output`."""
    import ray.data

    skipped: list[str] = []
    if config.kind == "ic_lora":
        requests, skipped = fill_requests(config, inputs)
        if not requests:
            raise ValueError(f"generate: no composite in {inputs} can be filled: " + "; ".join(skipped[:5]))
        log.info("generate: filling panels %s of %d composites on %d replica(s)", config.ic_lora.panels_to_inpaint,
                 len(requests) // config.num_generations, config.replicas)  # fmt: skip
    else:
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
                if row["error"]:
                    skipped.append(row["error"])
                    log.warning("generate: skipped %s", row["error"])
                    continue
                name = row["name"]
                (tmp / "images" / name).write_bytes(row["png"])
                if row["comparison"]:
                    (tmp / "comparisons").mkdir(exist_ok=True)
                    (tmp / "comparisons" / name).write_bytes(row["comparison"])
                record = {
                    "file_name": f"images/{name}",
                    "prompt": row["prompt"],
                    "negative_prompt": config.negative_prompt,
                    "seed": int(row["seed"]),
                    "base_model": config.base_model,
                    "adapter": config.lora,
                    "adapter_scale": config.adapter_scale,
                    "steps": config.num_inference_steps,
                    "guidance_scale": config.guidance_scale,
                    "scheduler": config.scheduler,
                    "seconds": round(float(row["seconds"]), 4),
                }
                if config.kind == "ic_lora":
                    s = config.ic_lora
                    record.update({"input": row["input"], "layout": s.layout, "panels": s.panels_to_inpaint,
                                   "strength": s.strength, "gradient_width": s.gradient_width if s.use_gradient_mask else 0})  # fmt: skip
                else:
                    record.update({"width": width, "height": height})
                meta.write(json.dumps(record) + "\n")
                written += 1
                if written % 10 == 0 or written == len(requests):
                    log.info("generate: %d/%d images", written, len(requests))
        if skipped:
            (tmp / "skipped.txt").write_text("".join(f"{s}\n" for s in skipped))
        if written == 0:
            raise ValueError(f"generate: no image was made; first problems: {'; '.join(skipped[:5])}")
    elapsed = time.perf_counter() - start
    return {"images": written, "skipped": len(skipped), "images_per_s": written / elapsed if elapsed else 0.0}
