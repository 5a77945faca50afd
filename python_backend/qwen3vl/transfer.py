"""Encoder -> language transfer between servers: chunked by visual tokens, resumable, routed.

The encoder server answers a request that carries `chunk_tokens` with one response per chunk
(`visual_embeds[start:end]`, `deepstack_embeds[:, start:end]`, the grids, `chunk_start`,
`total_tokens`), starting at `resume_from`. The language server's `qwen3_encoder` (remote mode)
fetches each image from the encoder its content hash routes to, writes chunks in place into
preallocated tensors, and after a broken connection or a dead encoder asks only for the chunks
it lacks: from the same encoder if it is back within `same_encoder_wait_s`, else from the next
one on the ring (which re-encodes on a cache miss). With shared memory on (same host), the
encoder writes the chunks into the language server's regions instead (shm.py).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from . import contract, shm
from .config import ModelConfig
from .vision import VisualFeatures

log = logging.getLogger(__name__)

CHUNK_TOKENS = "chunk_tokens"  # INT32 [1]: visual tokens per chunk (asks for chunked responses)
RESUME_FROM = "resume_from"    # INT64 [1]: first visual token wanted
CHUNK_START = "chunk_start"    # INT64 [1]: where this chunk's rows go
TOTAL_TOKENS = "total_tokens"  # INT64 [1]: N of the whole request
MAX_CHUNKS = "max_chunks"      # INT32 [1]: stop after this many chunks (0: all)
IMAGE_DIGESTS = "image_digests"  # BYTES [-1]: SHA-256 of image files the encoder may have cached
SHM_REGION = "shm_region"      # BYTES [1]: write the chunk into this shared-memory region (shm.py)
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
    seconds: float = 0.0           # the whole encode() call
    transfer_seconds: float = 0.0  # per image, from the first request to the assembled tensors, summed
    failovers: list[str] = field(default_factory=list)

    def add(self, other: "TransferStats") -> None:
        self.transfer_seconds += other.transfer_seconds
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
    # A server shutting down (or still starting) answers while its model is not loaded.
    if "unknown model" in message or "has no available versions" in message or "is not ready" in message:
        return True
    return any(code in status for code in _TRANSIENT) and "not a decodable image" not in message


class RemoteEncoder:
    """`encode(per_request)` like VisionEncoder's, served by encoder servers over gRPC."""

    def __init__(self, urls: list[str], config: ModelConfig, chunk_tokens: int = 1024, timeout_s: float = 30.0,
                 same_encoder_wait_s: float = 3.0, chunk_timeout_s: float = 10.0, workers: int = 8,
                 shared_memory: bool = False, shm_region_mib: float = 64):
        if not urls:
            raise ValueError("remote encoder mode needs at least one encoder URL (qwen3vl-serve --encoder-url)")
        self.ring = HashRing(urls)
        self.config, self.dtype, self.chunk_tokens = config, config.dtype, chunk_tokens
        self.timeout_s, self.same_encoder_wait_s, self.chunk_timeout_s = timeout_s, same_encoder_wait_s, chunk_timeout_s
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="qwen3vl-fetch")
        # Same-host encoders write the bulk straight into a shared-memory region of ours (shm.py).
        # Per encoder, falls back to gRPC for good when it cannot see the region (another host).
        self.shm, self.shm_ok = shared_memory, {}
        self.regions = shm.RegionPool(config.visual_hidden_size, config.deepstack_layers, self.dtype,
                                      max_bytes=int(shm_region_mib * 2**20), keep=workers)
        self.all_clients: list = []  # every thread's gRPC clients, for close()
        self.wire_dtype = contract.TRITON_DTYPE[str(self.dtype).removeprefix("torch.")].removeprefix("TYPE_")
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
        t = ImageTransfer(image, hashlib.sha256(image).digest())  # hashed once: a large file is not free
        key = t.digest.hex()
        order = self.ring.order(key)
        errors: dict[str, str] = {}
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        url = order[0]
        # Name the image by digest first (no upload: a repeat, a resume); the file goes only when
        # that encoder lacks it (new image, restarted or different encoder): one round trip more.
        by_digest = True
        while True:
            try:
                if by_digest and self._shm_usable(url, t):
                    self._through_shm(url, t, deadline)
                if not t.complete:
                    self._through_grpc(url, t, deadline, by_digest)
                    by_digest = True  # that encoder has it now
                if t.complete:
                    t.stats.transfer_seconds = time.perf_counter() - started
                    return t.buf.features(self.dtype), t.stats
            except EncoderRejected as e:
                if by_digest and NOT_CACHED in str(e):
                    by_digest = False
                    continue
                raise EncoderRejected(f"images[{index}]: {e}") from None
            except Exception as e:  # noqa: BLE001 - any transport failure: resume here or elsewhere
                errors[url] = f"{type(e).__name__}: {e}"
                log.warning("image %s from %s failed after %d visual tokens: %s", key[:12], url, t.received, e)
                t.stats.resumes += bool(t.received)
                by_digest = True
                failed, url = url, self._next_encoder(url, order, deadline)
                if url is None:
                    detail = "; ".join(f"{u}: {m}" for u, m in errors.items())
                    raise EncoderUnavailable(f"images[{index}]: no encoder could serve it within {self.timeout_s:g} s "
                                             f"({t.received} visual tokens had arrived): {detail}") from None
                if url != failed:
                    t.stats.failovers.append(url)

    def _through_grpc(self, url: str, t: "ImageTransfer", deadline: float, by_digest: bool) -> None:
        """The rest of the image as gRPC chunks; with shared memory on, only a one-token first
        chunk (it tells the total, and uploads the file on a cache miss)."""
        probe = self.shm and self.shm_ok.get(url, True)
        for start, total, piece in self._stream(url, t.digest if by_digest else t.image, t.received,
                                                chunk_tokens=1 if probe else None, max_chunks=1 if probe else 0,
                                                first_timeout_s=max(1.0, deadline - time.monotonic()),
                                                by_digest=by_digest):
            t.buf = t.buf or Buffers.allocate(total, piece.image_grid_thw, self.config, piece.visual_embeds.dtype)
            t.buf.write(start, piece, url)
            t.stats.chunks += 1
            t.stats.bytes += piece.visual_embeds.nbytes + piece.deepstack_embeds.nbytes
        if t.buf is None or not (t.complete or probe):
            raise ConnectionError(f"the stream ended at visual token {t.received}")

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
                max_chunks: int = 0, shm_region: str | None = None,
                first_timeout_s: float | None = None, by_digest: bool = False) -> Iterator[tuple[int, int, VisualFeatures]]:
        """(chunk start, total tokens, chunk as numpy arrays) as the encoder sends them for
        `image` (the file, or its SHA-256 digest with `by_digest`); with `shm_region`, the
        arrays arrive empty and the chunk is in that region. The first chunk may take as long
        as an encode (`first_timeout_s`); later ones `chunk_timeout_s`."""
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
                    (MAX_CHUNKS, np.array([max_chunks], dtype=np.int32), "INT32"),
                    *([(SHM_REGION, np.array([shm_region.encode()], dtype=object), "BYTES")] if shm_region else [])):
                t = grpcclient.InferInput(name, list(value.shape), dtype)
                t.set_data_from_numpy(value)
                inputs.append(t)
            # A stream per request, not one kept open: an open stream holds up the encoder
            # server's shutdown until its exit timeout.
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            client.async_stream_infer("qwen3_encoder", inputs, enable_empty_final_response=True)
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
                    wire = result.get_output(contract.VISUAL_EMBEDS).datatype
                    if wire != self.wire_dtype:
                        raise EncoderRejected(f"encoder {url} sends {wire} tensors but this server runs "
                                              f"{self.dtype}: start both with the same --dtype")
                    yield (int(result.as_numpy(CHUNK_START)[0]), int(result.as_numpy(TOTAL_TOKENS)[0]),
                           VisualFeatures(result.as_numpy(contract.VISUAL_EMBEDS),
                                          result.as_numpy(contract.DEEPSTACK_EMBEDS),
                                          result.as_numpy(contract.IMAGE_GRID_THW)))
                if finished:
                    return
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            except Exception:  # noqa: BLE001 - a dead connection
                finished = False
            if not finished:  # broken, refused or abandoned: the next fetch reconnects
                self._drop_client(url)

    def _client(self, url: str):
        """This thread's gRPC client for `url`, kept between fetches: a new channel per request
        costs a connection setup that dwarfs a small chunk."""
        import tritonclient.grpc as grpcclient

        clients = self.clients.__dict__.setdefault("by_url", {})
        if url not in clients:
            clients[url] = grpcclient.InferenceServerClient(url)
            with self.lock:
                self.all_clients.append(clients[url])
        return clients[url]

    def _drop_client(self, url: str) -> None:
        client = self.clients.__dict__.get("by_url", {}).pop(url, None)
        if client is not None:
            with self.lock:
                if client in self.all_clients:  # not already taken by close()
                    self.all_clients.remove(client)
            _close(client)

    # -- same host: the encoder writes into our shared memory
    def _shm_usable(self, url: str, t: "ImageTransfer") -> bool:
        """Shared memory for the rest of this image: on, not failed for this encoder, and the
        size known (a first chunk arrived) or a region at hand to ask with."""
        if not self.shm or not self.shm_ok.get(url, True) or t.complete:
            return False
        return t.buf is not None or self.regions.has_idle()

    def _through_shm(self, url: str, t: "ImageTransfer", deadline: float) -> None:
        """The rest of the image, one response per region-full, written by the encoder model
        straight into a region of ours. A whole image in one response is not copied: the region
        becomes its tensors. Returns early, leaving the rest to gRPC, when the encoder cannot
        reach the region (another host)."""
        while not t.complete:
            try:
                # Sized for the whole image, so that the next one of its size comes in one piece.
                region = self.regions.take(t.buf.total if t.buf else None)
            except LookupError:  # another fetch took the last idle region: a gRPC probe tells the size
                return
            except OSError as e:  # e.g. /dev/shm full: this image goes on over gRPC
                log.warning("no shared-memory region for %d visual tokens, using gRPC: %s", t.buf.total, e)
                return
            resume_from = t.received
            try:
                pieces = list(self._stream(url, t.digest, resume_from, chunk_tokens=region.tokens, max_chunks=1,
                                           shm_region=region.name, by_digest=True,
                                           first_timeout_s=max(1.0, deadline - time.monotonic())))
            except EncoderRejected as e:  # it answered: it will not write into the region now
                self.regions.give_back(region)
                if shm.UNAVAILABLE not in str(e):
                    raise
                log.warning("shared-memory transfer from %s unavailable, using gRPC: %s", url, e)
                self.shm_ok[url] = False
                return
            except BaseException:
                # Timed out or cut off: the encoder may still write into it later. Never reuse it.
                region.close()
                raise
            if len(pieces) != 1 or pieces[0][0] != resume_from:
                region.close()
                raise RuntimeError(f"shared-memory transfer from {url} returned {len(pieces)} responses")
            _, total, piece = pieces[0]
            n = min(region.tokens, total - resume_from)
            try:
                if t.buf is None and n == total:
                    t.buf = Buffers.filled(self.regions.lend(region, n, piece.image_grid_thw))
                else:
                    t.buf = t.buf or Buffers.allocate(total, piece.image_grid_thw, self.config,
                                                      shm.numpy_dtype(self.dtype))
                    t.buf.write(resume_from, region.read(n, piece.image_grid_thw)[0], url)
                    self.regions.give_back(region)
            except Exception:
                region.close()
                raise
            t.stats.shm_bytes += region.token_bytes * n
            t.stats.chunks += 1

    def close(self) -> None:
        """Free the shared-memory regions and close the gRPC clients."""
        self.regions.close()
        with self.lock:
            clients, self.all_clients = self.all_clients, []
        for client in clients:
            _close(client)
        self.pool.shutdown(wait=False)


