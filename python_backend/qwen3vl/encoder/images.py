"""Image files as requests carry them: raw bytes or base64 `data:` URLs, decoded with Pillow."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from .. import contract
from ..errors import InvalidInput


class ImageError(InvalidInput):
    """An input that is not a decodable image; the message names which one."""


def image_file_bytes(data: bytes, index: int) -> bytes:
    """The image file itself: raw bytes as given, or the payload of a base64 `data:` URL (what
    JSON clients of Triton's HTTP generate endpoint send). Cache keys and routing hash these
    bytes, so the same image hits the same cache entry whichever way it came.

    Raises ImageError naming `images[index]` for a data URL that is not valid base64."""
    if data[:5] != b"data:":
        return data
    header, _, payload = data.partition(b",")
    if not header.endswith(b";base64"):
        raise ImageError(f"{contract.IMAGES}[{index}]: a data URL must be base64 (data:image/...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise ImageError(f"{contract.IMAGES}[{index}]: bad base64 in data URL: {e}") from None


def decode_image(data: bytes, index: int) -> Image.Image:
    """A decoded PIL image. Raises ImageError naming `images[index]` and its size when Pillow
    cannot read it (the message says what Pillow found, never an object's repr)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise ImageError(f"{contract.IMAGES}[{index}] ({len(data)} bytes) is not a decodable image: "
                         "not a format Pillow recognises (PNG, JPEG, WebP, ...)") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"{contract.IMAGES}[{index}] ({len(data)} bytes) is not a decodable image: "
                         f"{type(e).__name__}: {e}") from None
    return image
