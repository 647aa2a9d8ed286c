"""What the demo's adapters learnt, measured against the base each was trained on: the same
prompts, seeds and inputs through both, the pictures kept, a number computed from them
(evaluate/quality.py), written to quality.json and logged to MLflow.

- LoRA (trained on night scenes only): prompts that name no time of day; the sky of its images
  against the base's, as distances to the night training images' mean sky colour.
- ControlNet: held-out segmentation maps and their captions; how much of each image's colour
  variance the map's regions explain, with the ControlNet and without (the base alone).
- In-Context LoRA: composites of four frames of one time of day, panels 2 and 3 filled; the
  distance of the filled panels' sky colour to the visible panels', with the LoRA and without.
- evaluate: the detectors' mAP50-95, trained on real images only and with the kept generations.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from diffplat.evaluate.quality import colour_distance, map_agreement, panel_agreement, sky_colour

SEEDS = (0, 1, 2, 3)
STEPS = 20
LORA_PROMPTS = ("a driving scene on a city street, with 2 cars", "a driving scene on a highway, with 1 truck")


def _rows(folder: Path, columns: list[str], count: int, where=None) -> list[dict]:
    from diffplat.data.shards import iter_rows

    rows = (r for r in iter_rows(folder, columns=columns) if where is None or where(r))
    return [r for _, r in zip(range(count), rows)]


def _image(data: bytes, size: tuple[int, int] | None = None) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        image = img.convert("RGB")
    return image.resize(size, Image.NEAREST) if size else image


def _sheet(rows: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """One row of pictures per label, side by side."""
    from PIL import ImageDraw

    width, height = rows[0][0].size
    label_width = 8 * max(len(label) for label in labels)
    sheet = Image.new("RGB", (label_width + width * max(map(len, rows)), height * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (images, label) in enumerate(zip(rows, labels)):
        draw.text((4, r * height + height // 2 - 5), label, fill="black")  # PIL's built-in bitmap font
        for c, image in enumerate(images):
            sheet.paste(image, (label_width + c * width, r * height))
    return sheet


def _generate(pipe, prompts, size, **kwargs) -> list[Image.Image]:
    import torch

    width, height = size
    return [pipe(prompt, width=width, height=height, num_inference_steps=STEPS, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
            for prompt in prompts for seed in SEEDS]  # fmt: skip


def lora_quality(base: str, lora: str, training: Path, size: tuple[int, int], pictures: Path) -> dict:
    from diffplat.models.loading import load_pipeline

    target = np.mean([sky_colour(_image(r["image"])) for r in _rows(training, ["image"], 64)], axis=0)
    pipe = load_pipeline(base)
    before = _generate(pipe, LORA_PROMPTS, size)
    pipe = load_pipeline(base, lora=lora)
    after = _generate(pipe, LORA_PROMPTS, size)
    _sheet([before, after], ["base", "+ LoRA"]).save(pictures / "lora.png")
    distance = lambda images: float(np.mean([colour_distance(sky_colour(i), target) for i in images]))  # noqa: E731
    return {"measure": "sky colour distance to the training images' (RGB, lower is closer)",
            "training_sky_rgb": [round(float(v), 1) for v in target], "base": distance(before),
            "adapter": distance(after), "images": len(after), "picture": "quality/lora.png"}  # fmt: skip


def controlnet_quality(base: str, controlnet: str, maps: list[tuple[Image.Image, str]], size, pictures: Path) -> dict:
    import torch
    from diffusers import ControlNetModel

    from diffplat.models.loading import load_pipeline

    width, height = size
    plain = load_pipeline(base)
    guided = load_pipeline(base, task="controlnet", controlnet=ControlNetModel.from_pretrained(controlnet))
    maps = [(m.resize(size, Image.NEAREST), caption) for m, caption in maps]
    before, after = [], []
    for i, (colour_map, caption) in enumerate(maps):
        seed = {"width": width, "height": height, "num_inference_steps": STEPS, "guidance_scale": 5.0}
        before.append(plain(caption, generator=torch.Generator().manual_seed(i), **seed).images[0])
        after.append(guided(caption, image=colour_map, generator=torch.Generator().manual_seed(i), **seed).images[0])
    _sheet([[m for m, _ in maps], before, after], ["map", "base", "+ ControlNet"]).save(pictures / "controlnet.png")
    share = lambda images: float(np.mean([map_agreement(i, m) for i, (m, _) in zip(images, maps)]))  # noqa: E731
    return {"measure": "share of each image's colour variance its map's regions explain (higher follows the map)",
            "base": share(before), "adapter": share(after), "images": len(after),
            "picture": "quality/controlnet.png"}  # fmt: skip


def ic_lora_quality(base_inpaint: str, lora: str, composites: list[tuple[Image.Image, str]], layout: str,
                    pictures: Path) -> dict:  # fmt: skip
    from diffplat.infer.panels import FillOptions, fill_panels
    from diffplat.models.loading import load_pipeline

    options = FillOptions(panels=(2, 3), layout=layout, num_inference_steps=STEPS, guidance_scale=5.0,
                          max_token_length=225)  # fmt: skip
    fills = {}
    for name, pipe in (("base", load_pipeline(base_inpaint, task="inpaint")),
                       ("adapter", load_pipeline(base_inpaint, task="inpaint", lora=lora))):  # fmt: skip
        fills[name] = [fill_panels(pipe, composite, caption, [i], options)[0].image
                       for i, (composite, caption) in enumerate(composites)]  # fmt: skip
    _sheet([[c for c, _ in composites], fills["base"], fills["adapter"]],
           ["input", "base", "+ IC-LoRA"]).save(pictures / "ic_lora.png")  # fmt: skip
    gap = lambda images: float(np.mean([panel_agreement(i, layout, [2, 3]) for i in images]))  # noqa: E731
    return {"measure": "sky colour distance of the filled panels to the visible ones (RGB, lower agrees)",
            "base": gap(fills["base"]), "adapter": gap(fills["adapter"]), "images": len(composites),
            "picture": "quality/ic_lora.png"}  # fmt: skip


def write_quality(out: Path, measures: dict) -> Path:
    from diffplat.fileio import write_json_atomic

    path = out / "quality.json"
    write_json_atomic(path, measures)
    return path


def summary_lines(measures: dict) -> list[str]:
    lines = []
    for leg, m in measures.items():
        if "base" in m:
            lines.append(f"    {leg:<11} base {m['base']:.3f} -> trained {m['adapter']:.3f}  ({m['measure']})")
    return lines