@dataclass
class ImageTransfer:
    """One image being fetched; what has arrived survives a failed attempt."""
    image: bytes
    digest: bytes
    stats: TransferStats = field(default_factory=TransferStats)
    buf: "Buffers | None" = None  # allocated at the first response, filled in place

    @property
    def received(self) -> int:
        return self.buf.received if self.buf else 0

    @property
    def complete(self) -> bool:
        return self.buf is not None and self.buf.complete


def _close(client) -> None:
    """Cancel what is in flight on the client's stream and close its channel."""
    try:
        client.stop_stream(cancel_requests=True)
        client.close()
    except Exception:  # noqa: BLE001 - closing a dead connection
        pass


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
    def allocate(cls, total: int, grids, config: ModelConfig, dtype: np.dtype) -> "Buffers":
        h = config.visual_hidden_size
        return cls(np.empty((total, h), dtype), np.empty((config.deepstack_layers, total, h), dtype),
                   np.array(grids, dtype=np.int64))

    @classmethod
    def filled(cls, features: VisualFeatures) -> "Buffers":
        """A whole image that arrived in one piece, kept as it is."""
        buf = cls(features.visual_embeds, features.deepstack_embeds, np.array(features.image_grid_thw, dtype=np.int64))
        buf.received = buf.total
        return buf

    @property
    def total(self) -> int:
        return self.embeds.shape[0]

    @property
    def complete(self) -> bool:
        return self.received == self.total

    def write(self, start: int, piece: VisualFeatures, url: str) -> None:
        n = piece.visual_embeds.shape[0]
        if start != self.received or start + n > self.total:
            raise RuntimeError(f"encoder {url} sent visual tokens [{start}, {start + n}), expected from {self.received}")
        if piece.visual_embeds.shape[1:] != self.embeds.shape[1:] or piece.deepstack_embeds.shape[0] != self.deepstack.shape[0]:
            raise RuntimeError(f"encoder {url} sent tensors of shape {piece.visual_embeds.shape} and "
                               f"{piece.deepstack_embeds.shape}; this server's model expects [N, {self.embeds.shape[1]}] "
                               f"and [{self.deepstack.shape[0]}, N, {self.embeds.shape[1]}]")
        _copy(self.embeds[start:start + n], piece.visual_embeds)
        _copy(self.deepstack[:, start:start + n], piece.deepstack_embeds)
        self.received += n

    def features(self, dtype: torch.dtype) -> VisualFeatures:
        return VisualFeatures(_torch(self.embeds, dtype), _torch(self.deepstack, dtype), torch.from_numpy(self.grids))


_SAME_SIZE_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src bit for bit, through torch's multi-threaded copy (numpy's is one thread).
    Both are viewed as integers of the same width: torch has no ml_dtypes.bfloat16."""
    as_int = _SAME_SIZE_INT[dst.itemsize]
    with warnings.catch_warnings():  # src may be a read-only gRPC buffer: it is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(np.asarray(src).view(as_int))
    torch.from_numpy(dst.view(as_int)).copy_(source)


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
