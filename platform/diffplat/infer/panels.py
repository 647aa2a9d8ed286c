"""In-Context LoRA panel filling: a composite in, the named panels painted anew, the rest kept.

The pipeline is the base model family's stock inpainting one (SDXL:
`StableDiffusionXLInpaintPipeline`; FLUX.1: `FluxFillPipeline` for a Fill model, else
`FluxInpaintPipeline`): with an inpainting denoiser (what `ic_lora` masked mode trains) it sees
the kept panels as masked-image latents; with a plain one (the published composite recipe) it
re-noises the kept panels at every step and pastes them in. Either way the panels not named are copied back from the input afterwards,
pixel for pixel, so a fill never alters them; a soft mask (`gradient_width`) blends the seams
inside the filled panels only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffplat.data.composites import CompositeError, Layout, gradient_mask, panel_mask, paste_fill, side_by_side
from diffplat.models.families import family_of, family_of_pipeline

SOURCE_1_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


@dataclass(frozen=True)
class FillOptions:
    """Source 1's inference options, with its defaults."""

    panels: tuple[int, ...] = (2, 3)
    layout: str = "2x2"
    panel_heights: tuple[float, ...] = ()  # rows' relative heights (diffplat; default: equal)
    panel_widths: tuple[float, ...] = ()
    negative_prompt: str | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    strength: float = 1.0
    use_gradient_mask: bool = False
    gradient_width: int = 20
    adapter_scale: float = 1.0
    max_token_length: int = 75  # caption tokens (FLUX: T5's); an adapter records what it was trained with


@dataclass
class Fill:
    image: Image.Image  # the composite with its named panels filled
    seed: int
    mask: Image.Image  # the mask as applied (soft where a gradient was asked for)
    comparison: Image.Image  # input | mask | output


def working_size(layout: Layout, width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """The nearest size at which every panel is a whole number of `multiple` px (a latent cell,
    or FLUX's packed 2x2 cells)."""
    step_w, step_h = multiple * layout.cols, multiple * layout.rows
    return max(step_w, round(width / step_w) * step_w), max(step_h, round(height / step_h) * step_h)


def fill_panels(pipe, composite: Image.Image, prompt: str, seeds: list[int], options: FillOptions,
                where: str = "input image") -> list[Fill]:  # fmt: skip
    """Fill `options.panels` of `composite`, one output per seed."""
    import torch

    layout = Layout.parse(options.layout).sized(options.panel_heights, options.panel_widths, where)
    composite = composite.convert("RGB")
    layout.check_size(composite.width, composite.height, where)
    panels = layout.check_panels(options.panels, where)
    if len(panels) == layout.panels:
        raise CompositeError(f"{where}: every panel of layout {layout} is named; nothing is left to condition on")
    family = family_of_pipeline(pipe)
    width, height = working_size(layout, composite.width, composite.height, family.pixel_multiple)
    work = composite.resize((width, height), Image.BICUBIC) if (width, height) != composite.size else composite
    hard = Image.fromarray((panel_mask(layout, panels, width, height) * 255).astype(np.uint8), "L")
    device = pipe._execution_device
    images = pipe(
        **family.prompt_kwargs(pipe, [prompt], [options.negative_prompt or ""], options.max_token_length),
        image=work,
        mask_image=hard,
        width=width,
        height=height,
        strength=options.strength,
        num_inference_steps=options.num_inference_steps,
        guidance_scale=options.guidance_scale,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator(device).manual_seed(int(s)) for s in seeds],
        **family.adapter_scale_kwargs(options.adapter_scale),
    ).images
    w, h = composite.size
    soft = (gradient_mask(layout, panels, w, h, options.gradient_width) if options.use_gradient_mask
            else panel_mask(layout, panels, w, h))  # fmt: skip
    mask_image = Image.fromarray((soft * 255).round().astype(np.uint8), "L")
    fills = []
    for image, seed in zip(images, seeds):
        out = paste_fill(composite, image, soft)
        fills.append(Fill(out, int(seed), mask_image, side_by_side([composite, mask_image, out])))
    return fills


def _sizes(options: FillOptions) -> dict:
    """The panel sizes a record notes, when they are not equal."""
    return {k: list(v) for k, v in (("panel_heights", options.panel_heights), ("panel_widths", options.panel_widths)) if v}


