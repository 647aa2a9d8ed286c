"""The `generate` stage: prompts -> images, in bulk, with pipeline replicas on Ray Data.

Each replica loads the pipeline (and LoRA) once and writes its images itself, COCO-style
numbered, into the output folder (storage every node sees); the driver streams back one small
record per image and writes the manifests: a `metadata.jsonl` line per image, the COCO list.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections import Counter
from pathlib import Path

from diffplat.cluster import replica_pool
from diffplat.config import GenerateConfig
from diffplat.console import Ticker
from diffplat.infer.output import add_input_rows

log = logging.getLogger("diffplat")


def read_prompts(config: GenerateConfig) -> list[str]:
    """The prompts, in this order: `prompts`, `prompts_file` (one a line, # comments), the
    captions of `prompts_from_shards` (e.g. BDD scenes captioned from their labels), and every
    combination of `prompt_template`'s values."""
    prompts = list(config.prompts)
    prompts_file = Path(config.prompts_file) if config.prompts_file else None
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise FileNotFoundError(f"generate.prompts_file: {prompts_file} is not a file")
        lines = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines()]
        prompts += [line for line in lines if line and not line.startswith("#")]
    if config.prompts_from_shards:
        from diffplat.data.shards import iter_rows

        prompts += [str(row["caption"]) for row in iter_rows(Path(config.prompts_from_shards), columns=["caption"])]
    if config.prompt_template:
        prompts += config.prompt_template.prompts()
    if not prompts:
        raise ValueError("generate: no prompts (the prompts file, shards or template gave none)")
    return prompts


def image_name(index: int, prompt: str, seed: int, output_format: str) -> str:
    """`coco`: numbered (000042.png); `simple`: the prompt's first words and the seed."""
    if output_format == "coco":
        return f"{index:06d}.png"
    words = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "image"
    return f"{words}_{seed}.png"


def generation_requests(config: GenerateConfig, prompts: list[str]) -> list[dict]:
    """One row per image; the seed is fixed by position, so a rerun makes the same images."""
    rows = []
    for p, prompt in enumerate(prompts):
        for g in range(config.num_generations):
            index = p * config.num_generations + g
            seed = config.seed + index
            rows.append({"index": index, "prompt": prompt, "seed": seed,
                         "name": image_name(index, prompt, seed, config.output_format)})  # fmt: skip
    return rows


def fill_requests(config: GenerateConfig) -> tuple[list[dict], list[str]]:
    """One row per filled composite (`num_generations` per input), and the inputs skipped, each
    with its reason. A composite's prompt is its same-named .txt, else the first of `prompts`."""
    from diffplat.data.composite_source import read_caption
    from diffplat.data.composites import CompositeError
    from diffplat.pictures import list_images

    inputs = Path(config.ic_lora.inputs)
    if not inputs.is_dir():
        raise FileNotFoundError(f"generate.ic_lora.inputs: {inputs} is not a folder")
    rows, skipped, named = [], [], {}
    for path in list_images(inputs):
        try:
            prompt = read_caption(path)
        except CompositeError as err:
            if not config.prompts:
                skipped.append(f"{path.name}: no prompt ({err}, and no generate.prompts)")
                continue
            prompt = config.prompts[0]
        add_input_rows(rows, config, path, path.stem, prompt, named, skipped)
    return rows, skipped


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Made:
    """What a replica made of one request: the image (None when its input was bad, with the
    reason), and the side-by-side comparison when one is asked for."""

    def __init__(self, image=None, comparison=None, error: str = ""):
        self.image, self.comparison, self.error = image, comparison, error


