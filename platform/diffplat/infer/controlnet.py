"""ControlNet generation from segmentation maps: one image per map, named after it.

Prompts come from a captions folder (`<image stem>.txt`), from BDD labels (the frame the map
belongs to), or the job's first prompt. Maps are grey train-id masks or colour maps; both become
the palette map the ControlNet was trained on. Bulk jobs and (later) HTTP share these functions.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from diffplat.config import GenerateConfig
from diffplat.infer.output import add_input_rows


def map_requests(config: GenerateConfig, maps: Path, captions: Path | None, bdd_labels: list[Path]) -> tuple[list[dict], list[str]]:
    """One row per image to make (`num_generations` per map), and the maps skipped with why."""
    from diffplat.data import bdd
    from diffplat.data.composite_source import read_caption
    from diffplat.data.composites import CompositeError
    from diffplat.data.pairs_source import map_stem
    from diffplat.pictures import list_images

    if not maps.is_dir():
        raise FileNotFoundError(f"generate.controlnet.maps: {maps} is not a folder")
    frames = bdd.frames_by_stem(bdd_labels)
    rows, skipped, named = [], [], {}
    for path in list_images(maps):
        stem = map_stem(path)
        prompt = None
        if captions is not None:
            try:
                prompt = read_caption(captions / f"{stem}.txt")
            except CompositeError:
                pass
        if prompt is None and stem in frames:
            prompt = bdd.caption_from_labels(frames[stem])
        if prompt is None and config.prompts:
            prompt = config.prompts[0]
        if prompt is None:
            skipped.append(f"{path.name}: no prompt (no caption, no label record, no generate.prompts)")
            continue
        add_input_rows(rows, config, path, stem, prompt, named, skipped)
    return rows, skipped


def load_map(path: str | Path, size: tuple[int, int], segmentation: bool = True) -> Image.Image:
    """The conditioning image for a map file, at `size` (width, height). Nearest-neighbour keeps
    a segmentation map's palette colours exact. bdd.MaskError names a bad mask."""
    from diffplat.data import bdd

    if segmentation:
        image = Image.fromarray(bdd.colorize_mask(bdd.read_mask(Path(path))))
    else:
        with Image.open(path) as img:
            image = img.convert("RGB")
    return image.resize(size, Image.NEAREST) if image.size != tuple(size) else image


def load_controlnet_pipeline(base_model: str, controlnet: str, lora: str | None = None, vae: str | None = None,
                             variant: str | None = None, dtype=None, scheduler: str = "default"):  # fmt: skip
    """The family's ControlNet pipeline (SDXL: StableDiffusionXLControlNetPipeline) with a saved
    ControlNet (and optionally a LoRA)."""
    import torch

    from diffplat.models.families import family_of
    from diffplat.models.loading import load_pipeline

    dtype = dtype or torch.float32
    net = family_of(base_model).new_controlnet(None, controlnet, dtype)
    return load_pipeline(base_model, vae, variant, dtype, "controlnet", scheduler, lora, controlnet=net)