def load_fill_pipeline(base_model: str, lora: str | None = None, vae: str | None = None, variant: str | None = None,
                       dtype=None, scheduler: str = "default"):  # fmt: skip
    """The family's inpainting pipeline (SDXL: StableDiffusionXLInpaintPipeline) from any folder
    or hub id of it (plain or inpainting denoiser)."""
    import torch

    from diffplat.models.loading import load_pipeline

    return load_pipeline(base_model, vae, variant, dtype or torch.float32, "inpaint", scheduler, lora)


def fill_command(args) -> list[str]:
    """`diffplat ic-lora-infer`: source 1's inference script, flag for flag. Returns the files written.
    `--lora_path` may also name an adapter in MLflow (runs:/..., models:/<name>/<version>,
    models:/<name>@<alias>, from $MLFLOW_TRACKING_URI's store), fetched for this run."""
    import os
    import tempfile
    from pathlib import Path

    from diffplat.tracking import fetch_adapter, is_mlflow_ref

    if not is_mlflow_ref(args.lora_path):
        return _fill_command(args)
    with tempfile.TemporaryDirectory(prefix="diffplat-adapter-") as fetched:
        args.lora_path = str(fetch_adapter(args.lora_path, Path(fetched), os.environ.get("MLFLOW_TRACKING_URI")))
        return _fill_command(args)


def _fill_command(args) -> list[str]:
    import json
    import random
    import time
    from pathlib import Path

    from diffplat.fileio import write_bytes_atomic
    from diffplat.models.lora import adapter_info, lora_location

    lora_location(args.lora_path)  # a pickle or a folder without weights fails here, before loading
    input_path = Path(args.input_image)
    try:
        with Image.open(input_path) as img:
            composite = img.convert("RGB")
    except (OSError, ValueError) as err:
        raise CompositeError(f"--input_image {input_path}: cannot read the image ({err})") from None
    info = adapter_info(args.lora_path)
    base = args.base_model or info.get("base_model") or SOURCE_1_BASE
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    seeds = [seed + i for i in range(args.num_images)]
    options = FillOptions(
        panels=tuple(args.panels_to_inpaint), layout=args.layout, negative_prompt=args.negative_prompt,
        panel_heights=tuple(args.panel_heights or ()), panel_widths=tuple(args.panel_widths or ()),
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, strength=args.strength,
        use_gradient_mask=args.use_gradient_mask, gradient_width=args.gradient_width,
        max_token_length=family_of(base).sampling_prompt_length(args.max_token_length, info),
    )  # fmt: skip
    # Bad panels or sizes are named before the (slow) model load.
    layout = Layout.parse(options.layout).sized(options.panel_heights, options.panel_widths, "--panel_heights/--panel_widths")
    layout.check_size(composite.width, composite.height, str(input_path))
    layout.check_panels(options.panels, f"--panels_to_inpaint {' '.join(map(str, options.panels))}")
    pipe = load_fill_pipeline(base, args.lora_path)
    start = time.perf_counter()
    fills = fill_panels(pipe, composite, args.prompt, seeds, options, where=str(input_path))
    seconds = (time.perf_counter() - start) / len(fills)
    out = Path(args.output_dir)
    written = []

    def save(image: Image.Image, name: str) -> None:
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        write_bytes_atomic(out / name, buf.getvalue())
        written.append(str(out / name))

    stem = input_path.stem
    save(fills[0].mask, f"{stem}_mask.png")
    lines = []
    for i, fill in enumerate(fills):
        save(fill.image, f"{stem}_output_{i}.png")
        if args.save_comparison:
            save(fill.comparison, f"{stem}_comparison_{i}.png")
        lines.append(json.dumps({"file_name": f"{stem}_output_{i}.png", "input": str(input_path), "prompt": args.prompt,
                                 "negative_prompt": args.negative_prompt, "seed": fill.seed, "panels": list(options.panels),
                                 "layout": options.layout, **_sizes(options), "base_model": base, "adapter": args.lora_path,
                                 "strength": options.strength, "steps": options.num_inference_steps,
                                 "guidance_scale": options.guidance_scale, "gradient_width":
                                 options.gradient_width if options.use_gradient_mask else 0,
                                 "seconds": round(seconds, 4)}) + "\n")  # fmt: skip
    with open(out / "metadata.jsonl", "a") as meta:
        meta.writelines(lines)
    return written