class Generator:
    """A pipeline replica (a Ray Data actor): loads once, then turns request rows into image
    files, written by the replica itself into `output` (storage every node sees), each whole
    (temporary name, then rename). The driver gets back a small record per image, never pixels.

    text_to_image: prompts -> images. ic_lora: composites -> composites with panels filled.
    controlnet: maps -> images.
    """

    def __init__(self, config: dict, output: str):
        import torch

        from diffplat.models.families import family_of
        from diffplat.models.loading import DTYPES, load_pipeline
        from diffplat.models.lora import adapter_info

        self.config = GenerateConfig.model_validate(config)
        self.output = Path(output)
        c = self.config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = DTYPES[c.dtype]
        self.family = family_of(c.base_model)
        self.max_token_length = self.family.sampling_prompt_length(c.max_token_length, adapter_info(c.lora) if c.lora else {})
        if c.kind == "controlnet":
            from diffplat.infer.controlnet import load_controlnet_pipeline

            self.pipe = load_controlnet_pipeline(c.base_model, c.controlnet.model, c.lora, c.vae, c.variant, dtype,
                                                 c.scheduler)  # fmt: skip
        elif c.kind == "ic_lora":
            from diffplat.infer.panels import FillOptions, load_fill_pipeline

            self.pipe = load_fill_pipeline(c.base_model, c.lora, c.vae, c.variant, dtype, c.scheduler)
            s = c.ic_lora
            self.fill_options = FillOptions(
                panels=tuple(s.panels_to_inpaint), layout=s.layout, negative_prompt=c.negative_prompt or None,
                panel_heights=tuple(s.panel_heights or ()), panel_widths=tuple(s.panel_widths or ()),
                num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale, strength=s.strength,
                use_gradient_mask=s.use_gradient_mask, gradient_width=s.gradient_width, adapter_scale=c.adapter_scale,
                max_token_length=self.max_token_length,
            )  # fmt: skip
        else:
            self.pipe = load_pipeline(c.base_model, c.vae, c.variant, dtype, scheduler=c.scheduler, lora=c.lora,
                                      loras=[(a.path, a.scale) for a in c.loras])  # fmt: skip
        self.pipe.to(self.device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import ray

        from diffplat.fileio import write_bytes_atomic

        start = time.perf_counter()
        run = {"text_to_image": self._text, "ic_lora": self._fill, "controlnet": self._from_maps}[self.config.kind]
        made = run(batch)
        count = len(made)
        widths, heights, sizes = np.zeros(count, np.int64), np.zeros(count, np.int64), np.zeros(count, np.int64)
        for i, (name, m) in enumerate(zip(batch["name"], made)):
            if m.image is None:
                continue
            png = _png(m.image)
            write_bytes_atomic(self.output / "images" / str(name), png)
            if m.comparison is not None:
                write_bytes_atomic(self.output / "comparisons" / str(name), _png(m.comparison))
            widths[i], heights[i], sizes[i] = m.image.width, m.image.height, len(png)
        out = {k: batch[k] for k in ("index", "prompt", "seed", "name")}
        if "input" in batch:
            out["input"] = batch["input"]
        out.update({"width": widths, "height": heights, "bytes": sizes,
                    "error": np.array([m.error for m in made], dtype=object),
                    "seconds": np.full(count, (time.perf_counter() - start) / count),
                    "node": np.full(count, ray.get_runtime_context().get_node_id())})  # fmt: skip
        return out

    def _text(self, batch: dict) -> list[Made]:
        import torch

        c = self.config
        width, height = c.resolution
        prompts = [str(p) for p in batch["prompt"]]
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in batch["seed"]]
        # several LoRAs carry their scales in set_adapters; one alone scales here
        scale = self.family.adapter_scale_kwargs(c.adapter_scale) if c.lora and not c.loras else {}
        images = self.pipe(
            **self.family.prompt_kwargs(self.pipe, prompts, [c.negative_prompt] * len(prompts), self.max_token_length),
            width=width,
            height=height,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            generator=generators,
            **scale,
        ).images
        return [Made(image) for image in images]

    def _fill(self, batch: dict) -> list[Made]:
        """One composite at a time: each has its own size, prompt and seed."""
        from PIL import Image

        from diffplat.data.composites import CompositeError
        from diffplat.infer.panels import fill_panels

        made = []
        for path, prompt, seed in zip(batch["input"], batch["prompt"], batch["seed"]):
            try:
                with Image.open(path) as img:
                    composite = img.convert("RGB")
                fill = fill_panels(self.pipe, composite, str(prompt), [int(seed)], self.fill_options, where=Path(path).name)[0]
            except (OSError, CompositeError) as err:  # one bad composite must not end a bulk run
                made.append(Made(error=f"{Path(path).name}: {err}"))
                continue
            made.append(Made(fill.image, fill.comparison if self.config.ic_lora.save_comparison else None))
        return made

    def _from_maps(self, batch: dict) -> list[Made]:
        """One map at a time (each is read and checked here, on the replica)."""
        import torch

        from diffplat.data.bdd import MaskError
        from diffplat.data.composites import side_by_side
        from diffplat.infer.controlnet import load_map

        c, n = self.config, self.config.controlnet
        made = []
        for path, prompt, seed in zip(batch["input"], batch["prompt"], batch["seed"]):
            try:
                cond = load_map(path, c.resolution, n.segmentation)
            except (OSError, MaskError) as err:  # one bad map must not end a bulk run
                made.append(Made(error=str(err) if isinstance(err, MaskError) else f"{Path(path).name}: {err}"))
                continue
            image = self.pipe(
                **self.family.prompt_kwargs(self.pipe, [str(prompt)], [c.negative_prompt], self.max_token_length),
                image=cond, controlnet_conditioning_scale=n.conditioning_scale, width=c.resolution[0],
                height=c.resolution[1], num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                generator=torch.Generator(self.device).manual_seed(int(seed)),
                **(self.family.adapter_scale_kwargs(c.adapter_scale) if c.lora else {}),
            ).images[0]  # fmt: skip
            made.append(Made(image, side_by_side([cond, image]) if n.save_comparison else None))
        return made


