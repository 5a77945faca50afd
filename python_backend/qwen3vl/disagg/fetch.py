"""One media file's (an image's or a video's) E->L transfer on the language server: assembled
in place from chunks, resumed after a broken connection or a dead encoder, over gRPC or
through shared memory.

`MediaFetcher.fetch` fetches each image or video from the encoder its content hash routes to,
writes chunks in place into preallocated tensors, and after a failure asks only for the chunks
it lacks: from the same encoder if it is back within `encoder_same_wait_s`, else from the next
live one on the ring (which re-encodes on a cache miss). It names the file by digest first
(no upload on a repeat or a resume) and sends the file only when the encoder lacks it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..encoder.video import VideoFile
from ..errors import NotCached, SharedMemoryUnavailable, Unavailable
from ..features import VisualFeatures, WireFeatures
from ..model.config import ModelConfig
from ..settings import ServingConfig
from ..tensors import copy_bits, numpy_dtype, to_torch
from . import shm
from .routing import HashRing, next_encoder
from .stream import EncoderClients, EncoderRejected, request_chunks

log = logging.getLogger(__name__)


@dataclass
class TransferStats:
    """What one `RemoteEncoder.encode` call, or one image's fetch, moved (metrics)."""
    requests: int = 0
    images: int = 0
    chunks: int = 0
    bytes: int = 0
    resumes: int = 0
    shm_bytes: int = 0
    seconds: float = 0.0           # the whole encode() call
    transfer_seconds: float = 0.0  # per image, from the first request to the assembled tensors, summed
    media_transfer_seconds: list[float] = field(default_factory=list)  # the same, each file's
    failovers: list[str] = field(default_factory=list)

    def add(self, other: "TransferStats") -> None:
        self.transfer_seconds += other.transfer_seconds
        self.media_transfer_seconds += other.media_transfer_seconds
        self.chunks += other.chunks
        self.bytes += other.bytes
        self.shm_bytes += other.shm_bytes
        self.resumes += other.resumes
        self.failovers += other.failovers


class Buffers:
    """One image's (or video's) E->L tensors being assembled in place from chunks (numpy, wire
    dtype): visual_embeds [N, H], deepstack_embeds [L, N, H], grids [1, 3] (a video: [0, 3], with
    video_grids [1, 3] and its frame groups' timestamps, float64)."""

    def __init__(self, visual_embeds: np.ndarray, deepstack_embeds: np.ndarray, grids: np.ndarray,
                 video_grids=None, timestamps=None):
        self.visual_embeds, self.deepstack_embeds, self.grids = visual_embeds, deepstack_embeds, grids
        self.video_grids = np.empty((0, 3), np.int64) if video_grids is None else np.array(video_grids, dtype=np.int64)
        self.timestamps = np.empty(0, np.float64) if timestamps is None else np.array(timestamps, dtype=np.float64)
        self.received = 0

    @classmethod
    def allocate(cls, total: int, grids, config: ModelConfig, dtype: np.dtype, video_grids=None,
                 timestamps=None) -> "Buffers":
        h = config.visual_hidden_size
        return cls(np.empty((total, h), dtype), np.empty((config.deepstack_layers, total, h), dtype),
                   np.array(grids, dtype=np.int64), video_grids, timestamps)

    @classmethod
    def filled(cls, features: WireFeatures) -> "Buffers":
        """A whole image that arrived in one piece, kept as it is."""
        buf = cls(features.visual_embeds, features.deepstack_embeds, np.array(features.image_grid_thw, dtype=np.int64),
                  features.video_grid_thw, features.video_timestamps)
        buf.received = buf.total
        return buf

    @property
    def total(self) -> int:
        return self.visual_embeds.shape[0]

    @property
    def complete(self) -> bool:
        return self.received == self.total

    def write(self, start: int, piece: WireFeatures, url: str) -> None:
        """Copy a chunk in, bit for bit. Raises RuntimeError (a faulty encoder: the fetch moves
        on) when it is not the next chunk or its shapes do not fit this server's model."""
        n = piece.visual_embeds.shape[0]
        if start != self.received or start + n > self.total:
            raise RuntimeError(f"encoder {url} sent visual tokens [{start}, {start + n}), expected from {self.received}")
        h, layers = self.visual_embeds.shape[1], self.deepstack_embeds.shape[0]
        if piece.visual_embeds.shape[1:] != (h,) or piece.deepstack_embeds.shape[0] != layers:
            raise RuntimeError(f"encoder {url} sent tensors of shape {piece.visual_embeds.shape} and "
                               f"{piece.deepstack_embeds.shape}; this server's model expects [N, {h}] "
                               f"and [{layers}, N, {h}]")
        copy_bits(self.visual_embeds[start:start + n], piece.visual_embeds)
        copy_bits(self.deepstack_embeds[:, start:start + n], piece.deepstack_embeds)
        self.received += n

    def features(self, dtype: torch.dtype) -> VisualFeatures:
        return VisualFeatures(to_torch(self.visual_embeds, dtype), to_torch(self.deepstack_embeds, dtype),
                              torch.from_numpy(self.grids),
                              torch.from_numpy(self.video_grids), torch.from_numpy(self.timestamps))


