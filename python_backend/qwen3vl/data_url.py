"""Base64 `data:` URLs (RFC 2397), as clients send image and video files: the one decoder, with
one set of rules, for the encoder (the `images` and `videos` inputs of the ensemble, e.g. from
Triton's HTTP generate endpoint) and the OpenAI service (`image_url`). Standard library only.

The rules, lenient where the standards are:
- the scheme is case-insensitive (`data:`, `DATA:`), as URL schemes are (RFC 3986);
- a ',' ends the header;
- the data must be base64 (a `;base64` parameter, in any case): images and videos are binary,
  and percent-encoded bytes are not what any client sends for them;
- a declared media type must be of the expected kind (`image/png` for an image), or the generic
  `application/octet-stream`; none declared (`data:;base64,...`) is fine;
- whitespace inside the base64 is skipped (encoders wrap lines at 76 columns, RFC 2045).
Each error says which input and what is wrong with it.
"""

from __future__ import annotations

import base64
import binascii

from .errors import InvalidInput

# Whitespace that RFC 2045 lets base64 carry.
_BASE64_WHITESPACE = b" \t\r\n\f\v"
_GENERIC_BINARY = b"application/octet-stream"


class DataURLError(InvalidInput):
    """A data URL that breaks a rule; the message names the input. `too_large`: the only problem
    is its size (the caller's limit)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def is_data_url(data: bytes | str) -> bool:
    """Whether `data` is a data URL rather than a file (or another kind of URL)."""
    head = data[:5]
    if isinstance(head, bytes):
        head = head.decode("latin-1")
    return head.lower() == "data:"


def decode_data_url(url: bytes | str, name: str, media: str, max_bytes: int | None = None) -> bytes:
    """The file inside the data URL `url`, for the input `name` (e.g. `images[0]`) of kind
    `media` ("image" or "video"), at most `max_bytes` long where given.
    Raises DataURLError naming `name` and the rule broken."""
    data = url.encode() if isinstance(url, str) else url
    header, comma, payload = data.partition(b",")
    if not comma:
        raise DataURLError(f"{name}: a data URL needs a ',' before its data")
    params = header[len("data:"):].split(b";")
    media_type = params[0].strip().lower()
    if media_type and not media_type.startswith(media.encode()) and media_type != _GENERIC_BINARY:
        article = "an" if media[0] in "aeiou" else "a"
        raise DataURLError(f"{name}: a data URL of type {media_type.decode(errors='replace')!r} is not {article} "
                           f"{media}")
    if b"base64" not in (p.strip().lower() for p in params[1:]):
        raise DataURLError(f"{name}: a data URL must be base64 (data:{media}/...;base64,...)")
    # Checked before decoding too: a huge payload is refused without decoding it.
    if max_bytes is not None and len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise _too_large(name, media, max_bytes)
    try:
        decoded = base64.b64decode(payload.translate(None, _BASE64_WHITESPACE), validate=True)
    except binascii.Error as e:
        raise DataURLError(f"{name}: bad base64 in data URL: {e}") from None
    if max_bytes is not None and len(decoded) > max_bytes:
        raise _too_large(name, media, max_bytes)
    return decoded


def file_bytes(data: bytes, name: str, media: str) -> bytes:
    """`data` as given (a file's own bytes), or the file inside it when it is a data URL.
    Raises DataURLError naming `name` for a data URL that breaks a rule."""
    return decode_data_url(data, name, media) if is_data_url(data) else data


def _too_large(name: str, media: str, max_bytes: int) -> DataURLError:
    return DataURLError(f"{name}: the {media} is larger than this server's limit of {max_bytes} bytes", too_large=True)
