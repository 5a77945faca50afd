"""The engine's thread: runs requests one after another, so a decoupled Triton model's execute()
returns at once and responses stream from here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InvalidInput
from ..jobs import JobThread
from ..model.vision import VisualFeatures
from .engine import Engine, Step
from .sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request for the worker: what to generate and where its steps go."""
    text: str
    features: VisualFeatures
    params: SamplingParams
    emit: Callable[[Step], None]
    fail: Callable[[Exception], None]
    is_cancelled: Callable[[], bool] = field(default=lambda: False)


class Worker(JobThread[Job]):
    """Runs jobs one after another on a background thread, so a decoupled Triton model's
    execute() returns at once and responses stream from here."""

    def __init__(self, engine: Engine):
        self.engine = engine
        super().__init__("qwen3vl-engine")

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self._generate(job)
            except Exception:  # noqa: BLE001 - a reply that cannot be sent must not stop the worker
                log.exception("could not deliver a response")

    def _generate(self, job: Job) -> None:
        try:
            if job.is_cancelled():
                job.emit(Step([], "", "cancelled"))
                return
            for step in self.engine.generate(job.text, job.features, job.params, job.is_cancelled):
                job.emit(step)
        except Exception as e:  # noqa: BLE001 - every failure goes back to its request
            if not isinstance(e, (InvalidInput, ValueError)):
                log.exception("generation failed")
            job.fail(e)
