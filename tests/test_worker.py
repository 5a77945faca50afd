"""The served engine's threads: a request's pieces that queue up while the response thread is
sending merge into one response (fewer IPCs), in order, never across requests, never past a
final; and the engine loop delivers each step's outputs to the request's own stream and the
engine's reports to its metrics, fails a request that can never fit alone, cancels through
`is_cancelled`, and fails what is in flight at shutdown: FINAL always goes out."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from qwen3vl.engine.engine import Engine
from qwen3vl.engine.model_runner import PagedKVCache
from qwen3vl.engine.sequence import Step
from qwen3vl.engine.worker import EngineLoop, _coalesce
from qwen3vl.features import VisualFeatures
from qwen3vl.model.config import ModelConfig
from qwen3vl.settings import ServingConfig

KV_BLOCKS = 128  # of 16 tokens: a request of 2,000 tokens fits, one of 3,000 never does


def test_queued_pieces_of_one_request_merge_in_order_and_stop_at_the_final_one():
    a, b = SimpleNamespace(request_id=1), SimpleNamespace(request_id=2)
    error = RuntimeError("failed")
    calls = []
    items = [(a, Step([1], "x")), (b, Step([7], "p")), (a, Step([2], "y")), (None, calls.append),
             (a, Step([3], "z", "stop")), (a, Step([4], "late")), (b, error)]
    out = _coalesce(items)
    assert out == [(a, Step([1, 2, 3], "xyz", "stop")), (b, Step([7], "p")), (None, calls.append),
                   (a, Step([4], "late")), (b, error)]


class Stream:
    """A request's stream: what the response thread sent it, and on which thread."""

    def __init__(self):
        self.items, self.threads, self.done = [], set(), threading.Event()

    def emit(self, step: Step) -> None:
        self._got(step, bool(step.finish_reason))

    def fail(self, error: Exception) -> None:
        self._got(error, True)

    def _got(self, item, final: bool) -> None:
        assert not self.done.is_set(), "nothing may follow a final response"
        self.items.append(item)
        self.threads.add(threading.current_thread().name)
        if final:
            self.done.set()

    def wait(self) -> list:
        assert self.done.wait(60), self.items
        return self.items


class Metrics:
    def __init__(self):
        self.prefills, self.gauges = [], []

    def prefill(self, report) -> None:
        self.prefills.append(report)

    def stats(self, stats: dict) -> None:
        self.gauges.append(stats)


@pytest.fixture(scope="module")
def config(checkpoint):
    return ModelConfig.load(checkpoint, device="cpu")


def new_loop(config, metrics=None, **kw) -> EngineLoop:
    block_bytes = PagedKVCache.bytes_per_block(config.text, 16, config.dtype)
    engine = Engine.from_checkpoint(config, ServingConfig(kv_cache_mb=KV_BLOCKS * block_bytes / 2**20, **kw))
    return EngineLoop(engine, metrics)


def request(loop: EngineLoop, text: str, is_cancelled=lambda: False, **params):
    engine = loop.engine
    seq = engine.new_sequence(text, VisualFeatures.empty(engine.config),
                              engine.params(**{"temperature": 0.0, "ignore_eos": True, **params}))
    stream = Stream()
    loop.submit(seq, stream, is_cancelled)
    return seq, stream


def test_the_loop_sends_each_requests_steps_to_its_stream_and_fails_one_that_can_never_fit_alone(config):
    metrics = Metrics()
    loop = new_loop(config, metrics)
    try:
        doomed, doomed_stream = request(loop, "Tell me everything.", max_tokens=3000)
        seqs = [request(loop, f"Count to {n}.", max_tokens=n) for n in (3, 7)]
        (error,) = doomed_stream.wait()
        assert "KV blocks" in str(error) and doomed.finished
        for (seq, stream), n in zip(seqs, (3, 7)):
            steps = stream.wait()
            assert [s.finish_reason for s in steps] == [""] * (len(steps) - 1) + ["length"]
            assert [t for s in steps for t in s.token_ids] == seq.output_ids and len(seq.output_ids) == n
            assert stream.threads == {"qwen3vl-responses"}
        assert sorted(r.computed_tokens + r.cached_tokens for r in metrics.prefills) == sorted(
            seq.prompt_len for seq, _ in seqs)
        deadline = time.monotonic() + 10
        while not (metrics.gauges and metrics.gauges[-1]["running"] == 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metrics.gauges[-1]["running"] == 0 and metrics.gauges[-1]["kv_blocks_used"] == 0  # idle
        assert loop.requests == {}
    finally:
        loop.stop()


def test_a_waiting_request_whose_client_has_gone_ends_cancelled_and_a_running_one_too(config):
    """One slot: the second request waits (the engine thread asks it), then the first one's
    client goes too (the response thread asks it after a send)."""
    loop = new_loop(config, max_num_seqs=1)
    try:
        waiting_gone = threading.Event()
        running, running_stream = request(loop, "Tell me a long story.", waiting_gone.is_set, max_tokens=2000)
        waiting, waiting_stream = request(loop, "And another.", lambda: True, max_tokens=2000)
        assert waiting_stream.wait() == [Step([], "", "cancelled")] and waiting.output_ids == []
        waiting_gone.set()
        steps = running_stream.wait()
        assert steps[-1].finish_reason == "cancelled" and 0 < len(running.output_ids) < 2000
        assert loop.engine.blocks.num_used == 0
    finally:
        loop.stop()


def test_a_request_in_flight_at_shutdown_gets_a_final_error(config):
    loop = new_loop(config)
    gate, step = threading.Event(), loop.engine.step

    def gated():
        out = step()
        gate.wait(60)
        return out

    loop.engine.step = gated
    seq, stream = request(loop, "Tell me a long story.", max_tokens=2000)
    deadline = time.monotonic() + 60
    while loop.engine.steps < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.inbox.put(None)  # the loop stops before its next step
    gate.set()
    loop.stop()
    items = stream.wait()
    assert isinstance(items[-1], RuntimeError) and "shutting down" in str(items[-1])
    assert all(isinstance(s, Step) and not s.finish_reason for s in items[:-1])
