"""Encoder -> language transfer between servers: chunked by visual tokens, resumable, routed.

The encoder server answers a request that carries `chunk_tokens` with one response per chunk
(`visual_embeds[start:end]`, `deepstack_embeds[:, start:end]`, the grids, `chunk_start`,
`total_tokens`), starting at `resume_from`. The language server's `qwen3_encoder` (remote mode)
fetches each image from the encoder its content hash routes to, writes chunks in place into
preallocated tensors, and after a broken connection or a dead encoder asks only for the chunks
it lacks: from the same encoder if it is back within `same_encoder_wait_s`, else from the next
one on the ring (which re-encodes on a cache miss).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from . import contract
from .config import ModelConfig
from .vision import VisualFeatures

log = logging.getLogger(__name__)

CHUNK_TOKENS = "chunk_tokens"  # INT32 [1]: visual tokens per chunk (asks for chunked responses)
RESUME_FROM = "resume_from"    # INT64 [1]: first visual token wanted
CHUNK_START = "chunk_start"    # INT64 [1]: where this chunk's rows go
TOTAL_TOKENS = "total_tokens"  # INT64 [1]: N of the whole request
MAX_CHUNKS = "max_chunks"      # INT32 [1]: stop after this many chunks (0: all)
IMAGE_DIGESTS = "image_digests"  # BYTES [-1]: SHA-256 of image files the encoder may have cached
NOT_CACHED = "not in the encoder's cache"


def chunks(features: VisualFeatures, chunk_tokens: int, resume_from: int = 0) -> Iterator[tuple[int, VisualFeatures]]:
    """(start, slice) pieces of `features` from `resume_from` on, `chunk_tokens` tokens each.
    An empty request still yields one (empty) piece so the receiver learns the grids."""
    n = features.visual_embeds.shape[0]
    if chunk_tokens < 1:
        raise ValueError(f"{CHUNK_TOKENS} must be >= 1, got {chunk_tokens}")
    if not 0 <= resume_from <= n:
        raise ValueError(f"{RESUME_FROM} {resume_from} is outside the request's {n} visual tokens")
    start = resume_from
    while True:
        end = min(start + chunk_tokens, n)
        yield start, VisualFeatures(features.visual_embeds[start:end], features.deepstack_embeds[:, start:end],
                                    features.image_grid_thw)
        start = end
        if start >= n:
            return


class HashRing:
    """Consistent hashing over encoder URLs (virtual nodes), so one image always goes to the
    same encoder and adding or losing one moves only its share of images."""

    def __init__(self, urls: list[str], replicas: int = 64):
        self.urls = list(dict.fromkeys(urls))
        points = sorted((self._hash(f"{url}#{i}"), url) for url in self.urls for i in range(replicas))
        self.hashes = [h for h, _ in points]
        self.owners = [u for _, u in points]

    @staticmethod
    def _hash(text: str) -> int:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")

    def order(self, key: str) -> list[str]:
        """All URLs, the key's owner first, then the ring's successors."""
        out: list[str] = []
        i = bisect.bisect(self.hashes, self._hash(key))
        for j in range(len(self.owners)):
            url = self.owners[(i + j) % len(self.owners)]
            if url not in out:
                out.append(url)
                if len(out) == len(self.urls):
                    break
        return out


class EncoderUnavailable(RuntimeError):
    """No encoder could serve an image; the message says which failed and why."""


class EncoderRejected(ValueError):
    """An encoder answered with an error about the request itself (e.g. an undecodable
    image): retrying elsewhere would not help."""


@dataclass
class TransferStats:
    """What one `RemoteEncoder.encode` call moved (metrics)."""
    requests: int = 0
    images: int = 0
    chunks: int = 0
    bytes: int = 0
    resumes: int = 0
    shm_bytes: int = 0
    seconds: float = 0.0
    failovers: list[str] = field(default_factory=list)

    def add(self, other: "TransferStats") -> None:
        self.chunks += other.chunks
        self.bytes += other.bytes
        self.shm_bytes += other.shm_bytes
        self.resumes += other.resumes
        self.failovers += other.failovers


# gRPC status codes that mean "the connection or the server is gone", not "bad request".
_TRANSIENT = ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "UNKNOWN", "INTERNAL", "RESOURCE_EXHAUSTED")


def _transient(error) -> bool:
    status = str(getattr(error, "status", lambda: "")() or "")
    message = str(error)
    if NOT_CACHED in message:
        return False
    if "Socket closed" in message or "failed to connect" in message.lower() or "Connection reset" in message:
        return True
    return any(code in status for code in _TRANSIENT) and "not a decodable image" not in message


class RemoteEncoder:
    """`encode(per_request)` like VisionEncoder's, served by encoder servers over gRPC."""

    def __init__(self, urls: list[str], config: ModelConfig, chunk_tokens: int = 1024, timeout_s: float = 30.0,
                 same_encoder_wait_s: float = 3.0, chunk_timeout_s: float = 10.0, workers: int = 8,
                 shared_memory: bool = False):
        if not urls:
            raise ValueError("remote encoder mode needs at least one encoder URL (qwen3vl-serve --encoder-url)")
        self.ring = HashRing(urls)
        self.config, self.dtype, self.chunk_tokens = config, config.dtype, chunk_tokens
        self.timeout_s, self.same_encoder_wait_s, self.chunk_timeout_s = timeout_s, same_encoder_wait_s, chunk_timeout_s
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="qwen3vl-fetch")
        # Same-host encoders: move the bulk through Triton's system shared memory. Per encoder,
        # falls back to gRPC for good after one failure to set it up (e.g. another host).
        self.shm, self.shm_ok = shared_memory, {}
        # One gRPC client per (fetch thread, encoder), kept between fetches: a new channel per
        # request costs a connection setup that dwarfs a small chunk.
        self.clients = threading.local()
        self.last = TransferStats()
        self.lock = threading.Lock()

    # -- the EncodeBatcher interface
    def encode(self, per_request: list[list[bytes]]) -> list[VisualFeatures | Exception]:
        start = time.perf_counter()
        stats = TransferStats(requests=len(per_request), images=sum(map(len, per_request)))
        futures = [[self.pool.submit(self.fetch, image, i) for i, image in enumerate(req)] for req in per_request]
        results: list[VisualFeatures | Exception] = []
        for req in futures:
            parts, error = [], None
            for f in req:
                try:
                    features, fetch_stats = f.result()
                    parts.append(features)
                    stats.add(fetch_stats)
                except Exception as e:  # noqa: BLE001 - the request fails, the batch goes on
                    error = error or e
            results.append(error if error else _concat(parts, self.config))
        stats.seconds = time.perf_counter() - start
        self.last = stats
        return results

    # -- one image
    def fetch(self, image: bytes, index: int = 0) -> tuple[VisualFeatures, TransferStats]:
        digest = hashlib.sha256(image).digest()  # once: hashing a large file is not free
        key = digest.hex()
        order = self.ring.order(key)
        stats = TransferStats()
        buf: Buffers | None = None  # preallocated at the first chunk, filled in place
        errors: dict[str, str] = {}
        deadline = time.monotonic() + self.timeout_s
        url = order[0]
        # Name the image by digest first (no upload: a repeat, a resume); the file goes only when
        # that encoder lacks it (new image, restarted or different encoder): one round trip more.
        by_digest = True
        while True:
            received = buf.received if buf else 0
            # With shared memory, a one-token first chunk comes over gRPC (it tells the total)
            # and the rest lands in a shared-memory region in one response.
            use_shm = self.shm and self.shm_ok.get(url, True)
            try:
                if use_shm and buf and not buf.complete:
                    try:
                        stats.shm_bytes += self._rest_through_shm(url, digest, buf, deadline)
                        stats.chunks += 1
                    except EncoderRejected as e:
                        if NOT_CACHED not in str(e):
                            raise
                        # evicted meanwhile: the gRPC path below sends the file again
                    except (ConnectionError, TimeoutError):
                        raise
                    except Exception as e:  # noqa: BLE001 - e.g. another host: use gRPC from now on
                        log.warning("shared-memory transfer from %s unavailable, using gRPC: %s", url, e)
                        self.shm_ok[url] = False
                    if buf.complete:
                        return buf.features(self.dtype), stats
                probe = use_shm and not buf  # with shm, one token over gRPC tells the total
                for start, total, piece in self._stream(url, digest if by_digest else image, buf.received if buf else 0,
                                                        chunk_tokens=1 if probe else None,
                                                        max_chunks=1 if probe else 0,
                                                        first_timeout_s=max(1.0, deadline - time.monotonic()),
                                                        by_digest=by_digest):
                    wire = piece.visual_embeds.dtype.name
                    if wire != str(self.dtype).removeprefix("torch."):
                        raise EncoderRejected(f"encoder {url} sends {wire} tensors but this server runs "
                                              f"{self.dtype}: start both with the same --dtype")
                    buf = buf or Buffers.allocate(total, piece)
                    buf.write(start, piece, url)
                    stats.chunks += 1
                    stats.bytes += piece.visual_embeds.nbytes + piece.deepstack_embeds.nbytes
                if buf and buf.complete:
                    return buf.features(self.dtype), stats
                if use_shm and buf and self.shm_ok.get(url, True):
                    continue  # first chunk in: the rest through shared memory
                raise ConnectionError(f"the stream ended at visual token {buf.received if buf else 0}")
            except EncoderRejected as e:
                if by_digest and NOT_CACHED in str(e):
                    by_digest = False
                    continue
                raise EncoderRejected(f"images[{index}]: {e}") from None
            except Exception as e:  # noqa: BLE001 - any transport failure: resume here or elsewhere
                errors[url] = f"{type(e).__name__}: {e}"
                received = buf.received if buf else 0
                log.warning("image %s from %s failed after %d visual tokens: %s", key[:12], url, received, e)
                stats.resumes += bool(received)
                by_digest = True
                failed, url = url, self._next_encoder(url, order, deadline)
                if url is None:
                    detail = "; ".join(f"{u}: {m}" for u, m in errors.items())
                    raise EncoderUnavailable(f"images[{index}]: no encoder could serve it within {self.timeout_s:g} s "
                                             f"({received} visual tokens had arrived): {detail}") from None
                if url != failed:
                    stats.failovers.append(url)

    def _next_encoder(self, failed: str, order: list[str], deadline: float) -> str | None:
        """The same encoder if it is back within `same_encoder_wait_s`, else the next live one
        on the ring; None when none is live before the deadline."""
        wait_until = min(deadline, time.monotonic() + self.same_encoder_wait_s)
        while True:
            if _is_live(failed):
                return failed
            if time.monotonic() >= wait_until:
                break
            time.sleep(0.1)
        while time.monotonic() < deadline:
            for url in order:
                if _is_live(url):
                    return url
            time.sleep(0.2)
        return None

    def _stream(self, url: str, image: bytes, resume_from: int, chunk_tokens: int | None = None,
                max_chunks: int = 0, outputs: list | None = None,
                first_timeout_s: float | None = None, by_digest: bool = False) -> Iterator[tuple[int, int, VisualFeatures]]:
        """(chunk start, total tokens, chunk as numpy arrays) as the encoder sends them for
        `image` (the file, or its SHA-256 digest with `by_digest`)
        (the arrays are None for outputs directed to shared memory). The first chunk may take
        as long as an encode (`first_timeout_s`); later ones `chunk_timeout_s`."""
        import tritonclient.grpc as grpcclient

        results: queue.Queue = queue.Queue()
        client = self._client(url)
        finished = False
        try:
            inputs = []
            image_input = (IMAGE_DIGESTS if by_digest else contract.IMAGES, np.array([image], dtype=object), "BYTES")
            for name, value, dtype in (
                    image_input,
                    (CHUNK_TOKENS, np.array([chunk_tokens or self.chunk_tokens], dtype=np.int32), "INT32"),
                    (RESUME_FROM, np.array([resume_from], dtype=np.int64), "INT64"),
                    (MAX_CHUNKS, np.array([max_chunks], dtype=np.int32), "INT32")):
                t = grpcclient.InferInput(name, list(value.shape), dtype)
                t.set_data_from_numpy(value)
                inputs.append(t)
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            client.async_stream_infer("qwen3_encoder", inputs, outputs=outputs, enable_empty_final_response=True)
            wait = first_timeout_s or self.chunk_timeout_s
            while True:
                try:
                    result, error = results.get(timeout=wait)
                except queue.Empty:
                    raise TimeoutError(f"no chunk within {wait:g} s") from None
                wait = self.chunk_timeout_s
                if error is not None:
                    if _transient(error):
                        raise ConnectionError(str(error))
                    raise EncoderRejected(str(error))
                response = result.get_response()
                finished = response.parameters["triton_final_response"].bool_param
                if response.outputs:
                    in_shm = outputs is not None  # the big tensors are in the shared-memory region
                    yield (int(result.as_numpy(CHUNK_START)[0]), int(result.as_numpy(TOTAL_TOKENS)[0]),
                           VisualFeatures(None if in_shm else result.as_numpy(contract.VISUAL_EMBEDS),
                                          None if in_shm else result.as_numpy(contract.DEEPSTACK_EMBEDS),
                                          result.as_numpy(contract.IMAGE_GRID_THW)))
                if finished:
                    return
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            except Exception:  # noqa: BLE001 - a dead connection
                finished = False
            if not finished:  # broken or abandoned: the next fetch from this encoder reconnects
                self._drop_client(url)

    def _client(self, url: str):
        import tritonclient.grpc as grpcclient

        cache = self.clients.__dict__.setdefault("by_url", {})
        if url not in cache:
            cache[url] = grpcclient.InferenceServerClient(url)
        return cache[url]

    def _drop_client(self, url: str) -> None:
        client = self.clients.__dict__.get("by_url", {}).pop(url, None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass

    def _rest_through_shm(self, url: str, digest: bytes, buf: "Buffers", deadline: float) -> int:
        """Same host: the rest of the image in one response that Triton writes into a system
        shared-memory region we registered with the encoder server (Triton's shared-memory
        extension), instead of gRPC message copies. Returns the bytes moved."""
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        n = buf.embeds.shape[0] - buf.received
        embeds_bytes = n * buf.embeds.shape[1] * buf.embeds.itemsize
        deepstack_bytes = buf.deepstack.shape[0] * n * buf.deepstack.shape[2] * buf.deepstack.itemsize
        name = f"qwen3vl-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(name, "/" + name, embeds_bytes + deepstack_bytes)
        client = self._client(url)
        try:
            client.register_system_shared_memory(name, "/" + name, embeds_bytes + deepstack_bytes)
            outputs = [grpcclient.InferRequestedOutput(x) for x in
                       (contract.VISUAL_EMBEDS, contract.DEEPSTACK_EMBEDS, contract.IMAGE_GRID_THW, CHUNK_START, TOTAL_TOKENS)]
            outputs[0].set_shared_memory(name, embeds_bytes, 0)
            outputs[1].set_shared_memory(name, deepstack_bytes, embeds_bytes)
            # The image was encoded for the first chunk: name it by digest, don't upload it again.
            pieces = list(self._stream(url, digest, buf.received, chunk_tokens=n, max_chunks=1, outputs=outputs,
                                       first_timeout_s=max(1.0, deadline - time.monotonic()), by_digest=True))
            if len(pieces) != 1 or pieces[0][0] != buf.received:
                raise RuntimeError(f"shared-memory transfer from {url} returned {len(pieces)} responses")
            wire = np.uint16 if buf.embeds.dtype.itemsize == 2 else buf.embeds.dtype
            start = buf.received
            buf.embeds[start:] = shm.get_contents_as_numpy(handle, wire, [n, buf.embeds.shape[1]]).view(buf.embeds.dtype)
            buf.deepstack[:, start:] = shm.get_contents_as_numpy(
                handle, wire, [buf.deepstack.shape[0], n, buf.deepstack.shape[2]], offset=embeds_bytes).view(buf.deepstack.dtype)
            buf.received += n
            return embeds_bytes + deepstack_bytes
        finally:
            try:
                client.unregister_system_shared_memory(name)
            except Exception:  # noqa: BLE001 - the server may be gone
                pass
            shm.destroy_shared_memory_region(handle)


def _is_live(url: str) -> bool:
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            return client.is_server_ready(client_timeout=1.0) and client.is_model_ready("qwen3_encoder", client_timeout=1.0)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - unreachable is not live
        return False


class Buffers:
    """One image's E->L tensors being assembled in place from chunks (numpy, wire dtype)."""

    def __init__(self, embeds: np.ndarray, deepstack: np.ndarray, grids: np.ndarray):
        self.embeds, self.deepstack, self.grids = embeds, deepstack, grids
        self.received = 0

    @classmethod
    def allocate(cls, total: int, first: VisualFeatures) -> "Buffers":
        e, d = first.visual_embeds, first.deepstack_embeds
        return cls(np.empty((total, e.shape[1]), e.dtype), np.empty((d.shape[0], total, d.shape[2]), d.dtype),
                   np.array(first.image_grid_thw, dtype=np.int64))

    @property
    def complete(self) -> bool:
        return self.received == self.embeds.shape[0]

    def write(self, start: int, piece: VisualFeatures, url: str) -> None:
        n = piece.visual_embeds.shape[0]
        if start != self.received or start + n > self.embeds.shape[0]:
            raise RuntimeError(f"encoder {url} sent visual tokens [{start}, {start + n}), expected from {self.received}")
        self.embeds[start:start + n] = piece.visual_embeds
        self.deepstack[:, start:start + n] = piece.deepstack_embeds
        self.received += n

    def features(self, dtype: torch.dtype) -> VisualFeatures:
        return VisualFeatures(_torch(self.embeds, dtype), _torch(self.deepstack, dtype), torch.from_numpy(self.grids))


def _torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """numpy -> torch without copying; bf16 arrives as ml_dtypes.bfloat16, which torch reads
    through a 16-bit view."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _concat(parts: list[VisualFeatures], config: ModelConfig) -> VisualFeatures:
    if not parts:
        return VisualFeatures.empty(config)
    if len(parts) == 1:
        return parts[0]
    return VisualFeatures(torch.cat([p.visual_embeds for p in parts]),
                          torch.cat([p.deepstack_embeds for p in parts], dim=1),
                          torch.cat([p.image_grid_thw for p in parts]))
