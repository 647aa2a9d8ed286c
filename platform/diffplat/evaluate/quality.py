"""Measures of what an adapter does to pictures, each a number anyone can recompute from the
images: numpy on RGB arrays, no model.

- `sky_colour`: the mean colour of an image's top rows (where a driving scene's sky is); a LoRA
  trained on night scenes should bring it close to the night training images' own.
- `map_agreement`: the share of an image's colour variance that the regions of a segmentation
  map explain (1 - within-region variance / total variance); an image that follows its map has
  flat regions with edges where the map has them.
- `row_structure`: the share of an image's colour variance its rows explain; a driving scene is
  layered (sky, buildings, road), noise is not: a base that has learnt the scenes draws layers.
- `panel_agreement`: how far the sky colour of a composite's filled panels is from its visible
  panels' (same time of day in every panel of a demo composite, so a good fill matches).
"""

from __future__ import annotations

import numpy as np

SKY_ROWS = 0.12  # the top 12% of a frame: above the tallest building of a synthetic scene


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)


def sky_colour(image, rows: float = SKY_ROWS) -> np.ndarray:
    """Mean RGB (0-255) of the image's top `rows` share of rows."""
    pixels = _rgb(image)
    return pixels[: max(1, round(pixels.shape[0] * rows))].reshape(-1, 3).mean(axis=0)


def colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of two RGB colours (0-255 scale; black to white is 441.7)."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def map_agreement(image, colour_map) -> float:
    """Share of the image's colour variance explained by the map's regions (each distinct map
    colour is a region), in [0, 1]; the map is resized to the image (nearest) if it differs."""
    rgb = _rgb(image)
    height, width = rgb.shape[:2]
    pixels = rgb.reshape(-1, 3)
    if hasattr(colour_map, "resize") and colour_map.size != (width, height):
        from PIL import Image

        colour_map = colour_map.resize((width, height), Image.NEAREST)
    labels = _rgb(colour_map).reshape(-1, 3) @ np.array([65536.0, 256.0, 1.0])
    total = ((pixels - pixels.mean(axis=0)) ** 2).sum()
    if total == 0:
        return 0.0
    _, region = np.unique(labels, return_inverse=True)
    counts = np.bincount(region).astype(np.float64)
    means = np.stack([np.bincount(region, weights=pixels[:, c]) for c in range(3)], axis=1) / counts[:, None]
    within = ((pixels - means[region]) ** 2).sum()
    return float(1 - within / total)


def row_structure(image) -> float:
    """Share of the image's colour variance explained by its rows (1 - within-row variance /
    total variance), in [0, 1]."""
    pixels = _rgb(image)
    total = ((pixels - pixels.reshape(-1, 3).mean(axis=0)) ** 2).sum()
    if total == 0:
        return 0.0
    return float(1 - ((pixels - pixels.mean(axis=1, keepdims=True)) ** 2).sum() / total)


def panel_agreement(composite, layout, filled: list[int], rows: float = SKY_ROWS) -> float:
    """Distance between the mean sky colour of the filled panels and of the visible ones
    (`layout`: a composites.Layout or its text, e.g. "2x2")."""
    from diffplat.data.composites import Layout

    layout = Layout.parse(layout) if isinstance(layout, str) else layout
    pixels = _rgb(composite)
    height, width = pixels.shape[:2]
    skies = {i: sky_colour(pixels[y0:y1, x0:x1], rows) for i, (x0, y0, x1, y1) in
             enumerate(layout.boxes(width, height))}  # fmt: skip
    visible = [skies[i] for i in skies if i not in filled]
    return colour_distance(np.mean([skies[i] for i in filled], axis=0), np.mean(visible, axis=0))
