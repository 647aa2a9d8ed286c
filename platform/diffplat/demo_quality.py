"""What the demo's adapters learnt, measured against the base each was trained on: the same
prompts, seeds and inputs through both, the pictures kept side by side, a number computed from
them (evaluate/quality.py), written to quality.json and logged to MLflow.

- pretraining: the base before (random UNet) and after its full fine-tune; how much of each
  image's colour variance its rows explain (a scene is layered: sky, buildings, road), and how
  far apart a daytime and a night prompt put the sky's colour (does it draw what it is told?).
- LoRA (trained on night scenes only): prompts that name no time of day; the sky of its images
  against the base's, as distances to the night training images' mean sky colour.
- ControlNet: held-out segmentation maps (bdd-val) and their captions; how much of each image's
  colour variance the map's regions explain, with the ControlNet and without (the base alone).
- In-Context LoRA: held-out composites of two frames of one time of day, the right one filled
  with an empty prompt, so that only the visible frame says the time of day; the distance of the
  filled frame's sky colour to the visible frame's, with the LoRA and without.
- evaluate: the detectors' mAP50-95, trained on real images only and with the kept generations.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffplat.evaluate.quality import colour_distance, map_agreement, panel_agreement, row_structure, sky_colour

SEEDS = (0, 1, 2, 3)
STEPS = 20
GUIDANCE = 5.0
SIZE = (128, 64)  # the demo's training resolution (width height)
PRETRAIN_PROMPTS = ("a driving scene on a city street, in daytime, with 2 cars", "a driving scene on a highway, at night")
LORA_PROMPTS = ("a driving scene on a city street, with 2 cars", "a driving scene on a highway, with 1 truck")
IC_LAYOUT, IC_PANELS = "1x2", (1,)  # the demo's In-Context LoRA leg's layout, and what it fills


def _draw(pipe, calls: list[tuple[int, dict]], **shared) -> list[Image.Image]:
    """One image per (seed, pipeline arguments), at the demo's size and step count: one batched
    call, each image from its own seeded generator (the same images as one call each); `shared`:
    arguments of the whole call."""
    import torch

    width, height = SIZE
    keys = calls[0][1].keys()
    batch = {key: [call[key] for _, call in calls] for key in keys}
    return pipe(**batch, **shared, width=width, height=height, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=[torch.Generator().manual_seed(seed) for seed, _ in calls]).images


def _mean(values) -> float:
    return round(float(np.mean(list(values))), 4)


def pretrain_quality(random_base: Path, base: Path, real: list[Image.Image], pictures: Path) -> tuple[dict, dict]:
    """Two measures of the same images: how layered they are, and how far apart the skies of
    the daytime and the night prompt come out (a base that ignores its prompt draws the same)."""
    from diffplat.models.loading import load_pipeline
    from diffplat.pictures import labelled_rows

    calls = [(seed, {"prompt": prompt}) for prompt in PRETRAIN_PROMPTS for seed in SEEDS]
    before = _draw(load_pipeline(str(random_base)), calls)
    after = _draw(load_pipeline(str(base)), calls)
    real = real[: len(calls)]
    labelled_rows([before, after, real], ["random UNet", "pretrained", "real"], thumb_width=192).save(
        pictures / "pretrain.png")
    layered = lambda images: _mean(row_structure(i) for i in images)  # noqa: E731

    def apart(images: list[Image.Image]) -> float:  # the two prompts' mean sky colours
        day, night = (np.mean([sky_colour(i) for i in images[k * len(SEEDS):(k + 1) * len(SEEDS)]], axis=0)
                      for k in (0, 1))  # fmt: skip
        return round(colour_distance(day, night), 4)

    scenes = {"measure": "share of each image's colour variance its rows explain (a scene is layered; noise is not)",
              "base": layered(before), "adapter": layered(after), "better": "higher", "images": len(after),
              "real_images": layered(real), "prompts": list(PRETRAIN_PROMPTS), "picture": "quality/pretrain.png"}  # fmt: skip
    prompts = {"measure": "distance between the daytime and the night prompt's mean sky colour (RGB 0-255, same seeds)",
               "base": apart(before), "adapter": apart(after), "better": "higher", "images": len(after),
               "prompts": list(PRETRAIN_PROMPTS), "picture": "quality/pretrain.png"}  # fmt: skip
    return scenes, prompts


def lora_quality(base: Path, lora: Path, training_shards: Path, pictures: Path) -> dict:
    from diffplat.data.images import decode_image
    from diffplat.data.shards import iter_rows
    from diffplat.models.loading import load_pipeline
    from diffplat.pictures import labelled_rows

    target = np.mean([sky_colour(decode_image(r["image"])[1])
                      for r in iter_rows(training_shards, columns=["image"])], axis=0)  # fmt: skip
    calls = [(seed, {"prompt": prompt}) for prompt in LORA_PROMPTS for seed in SEEDS]
    before = _draw(load_pipeline(str(base)), calls)
    after = _draw(load_pipeline(str(base), lora=str(lora)), calls)
    labelled_rows([before, after], ["base", "+ LoRA"], thumb_width=192).save(pictures / "lora.png")
    distance = lambda images: _mean(colour_distance(sky_colour(i), target) for i in images)  # noqa: E731
    return {"measure": "sky colour distance to the night training images' (RGB 0-255, lower is closer)",
            "base": distance(before), "adapter": distance(after), "better": "lower", "images": len(after),
            "training_sky_rgb": [round(float(v), 1) for v in target], "prompts": list(LORA_PROMPTS),
            "picture": "quality/lora.png"}  # fmt: skip


def controlnet_quality(base: Path, controlnet: Path, maps: list[tuple[Image.Image, str, Image.Image]],
                       pictures: Path, scale: float = 1.0) -> dict:  # fmt: skip
    from diffplat.infer.controlnet import load_controlnet_pipeline
    from diffplat.models.loading import load_pipeline
    from diffplat.pictures import labelled_rows

    before = _draw(load_pipeline(str(base)), [(i, {"prompt": c}) for i, (_, c, _) in enumerate(maps)])
    guided = load_controlnet_pipeline(str(base), str(controlnet))
    after = _draw(guided, [(i, {"prompt": c, "image": m}) for i, (m, c, _) in enumerate(maps)],
                  controlnet_conditioning_scale=scale)  # fmt: skip
    real = [r for _, _, r in maps]
    sheet = labelled_rows([[m for m, _, _ in maps], before, after, real], ["map", "base", "+ ControlNet", "real"],
                          thumb_width=192)  # fmt: skip
    sheet.save(pictures / "controlnet.png")
    share = lambda images: _mean(map_agreement(i, m) for i, (m, _, _) in zip(images, maps))  # noqa: E731
    return {"measure": "share of each image's colour variance its map's regions explain (higher follows the map)",
            "base": share(before), "adapter": share(after), "better": "higher", "images": len(after),
            "real_images": share(real), "conditioning_scale": scale, "picture": "quality/controlnet.png"}  # fmt: skip


def ic_lora_quality(base_inpaint: Path, lora: Path, composites: list[tuple[Image.Image, str]], pictures: Path) -> dict:
    from diffplat.infer.panels import FillOptions, fill_panels
    from diffplat.models.loading import load_pipeline
    from diffplat.pictures import labelled_rows

    options = FillOptions(panels=IC_PANELS, layout=IC_LAYOUT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          max_token_length=225)  # fmt: skip
    fills = {}
    for name, adapter in (("base", None), ("adapter", lora)):
        pipe = load_pipeline(str(base_inpaint), task="inpaint", lora=str(adapter) if adapter else None)
        # no caption: a fill can only take the time of day from the visible panel
        fills[name] = [fill_panels(pipe, composite, "", [i], options)[0].image
                       for i, (composite, _) in enumerate(composites)]  # fmt: skip
    sheet = labelled_rows([[c for c, _ in composites], fills["base"], fills["adapter"]], ["input", "base", "+ IC-LoRA"],
                          thumb_width=192)  # fmt: skip
    sheet.save(pictures / "ic_lora.png")
    gap = lambda images: _mean(panel_agreement(i, IC_LAYOUT, list(IC_PANELS)) for i in images)  # noqa: E731
    return {"measure": "sky colour distance of the filled panels to the visible ones, filled without a prompt "
                       "(RGB 0-255, lower agrees)",
            "base": gap(fills["base"]), "adapter": gap(fills["adapter"]), "better": "lower",
            "images": len(composites), "size": list(composites[0][0].size), "inputs": gap(c for c, _ in composites),
            "picture": "quality/ic_lora.png"}  # fmt: skip


def detector_quality(report: Path) -> dict:
    """The evaluate stage's own figures: real-only against real + kept generations."""
    variants = {v["name"]: v for v in json.loads(report.read_text())["variants"]}
    real, mixed = variants["real"], next(v for name, v in variants.items() if name != "real")
    return {"measure": f"detector mAP50-95 on held-out frames, real only and {mixed['name']} (higher is better)",
            "base": real["map50_95"], "adapter": mixed["map50_95"], "better": "higher", "mix": mixed["name"],
            "map50": {"real": real["map50"], mixed["name"]: mixed["map50"]}}  # fmt: skip