def requests_for(config: GenerateConfig) -> tuple[list[dict], list[str]]:
    """Every image the job asks for, one row each, and the inputs skipped with their reasons."""
    if config.kind == "ic_lora":
        requests, skipped = fill_requests(config)
        what = f"filling panels {config.ic_lora.panels_to_inpaint} of composites in {config.ic_lora.inputs}"
    elif config.kind == "controlnet":
        from diffplat.infer.controlnet import map_requests

        n = config.controlnet
        requests, skipped = map_requests(config, Path(n.maps), Path(n.captions) if n.captions else None,
                                         [Path(p) for p in n.bdd_labels])  # fmt: skip
        what = f"from maps in {n.maps}"
    else:
        prompts = read_prompts(config)
        requests, skipped = generation_requests(config, prompts), []
        what = f"from {len(prompts)} prompts"
    if config.max_images is not None:
        requests = requests[: config.max_images]
    if not requests:
        raise ValueError(f"generate: nothing to make ({what}); first problems: " + "; ".join(skipped[:5]))
    return requests, skipped


def run_generation(config: GenerateConfig, output: Path) -> dict:
    """Generate every image of `config` (paths already resolved) into the folder `output`,
    going on where an earlier run of the same generation stopped."""
    import ray.data

    from diffplat.cluster import record_bytes
    from diffplat.infer.output import GenerationFolder

    requests, skipped = requests_for(config)
    folder = GenerationFolder(output, config)
    todo = [r for r in requests if not folder.finished(r)]
    if len(todo) < len(requests):
        log.info("generate: %d of %d images are already in %s; making the other %d", len(requests) - len(todo),
                 len(requests), output, len(todo))  # fmt: skip
    start = time.perf_counter()
    written = made_bytes = 0
    adapters = [{"path": a.path, "scale": a.scale} for a in config.loras]
    pool = replica_pool(config.replicas)  # before the dataset exists: it keeps the Ray Data settings of its making
    rows = ray.data.from_items(todo).map_batches(
        Generator,
        fn_constructor_args=(config.model_dump(mode="json"), str(output)),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=pool,
        num_gpus=config.gpus_per_replica,
        num_cpus=config.cpus_per_replica,
    ).iter_rows() if todo else []
    nodes, ticker, received = Counter(), Ticker(), 0
    for row in rows:
        received += record_bytes(row)
        nodes[row["node"]] += 1
        if row["error"]:
            skipped.append(row["error"])
            log.warning("generate: skipped %s", row["error"])
            continue
        record = {
            "index": int(row["index"]),
            "prompt": row["prompt"],
            "negative_prompt": config.negative_prompt,
            "seed": int(row["seed"]),
            "base_model": config.base_model,
            "adapter": config.lora,
            "adapter_scale": config.adapter_scale,
            **({"adapters": adapters} if adapters else {}),
            "steps": config.num_inference_steps,
            "guidance_scale": config.guidance_scale,
            "scheduler": config.scheduler,
            "seconds": round(float(row["seconds"]), 4),
            "width": int(row["width"]),
            "height": int(row["height"]),
            "node": row["node"],  # the Ray node whose replica made and wrote the image
        }
        if config.kind == "ic_lora":
            s = config.ic_lora
            record.update({"input": row["input"], "layout": s.layout, "panels": s.panels_to_inpaint,
                           "strength": s.strength, "gradient_width": s.gradient_width if s.use_gradient_mask else 0})  # fmt: skip
        elif config.kind == "controlnet":
            record.update({"map": row["input"], "controlnet": config.controlnet.model,
                           "conditioning_scale": config.controlnet.conditioning_scale})  # fmt: skip
        folder.add(row["name"], record)
        written += 1
        made_bytes += int(row["bytes"])
        if ticker.due(last_one=written == len(todo)):
            log.info("generate: %d/%d images (%.1f images/s)", len(folder.done), len(requests),
                     written / (time.perf_counter() - start))  # fmt: skip
    folder.finish(skipped, {int(r["index"]) for r in requests})
    if not folder.done:
        raise ValueError(f"generate: no image was made; first problems: {'; '.join(skipped[:5])}")
    elapsed = time.perf_counter() - start
    log.info("generate: %d images in %s (%d replica%s%s)", len(folder.done), output / "images",
             config.replicas, "s"[: config.replicas > 1], f" on {len(nodes)} nodes" if len(nodes) > 1 else "")  # fmt: skip
    return {"images": len(folder.done), "made_now": written, "skipped": len(skipped), "nodes": len(nodes),
            "images_per_s": written / elapsed if elapsed and written else 0.0, "driver_bytes": received,
            "output_bytes": made_bytes}  # fmt: skip
