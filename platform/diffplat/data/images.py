"""Reading an input image for `prepare`, with every way it can be bad told apart (duplicates
are found by content hash in shard_job.py)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 80_000_000  # default pixel limit: far above any photo a dataset holds, far below a bomb


class BadImage(OSError):
    """An input image that cannot be used; `reason` is its class (counted), the message adds detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


def png_bytes(image, flat: bool = False) -> bytes:
    """A PIL image or an array as PNG; `flat` (a colour map, few colours): fast compression, 4x
    faster and as small."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1 if flat else 6)
    return buf.getvalue()


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[bytes, Image.Image]:
    """The file's bytes and the decoded RGB image (see decode_image)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:  # gone since it was listed, no permission, an I/O error
        raise BadImage("unreadable image", err.strerror or str(err)) from None
    return decode_image(data, max_pixels)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[bytes, Image.Image]:
    """The bytes and the decoded RGB image. The size is checked from the header before any
    pixel is decoded, so a decompression bomb costs nothing; a truncated file fails the full
    decode."""
    if not data:
        raise BadImage("zero-byte image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage("image over the pixel limit", f"{width}x{height} > {max_pixels} pixels")
            img.load()
            return data, img.convert("RGB")
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise BadImage("image over the pixel limit", str(err)) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise BadImage("corrupt image", str(err)) from None


def readable_images(folder: str | Path) -> tuple[list[Image.Image], int]:
    """The images of a folder that decode (name order), and how many did not."""
    from diffplat.pictures import list_images

    images, bad = [], 0
    for path in list_images(Path(folder)):
        try:
            images.append(read_image(path)[1])
        except BadImage:
            bad += 1
    return images, bad
