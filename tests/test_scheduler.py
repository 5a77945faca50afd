"""The scheduler: decodes first, the rest of the token budget to prefill chunks, FIFO admission
under max_num_seqs and KV room, nothing preempted, a request that can never fit refused."""

from __future__ import annotations

import pytest
import torch

from qwen3vl.engine.block_manager import BlockManager
from qwen3vl.engine.detokenize import IncrementalDetokenizer
from qwen3vl.engine.sampling import SamplingParams
from qwen3vl.engine.scheduler import Scheduler
from qwen3vl.engine.sequence import Sequence, Status
from qwen3vl.errors import InvalidInput
from qwen3vl.features import VisualFeatures
from qwen3vl.model.prompt import Prompt
from qwen3vl.settings import ServingConfig

BS = 4


def seq(prompt_len: int, max_tokens: int = 4) -> Sequence:
    ids = torch.arange(prompt_len) + 10
    prompt = Prompt(ids, torch.arange(prompt_len).expand(3, -1), 0, torch.zeros(prompt_len, dtype=torch.bool), 0)
    features = VisualFeatures(torch.empty(0, 8), torch.empty(3, 0, 8), torch.empty(0, 3, dtype=torch.int64))
    return Sequence(prompt, features, SamplingParams(max_tokens=max_tokens), IncrementalDetokenizer(None))


def plan(batch):
    return [(s.seq, s.start, s.num_tokens) for s in batch]


def run(scheduler, batch):
    """What the engine does after a step: progress, and one token for those that sample."""
    for s in batch:
        s.seq.num_computed = s.end
        if s.samples:
            s.seq.output_ids.append(1)


def test_prompts_are_chunked_by_the_budget_and_decodes_go_first():
    sched = Scheduler(ServingConfig(max_num_seqs=8, max_num_batched_tokens=10), BlockManager(64, BS))
    a, b = seq(6), seq(12)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert plan(batch) == [(a, 0, 6), (b, 0, 4)]
    assert [s.samples for s in batch] == [True, False]
    run(sched, batch)
    batch = sched.schedule()
    assert plan(batch) == [(a, 6, 1), (b, 4, 8)]  # a decodes; b's prompt goes on
    run(sched, batch)
    assert plan(sched.schedule()) == [(a, 7, 1), (b, 12, 1)]


def test_without_chunking_a_prompt_runs_whole():
    sched = Scheduler(ServingConfig(max_num_batched_tokens=4, enable_chunked_prefill=False), BlockManager(64, BS))
    a = seq(30)
    sched.add(a)
    assert plan(sched.schedule()) == [(a, 0, 30)]


def test_max_num_seqs_and_kv_room_hold_requests_in_arrival_order():
    blocks = BlockManager(6, BS)  # 24 tokens
    sched = Scheduler(ServingConfig(max_num_seqs=2, max_num_batched_tokens=100), blocks)
    a, b, c, d = seq(8, 4), seq(4, 4), seq(2, 2), seq(2, 2)  # a: 3 blocks, b: 2, c and d: 1
    for s in (a, b, c, d):
        sched.add(s)
    assert plan(sched.schedule()) == [(a, 0, 8), (b, 0, 4)]
    assert list(sched.waiting) == [c, d] and blocks.num_free == 1
    sched.finish(a, "stop")
    assert blocks.num_free == 4
    batch = sched.schedule()
    assert [s.seq for s in batch] == [b, c]  # b (its prompt done) decodes; c gets a's slot
    assert list(sched.waiting) == [d]  # max_num_seqs


def test_the_head_of_the_queue_waits_for_room_and_later_ones_wait_behind_it():
    blocks = BlockManager(4, BS)
    sched = Scheduler(ServingConfig(max_num_seqs=8, max_num_batched_tokens=100), blocks)
    a, big, small = seq(8, 4), seq(8, 4), seq(1, 1)
    for s in (a, big, small):
        sched.add(s)
    assert [s.seq for s in sched.schedule()] == [a]  # big needs 3 blocks, 1 left; small waits behind it
    assert list(sched.waiting) == [big, small]


def test_a_request_that_can_never_fit_is_refused_at_once():
    sched = Scheduler(ServingConfig(), BlockManager(4, BS))
    with pytest.raises(InvalidInput, match="needs 5 KV blocks of 4 tokens; the KV cache has 4"):
        sched.add(seq(16, 4))
    assert not sched.has_work()


def test_finishing_a_waiting_or_running_sequence_frees_everything():
    blocks = BlockManager(8, BS)
    sched = Scheduler(ServingConfig(max_num_seqs=1), blocks)
    a, b = seq(5), seq(5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish(b, "cancelled")  # waiting
    sched.finish(a, "cancelled")  # running
    assert a.status is b.status is Status.FINISHED and not sched.has_work() and blocks.num_free == 8
