"""The scheduler: which sequences run in the next step, and how many tokens each.

Continuous batching with chunked prefill mixed into decode (Sarathi-Serve; vLLM V1's token
budget): every running sequence that has finished its prefill gets its one decode token; the
rest of the step's budget (`max_num_batched_tokens`) goes to prefill chunks, first of the
sequences already prefilling, then of new ones admitted in arrival order while there are
`max_num_seqs` slots and KV blocks. Admission reserves a sequence's blocks for its prompt and
every token it may generate (mini-sglang, TensorRT-LLM's GUARANTEED_NO_EVICT), so a running
sequence is never preempted; a sequence that does not fit waits at the head of the queue.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ..errors import InvalidInput
from ..settings import ServingConfig
from .block_manager import BlockManager, NoRoom
from .sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int       # first token of this step's chunk (num_computed)
    num_tokens: int  # 1 for a decode

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """Whether this step ends with a token to sample: a decode, or a prompt's last chunk."""
        return self.end >= self.seq.prompt_len


class Scheduler:
    def __init__(self, settings: ServingConfig, blocks: BlockManager):
        self.settings, self.blocks = settings, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. Raises InvalidInput if it could never fit in the KV pool."""
        need = self.blocks.blocks_for(seq.max_tokens_total)
        if need > self.blocks.num_blocks:
            raise InvalidInput(f"prompt ({seq.prompt_len} tokens) + max_tokens ({seq.params.max_tokens}) needs "
                               f"{need} KV blocks of {self.blocks.block_size} tokens; the KV cache has "
                               f"{self.blocks.num_blocks} in all (raise --kv-cache-mb or lower max_tokens)")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.settings.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        for seq in self.running:  # decodes first: a long prompt never stalls running streams
            if not seq.prefilling:
                out.append(ScheduledSeq(seq, seq.num_tokens - 1, 1))
                budget -= 1
        for seq in self.running:  # prompts already in progress, in admission order
            if seq.prefilling and budget > 0:
                n = self._chunk(seq, budget)
                out.append(ScheduledSeq(seq, seq.num_computed, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.settings.max_num_seqs:
            # a sequence whose grammar is still compiling (structured output) lets later ones by
            seq = next((s for s in self.waiting if s.ready), None)
            if seq is None:
                break
            try:
                seq.block_table, seq.num_cached = self.blocks.allocate(
                    seq.block_keys, seq.max_tokens_total, max_cached_tokens=seq.prompt_len - 1)
            except NoRoom:
                break  # first come, first served: later arrivals wait behind it
            self.waiting.remove(seq)
            seq.status, seq.num_computed = Status.RUNNING, seq.num_cached
            seq.admitted = time.monotonic()
            self.running.append(seq)
            n = self._chunk(seq, budget)
            out.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n
        return out

    def _chunk(self, seq: Sequence, budget: int) -> int:
        remaining = seq.prompt_len - seq.num_computed
        return remaining if not self.settings.enable_chunked_prefill else min(remaining, budget)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out (done, cancelled or failed) and give its blocks back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.block_table)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.block_table = []
        seq.status, seq.finish_reason = Status.FINISHED, reason
