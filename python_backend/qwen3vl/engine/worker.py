"""The served engine's threads (after vllm_backend's model.py); backend/language.py builds each
request's sequence and response stream, and engine.py only steps.

- The caller's thread (Triton's `execute()`): `EngineLoop.submit(seq, stream, is_cancelled)`
  queues a validated sequence with where its outputs go, or refuses it (Unavailable) when too
  many are waiting.
- The engine thread (`EngineLoop`): admits the queued sequences, asks each waiting one's
  `is_cancelled()` every WAITING_CANCEL_CHECK_S (and fails those past max_queue_time_s), runs
  `engine.step()`, and hands each step's outputs to the response thread: a request's steps and
  failure to its stream, prefill reports and (at most every STATS_INTERVAL_S, and when idle)
  the engine's gauges to `metrics`. It owns the map from request id to stream.
- The response thread (`ResponseThread`): sends (each send is an IPC to the server), merging a
  request's queued non-final steps when it falls behind, and after a send asks `is_cancelled()`,
  at most every RUNNING_CANCEL_CHECK_S per request; a cancel takes effect at the next step.

FINAL always goes out: on finish, on cancel, on error (a request that can never fit fails
alone), and on shutdown."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

from ..errors import Unavailable
from ..jobs import JobThread
from .engine import Engine, EngineOutputs, PrefillReport
from .sequence import Sequence, Status, Step

log = logging.getLogger(__name__)

# How often the engine asks a waiting request whether its client has gone (an IPC each);
# running ones are asked by the response thread after a send, at most this often each (asking
# after every token doubled the IPCs of a streamed token; a cancel by token is immediate).
WAITING_CANCEL_CHECK_S = 0.25
RUNNING_CANCEL_CHECK_S = 0.05
STATS_INTERVAL_S = 0.5


class OutputStream(Protocol):
    """Where one request's outputs go (backend/language.py's ResponseStream), called on the
    response thread, in order: `emit` for each step (the last has a finish_reason), or `fail`
    once instead of the rest."""

    def emit(self, step: Step) -> None: ...

    def fail(self, error: Exception) -> None: ...


class EngineMetrics(Protocol):
    """Where the engine's reports go, called on the response thread (each update is an IPC)."""

    def prefill(self, report: PrefillReport) -> None: ...

    def stats(self, stats: dict[str, int]) -> None: ...


@dataclass(eq=False)
class ServedRequest:
    """A sequence in the served engine, with where its outputs go and how to ask whether its
    client has gone (an IPC)."""
    seq: Sequence
    stream: OutputStream
    is_cancelled: Callable[[], bool]
    last_cancel_check: float = 0.0  # time.monotonic() when the response thread last asked

    @property
    def request_id(self) -> int:
        return self.seq.request_id

    def cancel(self) -> None:
        self.seq.cancel_requested = True  # the engine drops it at its next step


