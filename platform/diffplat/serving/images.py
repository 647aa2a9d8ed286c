"""Uploaded and returned images: size limits before decoding, PNG out."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP"}


class UploadError(ValueError):
    """An upload the API refuses; `status` is the HTTP code, `field` the request field."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


def decode_upload(field: str, data: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """A base64 image from a request: size, format and pixel count are checked before the
    pixels are decoded, so a decompression bomb never reaches memory."""
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise UploadError(field, f"upload is larger than {max_bytes} bytes", 413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(field, "not valid base64") from None
    if len(raw) > max_bytes:
        raise UploadError(field, f"upload is {len(raw)} bytes, more than {max_bytes}", 413)
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except Exception:  # PIL raises several types for unreadable data
        raise UploadError(field, "not an image PIL can read (PNG, JPEG or WebP)", 415) from None
    if image.format not in ACCEPTED_FORMATS:
        raise UploadError(field, f"image format {image.format} is not accepted (PNG, JPEG or WebP)", 415)
    width, height = image.size
    if width * height > max_pixels:
        raise UploadError(field, f"image is {width}x{height} = {width * height} pixels, more than {max_pixels}", 413)
    try:
        image.load()
    except Exception as err:
        raise UploadError(field, f"image data is truncated or corrupt ({err})", 422) from None
    return image.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()
