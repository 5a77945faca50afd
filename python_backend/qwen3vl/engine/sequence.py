"""A request inside the engine: its prompt, sampling state, KV blocks and progress."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..features import VisualFeatures
from ..model.prompt import Prompt
from .detokenize import IncrementalDetokenizer
from .sampling import SamplingParams
from .stop import StopStrings
from .structured import GrammarState, StructuredOutputs


class Status(enum.Enum):
    WAITING = "waiting"    # queued, no KV blocks yet
    RUNNING = "running"    # has its blocks; prefilling (maybe in chunks) or decoding
    FINISHED = "finished"


@dataclass
class Step:
    """One streamed piece: new token ids, the text they complete, and (last step) why it ended."""
    token_ids: list[int]
    text: str
    finish_reason: str = ""  # "", "stop", "length" or "cancelled"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """prompt.input_ids [T] and positions [3, T]; features [N, H] / [L, N, H] for the prompt's
    N visual tokens, in prompt order. The prompt's KV and the generated tokens' go into
    `block_table`; tokens [0, num_computed) have KV in the cache.

    State only: where its outputs go and how to ask whether its client has gone belong to
    whoever drives the engine (engine/worker.py for the served model)."""
    prompt: Prompt
    features: VisualFeatures
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None     # own RNG: sampled text does not depend on neighbours
    block_keys: list[bytes] = field(default_factory=list)
    request_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    admitted: float = 0.0        # time.monotonic() when it joined the running batch (queue time)

    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0          # prompt tokens restored from the prefix cache
    cancel_requested: bool = False  # set from any thread; the engine drops it at its next step
    finish_reason: str = ""
    structured: StructuredOutputs | None = None  # structured output asked for
    grammar: GrammarState | None = None  # its grammar: set by `Engine.add` (compiled off the engine thread)

    def __post_init__(self):
        mask = self.prompt.visual_mask.numpy()
        # visual_rows_before[i]: how many visual tokens precede prompt token i ([T + 1]), so a
        # chunk [s, e) takes rows [visual_rows_before[s], visual_rows_before[e]) of the features.
        self.visual_rows_before = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
        self.stops = StopStrings(self.params.stop)  # the answer's text, held back where a stop string may begin

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.input_ids)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def max_tokens_total(self) -> int:
        """Prompt plus every token it may generate: what its blocks are reserved for."""
        return self.prompt_len + self.params.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def ready(self) -> bool:
        """Whether it may be scheduled: no grammar, or its grammar compiled."""
        return self.structured is None or (self.grammar is not None and self.grammar.ready)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
