"""The served engine's threads (after vllm_backend's model.py): `execute()` validates and
enqueues, one engine thread runs steps, one response thread sends (each send is an IPC to the
server) and asks `is_cancelled()` after a send, at most every RUNNING_CANCEL_CHECK_S per
request. FINAL always goes out: on finish, on cancel, on error, and on shutdown."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from ..errors import Unavailable
from ..jobs import JobThread
from .engine import Engine
from .sequence import Sequence, Status, Step

log = logging.getLogger(__name__)

# How often the engine asks a waiting request whether its client has gone (an IPC each);
# running ones are asked by the response thread after a send, at most this often each (asking
# after every token doubled the IPCs of a streamed token; a cancel by token is immediate).
WAITING_CANCEL_CHECK_S = 0.25
RUNNING_CANCEL_CHECK_S = 0.05
STATS_INTERVAL_S = 0.5


class ResponseThread(JobThread[tuple[Sequence, "Step | Exception"]]):
    """Sends each sequence's steps through its callbacks, in order. When it falls behind, it
    merges a sequence's queued non-final steps into one response (fewer IPCs)."""

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
            for seq, item in _coalesce(items):
                self._send(seq, item)
            if stop:
                return

    def call(self, fn) -> None:
        """Run `fn()` on this thread, in order with the responses (metrics: each is an IPC)."""
        self.submit((None, fn))

    @staticmethod
    def _send(seq: Sequence | None, item) -> None:
        try:
            if seq is None:
                item()
                return
            if isinstance(item, Exception):
                seq.fail(item)
                return
            seq.emit(item)
            now = time.monotonic()
            if not item.finish_reason and now - seq.last_cancel_check >= RUNNING_CANCEL_CHECK_S:
                seq.last_cancel_check = now
                if seq.is_cancelled():
                    seq.cancel_requested = True  # the engine drops it at its next step
        except Exception:  # noqa: BLE001 - a reply that cannot be sent must not stop the others
            log.exception("could not deliver a response")
            if seq is not None:
                seq.cancel_requested = True


def _coalesce(items: list) -> list:
    """Merge consecutive queued steps of one sequence (none final but maybe the last)."""
    out: list = []
    pending: dict[int, int] = {}  # request id -> index in out of its open (non-final) step
    for seq, item in items:
        if seq is None:  # a call, not a response
            out.append((seq, item))
            continue
        i = pending.get(seq.request_id)
        if i is not None and isinstance(item, Step):
            prev = out[i][1]
            out[i] = (seq, Step(prev.token_ids + item.token_ids, prev.text + item.text, item.finish_reason))
        else:
            out.append((seq, item))
            i = len(out) - 1
        if isinstance(out[i][1], Step) and not out[i][1].finish_reason:
            pending[seq.request_id] = i
        else:
            pending.pop(seq.request_id, None)
    return out


class EngineLoop:
    """The engine thread: takes new sequences from `submit`, runs steps while there is work.

    Overload: at most `max_queued` requests wait for a slot (submitted, not yet running); one
    more is refused at once with Unavailable, so a burst costs a bounded queue, never unbounded
    memory. With `max_queue_time_s`, a request still waiting after that long fails (Unavailable)."""

    def __init__(self, engine: Engine, max_queued: int = 0, max_queue_time_s: float = 0.0):
        self.engine = engine
        self.max_queued, self.max_queue_time_s = max_queued, max_queue_time_s
        # Called with engine.stats() on the response thread (gauges: each set is an IPC), at
        # most every STATS_INTERVAL_S while busy, and when the engine goes idle.
        self.on_stats: Callable[[dict], None] | None = None
        self.last_stats = 0.0
        self.responses = ResponseThread()
        engine.deliver = lambda seq, item: self.responses.submit((seq, item))
        self.inbox: queue.Queue[Sequence | None] = queue.Queue()
        self.running = True
        self.last_cancel_check = 0.0
        self.thread = threading.Thread(target=self._run, name="qwen3vl-engine", daemon=True)
        self.thread.start()

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence for the engine thread. Raises Unavailable when `max_queued` are waiting."""
        waiting = self.num_waiting()
        if self.max_queued and waiting >= self.max_queued:
            raise Unavailable(f"server busy: {waiting} requests are waiting for a slot "
                              f"(max_queued_requests {self.max_queued}); retry later")
        self.inbox.put(seq)

    def num_waiting(self) -> int:
        """Submitted and not yet running (read from another thread: a snapshot)."""
        return self.inbox.qsize() + len(self.engine.scheduler.waiting)

    def _admit(self, block: bool) -> bool:
        """Move new sequences into the engine; False once stopped."""
        while True:
            try:
                seq = self.inbox.get(timeout=None) if block else self.inbox.get_nowait()
            except queue.Empty:
                return True
            if seq is None:
                return False
            block = False
            try:
                self.engine.add(seq)
            except Exception as e:  # noqa: BLE001 - it can never fit: it fails alone
                seq.status = Status.FINISHED
                self.responses.submit((seq, e))

    def _run(self) -> None:
        try:
            while self._admit(block=not self.engine.has_work()):
                self._check_waiting()
                try:
                    self.engine.step()
                except Exception as e:  # noqa: BLE001 - a bug outside the forward: fail everything in flight
                    log.exception("engine loop failed")
                    self.engine.abort_all(RuntimeError(f"engine failure: {type(e).__name__}: {e}"))
                self._report_stats(idle=not self.engine.has_work())
        finally:
            self.engine.abort_all(RuntimeError("the model is shutting down"))

    def _report_stats(self, idle: bool) -> None:
        now = time.monotonic()
        if self.on_stats is None or (not idle and now - self.last_stats < STATS_INTERVAL_S):
            return
        self.last_stats = now
        stats, report = self.engine.stats(), self.on_stats
        self.responses.call(lambda: report(stats))

    def _check_waiting(self) -> None:
        now = time.monotonic()
        if now - self.last_cancel_check < WAITING_CANCEL_CHECK_S:
            return
        self.last_cancel_check = now
        for seq in list(self.engine.scheduler.waiting):
            if self.max_queue_time_s and now - seq.arrival > self.max_queue_time_s:
                self.engine.fail_waiting(seq, Unavailable(
                    f"waited {now - seq.arrival:.1f} s for a slot (max_queue_time_s {self.max_queue_time_s:g}); "
                    "the server is busy, retry later"))
                continue
            try:
                if seq.is_cancelled():
                    seq.cancel_requested = True
            except Exception:  # noqa: BLE001 - a sender that is gone
                seq.cancel_requested = True

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)
        self.responses.stop()
