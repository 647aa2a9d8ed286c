"""Composite images: panels laid out rows x cols (2x2, 1x3, 3x1, ...), their captions and masks.

Panel i sits at row i // cols, column i % cols: in a 2x2, 0 is top-left, 1 top-right, 2
bottom-left, 3 bottom-right (source 1's numbering). "1x3" is three panels side by side, "3x1"
three stacked. Pure functions on pixels and text: data, training and inference share them, so a
panel is the same rectangle everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image


class CompositeError(ValueError):
    """A composite, a layout or a panel index that cannot be used; the message names it."""


@dataclass(frozen=True)
class Layout:
    rows: int
    cols: int
    # Relative row heights and column widths (a composite's own pixel sizes, or any proportions):
    # the In-Context LoRA paper's movie shots stack frames of unequal height. Empty: equal panels.
    heights: tuple[float, ...] = ()
    widths: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """"2x2" -> Layout(2, 2): rows x cols."""
        # ASCII digits only: str.isdigit() also takes "²", which int() then refuses
        match = re.fullmatch(r"\s*([0-9]{1,3})\s*x\s*([0-9]{1,3})\s*", str(text).lower())
        if not match:
            raise CompositeError(f"layout {text!r} is not of the form ROWSxCOLS (2x2, 1x3, 3x1)")
        layout = cls(int(match[1]), int(match[2]))
        if layout.rows < 1 or layout.cols < 1 or layout.panels < 2:
            raise CompositeError(f"layout {text!r} needs at least two panels")
        return layout

    def sized(self, heights=(), widths=(), where: str = "panel sizes") -> "Layout":
        """This layout with rows `heights` and columns `widths` tall and wide (relative sizes)."""
        heights, widths = tuple(float(h) for h in heights or ()), tuple(float(w) for w in widths or ())
        for name, sizes, count in (("panel_heights", heights, self.rows), ("panel_widths", widths, self.cols)):
            if sizes and len(sizes) != count:
                raise CompositeError(f"{where}: {name} gives {len(sizes)} sizes for layout {self}'s {count}")
            if any(not (0 < s < float("inf")) for s in sizes):
                raise CompositeError(f"{where}: {name} must be positive numbers, got {list(sizes)}")
        return Layout(self.rows, self.cols, heights, widths)

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def panels(self) -> int:
        return self.rows * self.cols

    def check_size(self, width: int, height: int, where: str, multiple: int = 1) -> None:
        """Every equal panel must be a whole number of pixels (of latent cells, with multiple=8);
        sized rows and columns end where their proportions put them."""
        if (not self.widths and width % (self.cols * multiple)) or (not self.heights and height % (self.rows * multiple)):
            unit = f" x {multiple}" if multiple > 1 else ""
            raise CompositeError(
                f"{where}: a {width}x{height} composite does not divide into layout {self} "
                f"(width must be a multiple of {self.cols}{unit}, height of {self.rows}{unit})"
            )
        for edges in (self.edges(self.cols, self.widths, width), self.edges(self.rows, self.heights, height)):
            if any(b <= a for a, b in zip(edges, edges[1:])):
                raise CompositeError(f"{where}: a {width}x{height} composite leaves a panel of layout {self} no pixels")

    def check_panels(self, panels, where: str) -> list[int]:
        chosen = sorted({int(p) for p in panels})
        bad = [p for p in chosen if not 0 <= p < self.panels]
        if bad:
            raise CompositeError(
                f"{where}: panel {bad[0]} is outside layout {self} (panels are 0 to {self.panels - 1})"
            )
        if not chosen:
            raise CompositeError(f"{where}: no panel named")
        return chosen

    @staticmethod
    def edges(count: int, sizes: tuple[float, ...], length: int) -> list[int]:
        """The `count + 1` pixel edges of rows (or columns) over `length`, by `sizes` or equal."""
        if not sizes:
            return [i * (length // count) for i in range(count + 1)]
        total, run, out = sum(sizes), 0.0, [0]
        for size in sizes:
            run += size
            out.append(round(run / total * length))
        return out

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of every panel, in panel order."""
        xs, ys = self.edges(self.cols, self.widths, width), self.edges(self.rows, self.heights, height)
        return [(xs[i % self.cols], ys[i // self.cols], xs[i % self.cols + 1], ys[i // self.cols + 1])
                for i in range(self.panels)]  # fmt: skip


def fit_panel(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover `size` (width, height), then crop the centre: no bars, no distortion."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.convert("RGB").resize(scaled, Image.BICUBIC)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def make_composite(images: list[Image.Image], layout: Layout, panel_size: tuple[int, int]) -> Image.Image:
    if len(images) != layout.panels:
        raise CompositeError(f"layout {layout} takes {layout.panels} images, got {len(images)}")
    width, height = panel_size[0] * layout.cols, panel_size[1] * layout.rows
    out = Image.new("RGB", (width, height))
    for image, (left, top, _, _) in zip(images, layout.boxes(width, height)):
        out.paste(fit_panel(image, panel_size), (left, top))
    return out


def combine_captions(panel_texts: list[str], tag: str = "", summary: str = "") -> str:
    """`[TAG] summary [SCENE-1] text [SCENE-2] text ...`, In-Context LoRA's caption format."""
    parts = [p for p in (tag.strip(), summary.strip()) if p]
    parts += [f"[SCENE-{i}] {text.strip()}" for i, text in enumerate(panel_texts, 1)]
    return " ".join(parts)


def panel_mask(layout: Layout, panels, width: int, height: int) -> np.ndarray:
    """(height, width) float32: 1 on the chosen panels, 0 elsewhere. Call it with the latent size
    (pixels / 8) for a mask on the latent grid: panel borders fall on whole cells there too."""
    mask = np.zeros((height, width), np.float32)
    boxes = layout.boxes(width, height)
    for p in layout.check_panels(panels, "panels"):
        left, top, right, bottom = boxes[p]
        mask[top:bottom, left:right] = 1.0
    return mask


def gradient_mask(layout: Layout, panels, width: int, height: int, gradient_width: int) -> np.ndarray:
    """Like panel_mask, but inside a chosen panel the value rises from 0 to 1 over
    `gradient_width` pixels from each edge it shares with a kept panel, so a fill blends into its
    neighbours. Kept panels stay exactly 0: their pixels are never touched."""
    chosen = set(layout.check_panels(panels, "panels"))
    mask = np.zeros((height, width), np.float32)
    boxes = layout.boxes(width, height)
    for p in chosen:
        left, top, right, bottom = boxes[p]
        row, col = divmod(p, layout.cols)
        ys = np.arange(top, bottom, dtype=np.float32)[:, None]
        xs = np.arange(left, right, dtype=np.float32)[None, :]
        panel = np.ones((bottom - top, right - left), np.float32)
        # distance to each edge whose neighbour across it is kept, in pixels
        neighbours = {(row, col - 1): xs - left, (row, col + 1): right - 1 - xs,
                      (row - 1, col): ys - top, (row + 1, col): bottom - 1 - ys}  # fmt: skip
        for (r, c), distance in neighbours.items():
            inside = 0 <= r < layout.rows and 0 <= c < layout.cols
            if inside and r * layout.cols + c not in chosen and gradient_width > 0:
                panel = np.minimum(panel, np.clip((distance + 1) / gradient_width, 0, 1))
        mask[top:bottom, left:right] = panel
    return mask


def paste_fill(original: Image.Image, filled: Image.Image, mask: np.ndarray) -> Image.Image:
    """`filled` where mask is 1, `original` where it is 0, a blend between; kept pixels exact."""
    a = np.asarray(original.convert("RGB"), dtype=np.float32)
    b = np.asarray(filled.convert("RGB").resize(original.size, Image.BICUBIC), dtype=np.float32)
    m = mask[..., None]
    blended = np.clip(np.rint(a * (1 - m) + b * m), 0, 255)
    out = np.where(m > 0, blended, a).astype(np.uint8)
    return Image.fromarray(out)


def side_by_side(images: list[Image.Image], gap: int = 8) -> Image.Image:
    """Images of one height next to each other on a dark strip (input | mask | output)."""
    height = max(i.height for i in images)
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, height), (24, 24, 24))
    x = 0
    for image in images:
        out.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return out
