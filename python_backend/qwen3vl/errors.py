"""Errors the serving stack raises on purpose, each with the Triton status code it maps to.

Inside Triton the code travels with the error (`pb_utils.TritonError(message, code)`), so HTTP
answers 400 for INVALID_ARG, 404 for NOT_FOUND, 503 for UNAVAILABLE. A decoupled model's error on
the gRPC stream carries its message alone (`ModelStreamInferResponse.error_message`), so every
message also starts with a machine-readable marker, `[qwen3vl:CODE] `; `code_of(message)` reads
it back, and retry decisions (the E->L transfer) use the code, never the prose after it.

Messages name the input and the problem; they never hold a Python object's repr.
"""

from __future__ import annotations

import re

MARKER = "[qwen3vl:{code}] "
_MARKER_RE = re.compile(r"\[qwen3vl:([A-Z_]+)\] ")

# The codes of Triton's Python backend (`pb_utils.TritonError.<CODE>`) that we use.
INVALID_ARG = "INVALID_ARG"
NOT_FOUND = "NOT_FOUND"
UNAVAILABLE = "UNAVAILABLE"
UNSUPPORTED = "UNSUPPORTED"
INTERNAL = "INTERNAL"


class ServingError(Exception):
    """Base of the errors below; `code` is the Triton status code."""

    code = INTERNAL

    def marked(self) -> str:
        """The message as it goes on the wire: marker, then the text."""
        return marked(self.code, str(self))


class InvalidInput(ServingError, ValueError):
    """The request itself is wrong (a missing or malformed input, a bad parameter, an
    undecodable image): retrying cannot help; the server carries on."""

    code = INVALID_ARG


class NotCached(ServingError, LookupError):
    """An image named by its digest that this encoder's cache does not hold: send the file."""

    code = NOT_FOUND


class NotFound(ServingError, LookupError):
    """The request names something this server does not have (e.g. a cancel token of no
    running generation)."""

    code = NOT_FOUND


class Unavailable(ServingError, RuntimeError):
    """A dependency (an encoder server) cannot serve now; another try may succeed."""

    code = UNAVAILABLE


class SharedMemoryUnavailable(ServingError, RuntimeError):
    """This encoder cannot write into the named shared-memory region (another host, IPC
    namespace or user, a full /dev/shm): the language server falls back to gRPC."""

    code = UNSUPPORTED


def marked(code: str, message: str) -> str:
    """`message` with the marker of `code`, once (a message already marked keeps its own)."""
    return message if _MARKER_RE.match(message) else MARKER.format(code=code) + message


def code_of(error: BaseException | str) -> str | None:
    """The code of a ServingError, or the one marked in a message received over the wire (the
    marker may follow a prefix the client library adds, e.g. `[StatusCode.INTERNAL] `); None
    when the error did not come from this project (a transport or Triton error)."""
    if isinstance(error, ServingError):
        return error.code
    match = _MARKER_RE.search(str(error))
    return match.group(1) if match else None


def message_of(error: BaseException | str) -> str:
    """The human text of an error received over the wire, without the marker and what precedes it."""
    text = str(error)
    match = _MARKER_RE.search(text)
    return text[match.end():] if match else text


def code_for(error: BaseException) -> str:
    """The Triton code to answer `error` with: its own, INVALID_ARG for the ValueErrors of the
    libraries we call on request data (e.g. the chat template), INTERNAL for anything else."""
    code = code_of(error)
    if code is not None:
        return code
    return INVALID_ARG if isinstance(error, ValueError) else INTERNAL