class ResponseThread(JobThread[tuple[ServedRequest | None, "Step | Exception | Callable[[], None]"]]):
    """Sends each request's steps through its stream, in order. When it falls behind, it merges
    a request's queued non-final steps into one response (fewer IPCs)."""

    def __init__(self):
        super().__init__("qwen3vl-responses")

    def _run(self) -> None:
        while (first := self.jobs.get()) is not None:
            items, stop = [first], False
            while True:
                try:
                    item = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                items.append(item)
            for request, item in _coalesce(items):
                self._send(request, item)
            if stop:
                return

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn()` on this thread, in order with the responses (metrics: each is an IPC)."""
        self.submit((None, fn))

    @staticmethod
    def _send(request: ServedRequest | None, item) -> None:
        try:
            if request is None:
                item()
                return
            if isinstance(item, Exception):
                request.stream.fail(item)
                return
            request.stream.emit(item)
            now = time.monotonic()
            if not item.finish_reason and now - request.last_cancel_check >= RUNNING_CANCEL_CHECK_S:
                request.last_cancel_check = now
                if request.is_cancelled():
                    request.cancel()
        except Exception:  # noqa: BLE001 - a reply that cannot be sent must not stop the others
            log.exception("could not deliver a response")
            if request is not None:
                request.cancel()


def _coalesce(items: list) -> list:
    """Merge consecutive queued steps of one request (none final but maybe the last)."""
    out: list = []
    pending: dict[int, int] = {}  # request id -> index in out of its open (non-final) step
    for request, item in items:
        if request is None:  # a call, not a response
            out.append((request, item))
            continue
        i = pending.get(request.request_id)
        if i is not None and isinstance(item, Step):
            prev = out[i][1]
            out[i] = (request, prev.then(item))
        else:
            out.append((request, item))
            i = len(out) - 1
        if isinstance(out[i][1], Step) and not out[i][1].finish_reason:
            pending[request.request_id] = i
        else:
            pending.pop(request.request_id, None)
    return out


class EngineLoop:
    """The engine thread: takes new requests from `submit`, runs steps while there is work, and
    hands their outputs to the response thread.

    Overload (the engine's settings): at most `max_queued_requests` wait for a slot (submitted,
    not yet running); one more is refused at once with Unavailable, so a burst costs a bounded
    queue, never unbounded memory. With `max_queue_time_s`, a request still waiting after that
    long fails (Unavailable)."""

    def __init__(self, engine: Engine, metrics: EngineMetrics | None = None):
        self.engine, self.metrics = engine, metrics
        self.max_queued = engine.settings.max_queued_requests
        self.max_queue_time_s = engine.settings.max_queue_time_s
        self.last_stats = 0.0
        self.responses = ResponseThread()
        self.inbox: queue.Queue[ServedRequest | None] = queue.Queue()
        # request id -> the request, from admission until its final output is handed over
        # (engine thread only; the response thread gets each request with its outputs).
        self.requests: dict[int, ServedRequest] = {}
        self.running = True
        self.last_cancel_check = 0.0
        self.thread = threading.Thread(target=self._run, name="qwen3vl-engine", daemon=True)
        self.thread.start()

    def submit(self, seq: Sequence, stream: OutputStream, is_cancelled: Callable[[], bool] = lambda: False) -> None:
        """Queue a sequence for the engine thread; its outputs go to `stream`. Raises
        Unavailable when `max_queued` are waiting."""
        waiting = self.num_waiting()
        if self.max_queued and waiting >= self.max_queued:
            raise Unavailable(f"server busy: {waiting} requests are waiting for a slot "
                              f"(max_queued_requests {self.max_queued}); retry later")
        self.inbox.put(ServedRequest(seq, stream, is_cancelled))

    def num_waiting(self) -> int:
        """Submitted and not yet running (read from another thread: a snapshot)."""
        return self.inbox.qsize() + len(self.engine.scheduler.waiting)

    def _admit(self, block: bool) -> bool:
        """Move new requests into the engine; False once stopped."""
        while True:
            try:
                request = self.inbox.get(timeout=None) if block else self.inbox.get_nowait()
            except queue.Empty:
                return True
            if request is None:
                return False
            block = False
            try:
                self.engine.add(request.seq)
            except Exception as e:  # noqa: BLE001 - it can never fit: it fails alone
                request.seq.status = Status.FINISHED
                self.responses.submit((request, e))
                continue
            self.requests[request.request_id] = request
            for follower in request.seq.followers:  # the request's other choices: the same stream
                self.requests[follower.request_id] = ServedRequest(follower, request.stream, request.is_cancelled)

    def _run(self) -> None:
        try:
            while self._admit(block=not self.engine.has_work()):
                self._check_waiting()
                try:
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - a bug outside the forward: fail everything in flight
                    log.exception("engine loop failed")
                    outputs = self.engine.abort_all(RuntimeError(f"engine failure: {type(e).__name__}: {e}"))
                self._hand_over(outputs)
                self._report_stats(idle=not self.engine.has_work())
        finally:
            self._hand_over(self.engine.abort_all(RuntimeError("the model is shutting down")))

    def _hand_over(self, outputs: EngineOutputs) -> None:
        """Queue outputs for the response thread: prefill reports first (a counter goes up
        before the response it counts), then each request's step, then the failures (a request
        with both: its step came first). A request's final output ends its entry in the map."""
        if self.metrics is not None:
            for report in outputs.prefills:
                self.responses.call(partial(self.metrics.prefill, report))
        for request_id, step in outputs.steps.items():
            request = self.requests.pop(request_id) if step.finish_reason else self.requests[request_id]
            self.responses.submit((request, step))
        for request_id, error in outputs.failures.items():
            self.responses.submit((self.requests.pop(request_id), error))

    def _report_stats(self, idle: bool) -> None:
        now = time.monotonic()
        if self.metrics is None or (not idle and now - self.last_stats < STATS_INTERVAL_S):
            return
        self.last_stats = now
        self.responses.call(partial(self.metrics.stats, self.engine.stats()))

    def _check_waiting(self) -> None:
        now = time.monotonic()
        if now - self.last_cancel_check < WAITING_CANCEL_CHECK_S:
            return
        self.last_cancel_check = now
        for seq in list(self.engine.scheduler.waiting):
            if self.max_queue_time_s and now - seq.arrival > self.max_queue_time_s:
                self._hand_over(self.engine.fail_waiting(seq, Unavailable(
                    f"waited {now - seq.arrival:.1f} s for a slot (max_queue_time_s {self.max_queue_time_s:g}); "
                    "the server is busy, retry later")))
                continue
            request = self.requests[seq.request_id]
            try:
                if request.is_cancelled():
                    request.cancel()
            except Exception:  # noqa: BLE001 - a sender that is gone
                request.cancel()

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)
        self.responses.stop()
