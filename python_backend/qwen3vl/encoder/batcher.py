"""EncodeBatcher: requests that arrive while the vision tower is busy share its next forward."""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from ..features import VisualFeatures
from ..jobs import JobThread

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """What the batcher drives: the local VisionEncoder or the language server's RemoteEncoder."""
    last: object  # a report of the last encode() call, handed to on_batch

    def encode(self, per_request: list[list]) -> list[VisualFeatures | Exception]: ...


@dataclass
class EncodeJob:
    images: list  # bytes or CachedImage, in prompt order
    done: Callable[["VisualFeatures | Exception"], None]


class EncodeBatcher(JobThread[EncodeJob]):
    """Collects the requests that arrive while the tower is busy (or within `max_delay_s` of
    the first) and encodes them in one forward, up to `max_images` images per forward.
    `on_batch(report, seconds)` describes each batch (metrics)."""

    def __init__(self, encoder: Encoder, max_delay_s: float = 0.0, max_images: int = 64,
                 on_batch: Callable[[object | None, float], None] | None = None):
        self.encoder, self.max_delay_s, self.max_images = encoder, max_delay_s, max_images
        self.on_batch = on_batch or (lambda *_: None)
        super().__init__("qwen3vl-encoder")

    def _next_batch(self) -> list[EncodeJob] | None:
        first = self.jobs.get()
        if first is None:
            return None
        batch, images = [first], len(first.images)
        deadline = time.monotonic() + self.max_delay_s
        while images < self.max_images:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self.jobs.put(None)
                break
            batch.append(job)
            images += len(job.images)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            results = self._encode(batch)
            if len(batch) > 1 and all(isinstance(r, EncoderFailure) for r in results):
                # The shared forward failed: run each request alone, so that only the request
                # that causes the failure fails.
                log.warning("a vision forward of %d requests failed; running each alone", len(batch))
                results = [self._encode([job])[0] for job in batch]
            for job, result in zip(batch, results):
                try:
                    job.done(result)
                except Exception:  # noqa: BLE001 - one failed reply must not stop the others
                    log.exception("encoder reply failed")

    def _encode(self, batch: list[EncodeJob]) -> list:
        """One encode call's per-request results (an EncoderFailure each if it raised)."""
        start = time.perf_counter()
        report = None
        try:
            results = self.encoder.encode([job.images for job in batch])
            report = self.encoder.last
        except Exception as e:  # noqa: BLE001 - a failed forward fails its requests only
            log.exception("vision forward failed")
            results = [EncoderFailure(f"vision encoder failed: {type(e).__name__}: {e}")] * len(batch)
        try:  # report None: the forward failed, only its time is known
            self.on_batch(report, time.perf_counter() - start)
        except Exception:  # noqa: BLE001 - metrics must never stop the encoder
            log.exception("encoder batch report failed")
        return results


class EncoderFailure(RuntimeError):
    """The vision forward (or the fetch from encoder servers) raised."""
