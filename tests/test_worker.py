"""The served engine's response thread: a request's pieces that queue up while it is sending
merge into one response (fewer IPCs), in order, never across requests, never past a final."""

from __future__ import annotations

from types import SimpleNamespace

from qwen3vl.engine.sequence import Step
from qwen3vl.engine.worker import _coalesce


def test_queued_pieces_of_one_request_merge_in_order_and_stop_at_the_final_one():
    a, b = SimpleNamespace(request_id=1), SimpleNamespace(request_id=2)
    error = RuntimeError("failed")
    calls = []
    items = [(a, Step([1], "x")), (b, Step([7], "p")), (a, Step([2], "y")), (None, calls.append),
             (a, Step([3], "z", "stop")), (a, Step([4], "late")), (b, error)]
    out = _coalesce(items)
    assert out == [(a, Step([1, 2, 3], "xyz", "stop")), (b, Step([7], "p")), (None, calls.append),
                   (a, Step([4], "late")), (b, error)]
