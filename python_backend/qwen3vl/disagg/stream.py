"""One transfer request to an encoder server and the chunks it streams back (gRPC).

Failures come back typed by the code the encoder marked them with (errors.py), never by their
prose: INVALID_ARG -> EncoderRejected (the request itself is bad: do not retry), NOT_FOUND ->
NotCached (send the file), UNSUPPORTED -> SharedMemoryUnavailable (use gRPC); anything else,
marked UNAVAILABLE or INTERNAL or not marked at all (a broken connection, a server shutting
down) -> ConnectionError, which the fetch resumes here or elsewhere.
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from .. import contract, errors
from ..client.inputs import transfer_inputs
from ..errors import InvalidInput, NotCached, SharedMemoryUnavailable
from ..features import WireFeatures
from ..grpc_stream import StreamError, stream_infer

ENCODER_MODEL = "qwen3_encoder"


class EncoderRejected(InvalidInput):
    """An encoder answered with an error about the request itself (e.g. an undecodable
    image): retrying elsewhere would not help."""


def classify(error: Exception) -> Exception:
    """The exception to raise for an encoder's error answer (see the module docstring)."""
    code, message = errors.code_of(error), errors.message_of(error)
    if code == errors.INVALID_ARG:
        return EncoderRejected(message)
    if code == errors.NOT_FOUND:
        return NotCached(message)
    if code == errors.UNSUPPORTED:
        return SharedMemoryUnavailable(message)
    return ConnectionError(str(error))


class EncoderClients:
    """One tritonclient gRPC client per (thread, encoder URL), kept between requests: a new
    channel per request costs a connection setup that dwarfs a small chunk."""

    def __init__(self):
        self.local = threading.local()
        self.all: list = []  # every thread's clients, for close()
        self.lock = threading.Lock()

    def get(self, url: str):
        import tritonclient.grpc as grpcclient

        clients = self.local.__dict__.setdefault("by_url", {})
        if url not in clients:
            clients[url] = grpcclient.InferenceServerClient(url)
            with self.lock:
                self.all.append(clients[url])
        return clients[url]

    def drop(self, url: str) -> None:
        """Forget this thread's client for `url` (its stream broke: the next request reconnects)."""
        client = self.local.__dict__.get("by_url", {}).pop(url, None)
        if client is not None:
            with self.lock:
                if client in self.all:  # not already taken by close()
                    self.all.remove(client)
            _close(client)

    def close(self) -> None:
        with self.lock:
            clients, self.all = self.all, []
        for client in clients:
            _close(client)


def _close(client) -> None:
    """Cancel what is in flight on the client's stream and close its channel."""
    try:
        client.stop_stream(cancel_requests=True)
        client.close()
    except Exception:  # noqa: BLE001 - closing a dead connection
        pass


def _or_empty(result, name: str, shape, dtype) -> np.ndarray:
    array = result.as_numpy(name)
    return np.empty(shape, dtype) if array is None else array


def request_chunks(clients: EncoderClients, url: str, image: bytes, *, by_digest: bool, resume_from: int,
                   chunk_tokens: int, max_chunks: int = 0, shm_region: str | None = None,
                   first_timeout_s: float, chunk_timeout_s: float,
                   wire_dtype: str, video_fps: float | None = None) -> Iterator[tuple[int, int, WireFeatures]]:
    """(chunk start, total tokens, chunk as numpy arrays) as the encoder at `url` sends them for
    `image` (the file, or its SHA-256 digest with `by_digest`; a video with `video_fps`); with `shm_region`, the arrays
    arrive empty and the chunk is in that region. The first chunk may take as long as an encode
    (`first_timeout_s`); later ones `chunk_timeout_s`.

    Raises EncoderRejected (also when the encoder's tensors are not `wire_dtype`, e.g. "BF16"),
    NotCached, SharedMemoryUnavailable, or ConnectionError/TimeoutError (transient)."""
    import tritonclient.grpc as grpcclient

    inputs = transfer_inputs(grpcclient, image, by_digest=by_digest, chunk_tokens=chunk_tokens, resume_from=resume_from,
                             max_chunks=max_chunks, shm_region=shm_region, video_fps=video_fps)
    results = stream_infer(clients.get(url), ENCODER_MODEL, inputs, first_timeout_s, chunk_timeout_s,
                           on_unfinished=lambda: clients.drop(url))
    try:
        for result in results:
            wire = result.get_output(contract.VISUAL_EMBEDS).datatype
            if wire != wire_dtype:
                raise EncoderRejected(f"encoder {url} sends {wire} tensors but this server runs "
                                      f"{wire_dtype}: start both with the same --dtype")
            yield (int(result.as_numpy(contract.CHUNK_START)[0]), int(result.as_numpy(contract.TOTAL_TOKENS)[0]),
                   WireFeatures(result.as_numpy(contract.VISUAL_EMBEDS), result.as_numpy(contract.DEEPSTACK_EMBEDS),
                                result.as_numpy(contract.IMAGE_GRID_THW),
                                _or_empty(result, contract.VIDEO_GRID_THW, (0, 3), np.int64),
                                _or_empty(result, contract.VIDEO_TIMESTAMPS, (0,), np.float64)))
    except StreamError as e:
        raise classify(e.error) from None
    finally:
        results.close()  # an early exit cancels the request and drops the client