def _frames(bdd_dir: Path) -> dict:
    """A synthetic BDD folder's labelled frames by image stem."""
    from diffplat.data import bdd

    return bdd.frames_by_stem(sorted((bdd_dir / "labels").glob("*.json")))


def held_out_maps(bdd_dir: Path, count: int = 6) -> list[tuple[Image.Image, str, Image.Image]]:
    """Palette maps of frames the ControlNet never saw, each with its frame's caption and the
    frame itself (what a perfect model would draw), at the demo's size."""
    from diffplat.data import bdd
    from diffplat.data.pairs_source import map_stem
    from diffplat.infer.controlnet import load_map
    from diffplat.pictures import list_images

    frames = _frames(bdd_dir)
    maps = []
    for path in list_images(bdd_dir / "masks"):
        image = bdd_dir / "images" / f"{map_stem(path)}.jpg"
        if map_stem(path) in frames and image.is_file() and len(maps) < count:
            with Image.open(image) as frame:
                real = frame.convert("RGB").resize(SIZE, Image.BICUBIC)
            maps.append((load_map(path, SIZE), bdd.caption_from_labels(frames[map_stem(path)]), real))
    return maps


def held_out_composites(bdd_dir: Path, size: tuple[int, int], count: int = 6) -> list[tuple[Image.Image, str]]:
    """IC_LAYOUT composites of `size` (width height: the size the leg trained at) of held-out
    frames sharing a time of day, captioned as the demo's In-Context LoRA leg captions its own."""
    from diffplat.data import bdd
    from diffplat.data.composites import Layout, combine_captions, make_composite

    by_time: dict[str, list] = {}
    for stem, frame in _frames(bdd_dir).items():
        path = bdd_dir / "images" / f"{stem}.jpg"
        if path.is_file():
            by_time.setdefault(frame.timeofday, []).append((path, bdd.caption_from_labels(frame)))
    layout = Layout.parse(IC_LAYOUT)
    panel, n = (size[0] // layout.cols, size[1] // layout.rows), layout.panels
    per_time = []
    for members in by_time.values():
        composites = []
        for start in range(0, len(members) - n + 1, n):
            group, images = members[start:start + n], []
            for path, _ in group:
                with Image.open(path) as frame:
                    images.append(frame.convert("RGB"))
            composites.append((make_composite(images, layout, panel), combine_captions([c for _, c in group], "[BDD]")))
        per_time.append(composites)
    # alternate times of day, so a short list still holds each
    turns = [c for turn in itertools.zip_longest(*per_time) for c in turn if c is not None]
    return turns[:count]


def measure_demo(out: Path, controlnet_scale: float = 1.0) -> dict:
    """Every measure of a finished demo in `out`; the pictures go to out/quality/. The ControlNet
    is measured at `controlnet_scale`, the conditioning scale its leg generated with."""
    from diffplat.models.lora import adapter_info

    pictures = out / "quality"
    pictures.mkdir(exist_ok=True)
    maps = held_out_maps(out / "bdd-val", count=8)  # read once: their frames are the real reference too
    ic_size = tuple(adapter_info(out / "adapters" / "ic_lora")["resolution"])  # fill at the size it learnt
    scenes, prompts = pretrain_quality(out / "base-model-random", out / "base-model", [r for _, _, r in maps], pictures)
    return {
        "pretrain": scenes,
        "prompts": prompts,
        "lora": lora_quality(out / "base-model", out / "adapters" / "lora", out / "data-night" / "shards", pictures),
        "controlnet": controlnet_quality(out / "base-model", out / "adapters" / "controlnet", maps[:6], pictures,
                                         controlnet_scale),  # fmt: skip
        "ic_lora": ic_lora_quality(out / "base-model-inpaint", out / "adapters" / "ic_lora",
                                   held_out_composites(out / "bdd-val", ic_size, count=9), pictures),  # fmt: skip
        "evaluate": detector_quality(out / "evaluation" / "report.json"),
    }


def write_quality(out: Path, measures: dict) -> Path:
    from diffplat.fileio import write_json_atomic

    path = out / "quality.json"
    write_json_atomic(path, measures)
    return path


def log_quality(out: Path, measures: dict, tracking_uri: str, experiment_id: str) -> str:
    """One MLflow run, `demo-quality`: each measure as metrics <leg>/base and <leg>/adapter, the
    comparison sheets and quality.json as artifacts. Returns its run id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(experiment_id, run_name="demo-quality", tags={"diffplat.job": "demo-quality"})
    for leg, m in measures.items():
        client.log_metric(run.info.run_id, f"{leg}/base", m["base"])
        client.log_metric(run.info.run_id, f"{leg}/adapter", m["adapter"])
    for picture in sorted((out / "quality").glob("*.png")):
        client.log_artifact(run.info.run_id, str(picture), "quality")
    client.log_artifact(run.info.run_id, str(out / "quality.json"))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def summary_lines(measures: dict) -> list[str]:
    names = {"pretrain": "pretrained", "prompts": "day/night", "lora": "LoRA", "controlnet": "ControlNet", "ic_lora": "IC-LoRA", "evaluate": "detector"}
    lines = []
    for leg, m in measures.items():
        if leg == "evaluate":  # the summary's evaluation line gives these
            continue
        after = "trained"
        lines.append(f"    {names[leg]:<10} base {m['base']:7.3f} -> {after} {m['adapter']:7.3f}  "
                     f"({m['better']} is better: {m['measure'].split(' (')[0]})")  # fmt: skip
    return lines
