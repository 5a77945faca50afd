"""The E->L transfer on the wire, and the encoder side's plan of responses.

A request to `qwen3_encoder` that carries `chunk_tokens` gets one response per chunk of visual
tokens, from `resume_from` on: `visual_embeds[start:end]`, `deepstack_embeds[:, start:end]`, the
grids, `chunk_start` and `total_tokens`. Without `chunk_tokens`, one response with everything
(the ensemble's way). With `shm_region` as well, the chunk is written into that shared-memory
region on the encoder's host and the response carries its tensors empty ([0, H], [L, 0, H], so
the receiver still checks their dtype and width).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

from .. import contract
from ..errors import InvalidInput, ServingError, SharedMemoryUnavailable
from ..features import VisualFeatures


def chunks(features: VisualFeatures, chunk_tokens: int, resume_from: int = 0) -> Iterator[tuple[int, VisualFeatures]]:
    """(start, slice) pieces of `features` from `resume_from` on, `chunk_tokens` tokens each
    (views, no copy). An empty request still yields one (empty) piece so the receiver learns
    the grids. Raises InvalidInput for chunk_tokens < 1 or resume_from outside [0, N]."""
    n = features.visual_embeds.shape[0]
    if chunk_tokens < 1:
        raise InvalidInput(f"{contract.CHUNK_TOKENS} must be >= 1, got {chunk_tokens}")
    if not 0 <= resume_from <= n:
        raise InvalidInput(f"{contract.RESUME_FROM} {resume_from} is outside the request's {n} visual tokens")
    start = resume_from
    while True:
        end = min(start + chunk_tokens, n)
        yield start, features.rows(features.visual_embeds[start:end], features.deepstack_embeds[:, start:end])
        start = end
        if start >= n:
            return


@dataclass(frozen=True)
class ChunkRequest:
    """The transfer inputs of one encoder request (all optional)."""
    chunk_tokens: int | None = None  # None: one response with everything
    resume_from: int = 0
    max_chunks: int = 0              # 0: all
    shm_region: str | None = None    # write the (one) chunk into this region instead of sending it

    def __post_init__(self):
        if self.shm_region is not None and self.chunk_tokens is None:
            raise InvalidInput(f"{contract.SHM_REGION} needs {contract.CHUNK_TOKENS}: the region's size in visual tokens")


@dataclass
class Response:
    """One response of the encoder: its tensors, where they go, and whether it is the last."""
    features: VisualFeatures
    chunk_start: int | None   # None: a whole, unchunked result (no chunk_start/total_tokens outputs)
    total_tokens: int | None
    final: bool
    shm_bytes: int = 0        # bytes written into the shared-memory region instead of sent


def plan_responses(result: VisualFeatures, request: ChunkRequest,
                   write_region: Callable[[str, VisualFeatures], None]) -> list[Response]:
    """The responses that answer `request` for an encoded `result` ([N, H], [L, N, H], grids).
    `write_region(name, piece)` writes a chunk into a shared-memory region (shm.RegionWriter).

    Raises InvalidInput for bad chunking inputs; SharedMemoryUnavailable when the region cannot
    be written (whatever the cause: the language side can always fall back to gRPC)."""
    if request.chunk_tokens is None:
        return [Response(result, None, None, final=True)]
    total = result.visual_embeds.shape[0]
    # islice: a one-token probe must not slice every chunk of the image first.
    pieces = list(itertools.islice(chunks(result, request.chunk_tokens, request.resume_from),
                                   request.max_chunks or None))
    if request.shm_region is None:
        return [Response(piece, start, total, final=i == len(pieces) - 1) for i, (start, piece) in enumerate(pieces)]
    # One chunk (chunk_tokens: what the region holds) goes into the region.
    start, piece = pieces[0]
    try:
        write_region(request.shm_region, piece)
    except ServingError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever it is, the language side can use gRPC
        raise SharedMemoryUnavailable(f"shared-memory region {request.shm_region!r}: {type(e).__name__}: {e}") from None
    empty = piece.rows(piece.visual_embeds[:0], piece.deepstack_embeds[:, :0])
    return [Response(empty, start, total, final=True, shm_bytes=piece.nbytes)]
