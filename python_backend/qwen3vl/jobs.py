"""A job queue drained by one background thread: how the decoupled shells hand work off so
that execute() returns at once (the engine's decode loop, the encoder's batcher, its metric updates)."""

from __future__ import annotations

import queue
import threading
from typing import Generic, TypeVar

J = TypeVar("J")


class JobThread(Generic[J]):
    """Subclasses implement `_run`, reading `self.jobs` until it yields None (stop)."""

    stop_timeout_s = 30.0  # how long stop() waits for the job in hand to end

    def __init__(self, name: str):
        self.jobs: queue.Queue[J | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, job: J) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=self.stop_timeout_s)

    def _run(self) -> None:
        raise NotImplementedError
