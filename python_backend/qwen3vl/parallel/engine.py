"""The language engine over a tensor-parallel group: what backend/language.py builds when
tensor_parallel_size > 1. The engine (scheduler, KV block tables, sampling) runs on rank 0
only, as in one process; its model runner broadcasts each step to the other ranks."""

from __future__ import annotations

import dataclasses

from ..engine.engine import Engine
from ..model.config import ModelConfig
from ..settings import ServingConfig
from .group import ParallelGroup


def parallel_engine(config: ModelConfig, settings: ServingConfig) -> tuple[Engine, ParallelGroup]:
    """(the engine on rank 0, its group), the workers started and loaded. Raises InvalidInput
    when the model does not split into tensor_parallel_size ranks, RuntimeError when a rank
    fails to start or load (every worker is ended then)."""
    group = ParallelGroup.start(config, settings)
    try:
        engine = Engine.from_checkpoint(dataclasses.replace(config, device=group.device), settings, parallel=group)
    except BaseException:
        group.stop()
        raise
    return engine, group
