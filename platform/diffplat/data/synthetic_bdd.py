"""A small synthetic BDD100K-like dataset, drawn in code: images, label JSON, semantic masks.

Laid out like the real release (images/, labels/*.json, masks/*_train_id.png), with the real
data's quirks: one label file in the 2018 naming and one in det_20 naming, images whose only
annotation is a mask, and one corrupt image, so that the demo exercises the same paths a
real BDD download takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffplat.data.bdd import SEG_CLASSES, SEG_PALETTE

_WEATHER = ("clear", "overcast", "rainy", "snowy", "partly cloudy")
_SCENES = ("city street", "highway", "residential")
_TIMES = ("daytime", "night", "dawn/dusk")
_SKY = {"daytime": (135, 180, 235), "night": (20, 24, 48), "dawn/dusk": (230, 150, 110)}
# the light of each time of day on the ground and the buildings (per-channel gain, then offset), as
# real photographs: night darkens and blues the whole frame, dusk warms it; not only the sky says when
_LIGHT = {"daytime": ((1.0, 1.0, 1.0), (0, 0, 0)), "night": ((0.4, 0.42, 0.55), (0, 0, 6)),
          "dawn/dusk": ((1.05, 0.85, 0.75), (25, 8, 0))}
# class drawn -> (2018 name, det_20 name, seg train id, colour)
_OBJECTS = {
    "car": ("car", "car", SEG_CLASSES.index("car"), (30, 60, 200)),
    "truck": ("truck", "truck", SEG_CLASSES.index("truck"), (200, 200, 210)),
    "pedestrian": ("person", "pedestrian", SEG_CLASSES.index("person"), (220, 40, 60)),
    "bicycle": ("bike", "bicycle", SEG_CLASSES.index("bicycle"), (120, 20, 40)),
    "traffic light": ("traffic light", "traffic light", SEG_CLASSES.index("traffic light"), (250, 170, 30)),
}


def _draw_scene(rng: np.random.Generator, width: int, height: int, timeofday: str):
    image = Image.new("RGB", (width, height), _SKY[timeofday])
    mask = np.full((height, width), SEG_CLASSES.index("sky"), dtype=np.uint8)
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.4, 0.55))
    # buildings on the horizon, then the road below it
    x = 0
    while x < width:
        w, h = int(rng.integers(width // 10, width // 5)), int(rng.integers(height // 8, height // 3))
        shade = int(rng.integers(60, 120))
        draw.rectangle([x, horizon - h, x + w, horizon], fill=(shade, shade, shade + 10))
        mask[max(horizon - h, 0) : horizon, x : x + w] = SEG_CLASSES.index("building")
        x += w
    draw.rectangle([0, horizon, width, height], fill=(90, 90, 95))
    mask[horizon:, :] = SEG_CLASSES.index("road")
    draw.line([width // 2, height, width // 2, horizon], fill=(240, 240, 240), width=2)
    gain, offset = _LIGHT[timeofday]
    pixels = np.asarray(image, dtype=np.float64)
    lit = np.clip(pixels * gain + offset, 0, 255)
    ground = (mask != SEG_CLASSES.index("sky"))[..., None]
    image = Image.fromarray(np.where(ground, lit, pixels).astype(np.uint8))
    return image, mask, ImageDraw.Draw(image), horizon


def _place_objects(rng, draw, mask, width, height, horizon):
    objects = []
    for _ in range(int(rng.integers(1, 6))):
        cls = str(rng.choice(list(_OBJECTS)))
        _, _, train_id, colour = _OBJECTS[cls]
        if cls == "traffic light":
            w, h = width // 40 + 2, height // 10
            x1, y1 = int(rng.integers(0, width - w)), int(rng.integers(2, max(horizon - h, 3)))
        else:
            scale = {"car": 0.14, "truck": 0.2, "pedestrian": 0.05, "bicycle": 0.08}[cls]
            w = max(int(width * scale), 4)
            h = max(int(w * (2.4 if cls == "pedestrian" else 0.7)), 4)
            x1 = int(rng.integers(0, width - w))
            y1 = int(np.clip(horizon + rng.integers(-h // 2, height - horizon - h // 2) - h // 2, 0, height - h))
        x2, y2 = x1 + w, y1 + h
        draw.rectangle([x1, y1, x2, y2], fill=colour)
        mask[y1:y2, x1:x2] = train_id
        objects.append((cls, x1, y1, x2, y2))
    return objects


def write_synthetic_bdd(out: str | Path, num_images: int = 24, size: tuple[int, int] = (256, 144), seed: int = 0) -> dict:
    """Write the dataset under `out`; returns the paths a `prepare` job needs."""
    out = Path(out)
    images_dir, labels_dir, masks_dir = out / "images", out / "labels", out / "masks"
    for d in (images_dir, labels_dir, masks_dir):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    records_2018, records_det20 = [], []
    for i in range(num_images):
        name = f"synth-{i:05d}.jpg"
        timeofday = str(rng.choice(_TIMES))
        image, mask, draw, horizon = _draw_scene(rng, width, height, timeofday)
        objects = _place_objects(rng, draw, mask, width, height, horizon)
        image.save(images_dir / name, quality=92)
        # Like the 10K set: about half the images have masks, and some have only a mask.
        only_mask = i % 6 == 5
        if i % 2 == 1 or only_mask:
            Image.fromarray(mask).save(masks_dir / f"{Path(name).stem}_train_id.png")
        if only_mask:
            continue
        use_det20 = i % 3 == 2
        record = {
            "name": name,
            "attributes": {
                "weather": str(rng.choice(_WEATHER)),
                "scene": str(rng.choice(_SCENES)),
                "timeofday": timeofday,
            },
            "labels": [
                {
                    "id": str(k),
                    "category": _OBJECTS[cls][1 if use_det20 else 0],
                    "attributes": {"occluded": False, "truncated": False},
                    "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
                }
                for k, (cls, x1, y1, x2, y2) in enumerate(objects)
            ],
        }
        (records_det20 if use_det20 else records_2018).append(record)
    # one corrupt file, as real downloads sometimes have
    (images_dir / "synth-corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    labels_2018 = labels_dir / "bdd100k_labels_images_train.json"
    labels_det20 = labels_dir / "det_train.json"
    labels_2018.write_text(json.dumps(records_2018))
    labels_det20.write_text(json.dumps(records_det20))
    return {"images": str(images_dir), "labels": [str(labels_2018), str(labels_det20)], "seg_masks": str(masks_dir)}


assert len(SEG_PALETTE) == len(SEG_CLASSES)