@dataclass
class MediaTransfer:
    """One media file (an image or a video) being fetched; what has arrived survives a failed attempt."""
    data: bytes
    digest: bytes
    stats: TransferStats = field(default_factory=TransferStats)
    video_fps: float | None = None  # a video: the rate it is sampled at (part of the encoder's cache key)
    buf: Buffers | None = None  # allocated at the first response, filled in place

    @property
    def received(self) -> int:
        return self.buf.received if self.buf else 0

    @property
    def complete(self) -> bool:
        return self.buf is not None and self.buf.complete


# Between two chunks of one response stream (the first may take as long as an encode: it
# gets what is left of encoder_timeout_s).
CHUNK_TIMEOUT_S = 10.0


class MediaFetcher:
    """Fetches single media files, images and videos (from any number of threads), for a RemoteEncoder."""

    def __init__(self, ring: HashRing, config: ModelConfig, settings: ServingConfig, clients: EncoderClients,
                 regions: shm.RegionPool, wire_dtype: str):
        self.ring, self.config, self.settings = ring, config, settings
        self.clients, self.regions, self.wire_dtype = clients, regions, wire_dtype
        # Per encoder: False once it could not write into our regions (another host): gRPC from then on.
        self.shm_ok: dict[str, bool] = {}

    def fetch(self, media: "bytes | VideoFile", index: int = 0) -> tuple[VisualFeatures, TransferStats]:
        """`images[index]`'s (or a VideoFile's) features. Raises EncoderRejected (bad image) or
        Unavailable (no encoder could serve it within encoder_timeout_s; the message lists each one's
        failure). A video travels like an image: named by its file's digest (with its sampling
        rate), routed by that digest, in chunks, resumed."""
        name = f"images[{index}]"
        if isinstance(media, VideoFile):
            t = MediaTransfer(media.data, hashlib.sha256(media.data).digest(), video_fps=media.fps)
            name = f"videos[{media.index}]"
        else:
            t = MediaTransfer(media, hashlib.sha256(media).digest())  # hashed once: a large file is not free
        key = t.digest.hex()
        order = self.ring.order(key)
        errors: dict[str, str] = {}
        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.encoder_timeout_s
        url = order[0]
        by_digest = True  # the file goes only when that encoder lacks it: one round trip more
        while True:
            try:
                if by_digest and self._shm_usable(url, t):
                    self._through_shm(url, t, deadline)
                if not t.complete:
                    self._through_grpc(url, t, deadline, by_digest)
                    by_digest = True  # that encoder has it now
                if t.complete:
                    t.stats.transfer_seconds = time.perf_counter() - started
                    t.stats.media_transfer_seconds = [t.stats.transfer_seconds]
                    return t.buf.features(self.config.dtype), t.stats
            except NotCached:
                if not by_digest:  # it says so of the file itself: a broken encoder
                    raise EncoderRejected(f"{name}: encoder {url} did not cache the file it was sent") from None
                by_digest = False
            except EncoderRejected as e:
                raise EncoderRejected(f"{name}: {e}") from None
            except Exception as e:  # noqa: BLE001 - any transport failure: resume here or elsewhere
                errors[url] = f"{type(e).__name__}: {e}"
                log.warning("image %s from %s failed after %d visual tokens: %s", key[:12], url, t.received, e)
                t.stats.resumes += bool(t.received)
                by_digest = True
                failed, url = url, next_encoder(url, order, deadline, self.settings.encoder_same_wait_s)
                if url is None:
                    detail = "; ".join(f"{u}: {m}" for u, m in errors.items())
                    raise Unavailable(f"{name}: no encoder could serve it within {self.settings.encoder_timeout_s:g} s "
                                      f"({t.received} visual tokens had arrived): {detail}") from None
                if url != failed:
                    t.stats.failovers.append(url)

    def _chunks(self, url: str, t: MediaTransfer, deadline: float, by_digest: bool, **kw):
        return request_chunks(self.clients, url, t.digest if by_digest else t.data, by_digest=by_digest,
                              resume_from=t.received, first_timeout_s=max(1.0, deadline - time.monotonic()),
                              chunk_timeout_s=CHUNK_TIMEOUT_S, wire_dtype=self.wire_dtype,
                              video_fps=t.video_fps, **kw)

    def _through_grpc(self, url: str, t: MediaTransfer, deadline: float, by_digest: bool) -> None:
        """The rest of the image as gRPC chunks; with shared memory on, only a one-token first
        chunk (it tells the total, and uploads the file on a cache miss)."""
        probe = self.settings.transfer_shared_memory and self.shm_ok.get(url, True)
        for start, total, piece in self._chunks(url, t, deadline, by_digest,
                                                chunk_tokens=1 if probe else self.settings.transfer_chunk_tokens,
                                                max_chunks=1 if probe else 0):
            t.buf = t.buf or Buffers.allocate(total, piece.image_grid_thw, self.config, piece.visual_embeds.dtype,
                                              piece.video_grid_thw, piece.video_timestamps)
            t.buf.write(start, piece, url)
            t.stats.chunks += 1
            t.stats.bytes += piece.nbytes
        if t.buf is None or not (t.complete or probe):
            raise ConnectionError(f"the stream ended at visual token {t.received}")

    def _shm_usable(self, url: str, t: MediaTransfer) -> bool:
        """Shared memory for the rest of this image: on, not failed for this encoder, and the
        size known (a first chunk arrived) or a region at hand to ask with."""
        if not self.settings.transfer_shared_memory or not self.shm_ok.get(url, True) or t.complete:
            return False
        return t.buf is not None or self.regions.has_idle()

    def _through_shm(self, url: str, t: MediaTransfer, deadline: float) -> None:
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
                pieces = list(self._chunks(url, t, deadline, True, chunk_tokens=region.tokens, max_chunks=1,
                                           shm_region=region.name))
            except SharedMemoryUnavailable as e:  # it answered: it will not write into the region now
                self.regions.give_back(region)
                log.warning("shared-memory transfer from %s unavailable, using gRPC: %s", url, e)
                self.shm_ok[url] = False
                return
            except (EncoderRejected, NotCached):  # it answered, and wrote nothing
                self.regions.give_back(region)
                raise
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
                    t.buf = Buffers.filled(replace(self.regions.lend(region, n, piece.image_grid_thw),
                                                   video_grid_thw=piece.video_grid_thw,
                                                   video_timestamps=piece.video_timestamps))
                else:
                    t.buf = t.buf or Buffers.allocate(total, piece.image_grid_thw, self.config,
                                                      numpy_dtype(self.config.dtype), piece.video_grid_thw,
                                                      piece.video_timestamps)
                    t.buf.write(resume_from, region.read(n, piece.image_grid_thw)[0], url)
                    self.regions.give_back(region)
            except Exception:
                region.close()
                raise
            t.stats.shm_bytes += region.token_bytes * n
            t.stats.chunks += 1
