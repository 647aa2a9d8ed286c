"""Image folders and contact sheets (many images on one picture, for MLflow and a quick look)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name ([] if there is no such folder)."""
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def grid(images: list[Image.Image], columns: int = 4, thumb_width: int = 256, gap: int = 4) -> Image.Image:
    """Images scaled to `thumb_width`, in rows of `columns`, on a dark background."""
    thumbs = []
    for img in images:
        img = img.convert("RGB")
        height = max(1, round(img.height * thumb_width / img.width))
        thumbs.append(img.resize((thumb_width, height), Image.BICUBIC))
    cell_h = max(t.height for t in thumbs)
    columns = min(columns, len(thumbs))
    rows = -(-len(thumbs) // columns)
    sheet = Image.new("RGB", (columns * (thumb_width + gap) + gap, rows * (cell_h + gap) + gap), (24, 24, 24))
    for i, thumb in enumerate(thumbs):
        row, col = divmod(i, columns)
        sheet.paste(thumb, (gap + col * (thumb_width + gap), gap + row * (cell_h + gap)))
    return sheet


def labelled_rows(rows: list[list[Image.Image]], labels: list[str], thumb_width: int = 256) -> Image.Image:
    """One grid row per label, the label written at its left (PIL's built-in bitmap font: no font
    file is needed): a comparison sheet, e.g. base | + adapter for the same prompts and seeds."""
    from PIL import ImageDraw

    strips = [grid(images, len(images), thumb_width) for images in rows]
    label_width = 8 + 6 * max(len(label) for label in labels)
    sheet = Image.new("RGB", (label_width + max(s.width for s in strips), sum(s.height for s in strips)), (24, 24, 24))
    draw, top = ImageDraw.Draw(sheet), 0
    for strip, label in zip(strips, labels):
        sheet.paste(strip, (label_width, top))
        draw.text((4, top + strip.height // 2 - 5), label, fill=(230, 230, 230))
        top += strip.height
    return sheet


def contact_sheet(paths: list[Path], out: Path, columns: int = 4, thumb_width: int = 256, limit: int = 32) -> Path | None:
    """A grid of the first `limit` images, each scaled to `thumb_width`; None if there are none."""
    paths = list(paths)[:limit]
    if not paths:
        return None
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(images, columns, thumb_width).save(out)
    return out
