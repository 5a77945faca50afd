"""Image files as requests carry them: raw bytes or base64 `data:` URLs, decoded with Pillow.

Orientation: a JPEG's EXIF Orientation tag (a phone photo held upright is stored sideways with
tag 6) is applied before anything else, as transformers' `load_image` does
(`PIL.ImageOps.exif_transpose`), so the vision tower sees the picture the user sees. Caches
and routing still key on the file's own bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .. import contract
from ..data_url import DataURLError, file_bytes
from ..errors import InvalidInput

# EXIF Orientation values that swap width and height (transposed, rotated 90 or 270 degrees).
_SWAPS_SIDES = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageError(InvalidInput):
    """An input that is not a decodable image; the message names which one."""


def image_file_bytes(data: bytes, index: int) -> bytes:
    """The image file itself: raw bytes as given, or the payload of a base64 `data:` URL (what
    JSON clients of Triton's HTTP generate endpoint send; whitespace inside the base64, e.g.
    lines wrapped at 76 columns, is allowed). Cache keys and routing hash these bytes, so the
    same image hits the same cache entry whichever way it came.

    Raises ImageError naming `images[index]` for a data URL that is not valid base64."""
    return data_url_payload(data, f"{contract.IMAGES}[{index}]", "image", ImageError)


def data_url_payload(data: bytes, name: str, media: str, error: type[InvalidInput]) -> bytes:
    """`data` as given, or the file inside it when it is a data URL (qwen3vl.data_url's rules).
    A data URL that breaks a rule raises `error` (the input kind's own InvalidInput), whose
    message names the input `name` and the rule."""
    try:
        return file_bytes(data, name, media)
    except DataURLError as e:
        raise error(str(e)) from None


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, without decoding its pixels."""
    width: int   # as displayed: after the EXIF orientation
    height: int
    format: str  # Pillow's name: PNG, JPEG, WEBP, GIF, ...
    frames: int  # > 1 for an animation (its first frame is used)


def _open(data: bytes, index: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"{contract.IMAGES}[{index}] ({len(data)} bytes) is not a decodable image: "
                         "not a format Pillow recognises (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError as e:  # over twice Pillow's MAX_IMAGE_PIXELS
        raise ImageError(f"{contract.IMAGES}[{index}] is too large to decode: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{contract.IMAGES}[{index}] ({len(data)} bytes) is not a decodable image: "
                         f"{type(e).__name__}: {e}") from None


def read_header(data: bytes, index: int) -> ImageHeader:
    """Size (after orientation), format and frame count from the file's header; pixels are not
    decoded. Raises ImageError naming `images[index]` when Pillow cannot read the header."""
    image = _open(data, index)
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: Pillow's decode ignores it too
        orientation = 1
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return ImageHeader(width, height, image.format or "", getattr(image, "n_frames", 1))


def decode_image(data: bytes, index: int) -> Image.Image:
    """A decoded PIL image, EXIF orientation applied (an animation: its first frame). Raises
    ImageError naming `images[index]` and its size when Pillow cannot read it (the message says
    what Pillow found, never an object's repr)."""
    image = _open(data, index)
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{contract.IMAGES}[{index}] ({len(data)} bytes) is not a decodable image: "
                         f"{type(e).__name__}: {e}") from None
