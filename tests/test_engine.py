"""The batched engine in one process, on the tiny checkpoint: batching changes no request's
tokens, chunked prefill cuts through images correctly, prefix caching restores the blocks of a
repeated image (and only then), a failing step fails its own requests only, a cancel frees its
blocks for the next request, and sampling parameters are checked."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import IMAGE_CASES, png
from qwen3vl.encoder.encoder import VisionEncoder
from qwen3vl.engine.engine import Engine
from qwen3vl.errors import InvalidInput
from qwen3vl.model.config import ModelConfig
from qwen3vl.model.reference import prefill_logits
from qwen3vl.settings import ServingConfig

QUESTION = "What is in the picture? Answer in one sentence."
OTHER_QUESTION = "Name the three most common colours in this image, in order."


@pytest.fixture(scope="module")
def parts(checkpoint, reference):
    config = ModelConfig.load(checkpoint, device="cpu")
    return config, VisionEncoder(config, reference[1].image_processor)


def new_engine(config, **kw) -> Engine:
    """An engine whose steps' prefill reports collect in `engine.reports` (generate's too)."""
    engine = Engine.from_checkpoint(config, ServingConfig(**{"kv_cache_mb": 64, **kw}))
    engine.reports = []
    step = engine.step

    def reported():
        out = step()
        engine.reports.extend(out.prefills)
        return out

    engine.step = reported
    return engine


def alone(engine: Engine, text: str, features, **params) -> list[int]:
    return [t for s in engine.generate(text, features, engine.params(**params)) for t in s.token_ids]


def step_into(engine: Engine, seqs: list, outs: list[list]) -> None:
    """One step; each sequence's step or failure appended to its list in `outs`."""
    out = engine.step()
    for seq, got in zip(seqs, outs):
        if seq.request_id in out.steps:
            got.append(out.steps[seq.request_id])
        if seq.request_id in out.failures:
            got.append(out.failures[seq.request_id])


def run_together(engine: Engine, requests: list[tuple[str, object, dict]]) -> list[list[int]]:
    """Add every request, then step until all are done; each one's token ids. Checks that
    they did share steps, prefills beside decodes."""
    outs: list[list] = [[] for _ in requests]
    schedule, shapes = engine.scheduler.schedule, []

    def recorded():
        batch = schedule()
        shapes.append(sorted(s.num_tokens for s in batch))
        return batch

    engine.scheduler.schedule = recorded
    seqs = []
    for text, features, params in requests:
        seq = engine.new_sequence(text, features, engine.params(**params))
        engine.add(seq)
        seqs.append(seq)
    steps = 0
    while engine.has_work():
        step_into(engine, seqs, outs)
        steps += 1
        assert steps < 10_000
    assert max(len(shape) for shape in shapes) >= 3  # several requests per step
    engine.shapes = shapes
    for out in outs:
        assert not any(isinstance(item, Exception) for item in out), out
        assert [bool(s.finish_reason) for s in out][-1] and not any(s.finish_reason for s in out[:-1])
    return [[t for s in out for t in s.token_ids] for out in outs]


def mixed_requests(encoder) -> list[tuple[str, object, dict]]:
    one, two = encoder.encode([IMAGE_CASES["one-image"]])[0], encoder.encode([IMAGE_CASES["two-images"]])[0]
    empty = encoder.encode([[]])[0]
    return [
        ("Write a haiku about rain.", empty, dict(max_tokens=12, temperature=0.0)),
        (QUESTION, one, dict(max_tokens=9, temperature=0.0)),
        ("Compare <image> with <image>.", two, dict(max_tokens=7, temperature=0.0)),
        ("Tell me a story.", empty, dict(max_tokens=15, temperature=0.8, top_p=0.9, seed=7)),
        (QUESTION, one, dict(max_tokens=5, temperature=1.0, top_k=20, seed=11)),
        ("Short.", empty, dict(max_tokens=1, temperature=0.0)),
    ]


@pytest.mark.parametrize("budget", [2048, 24])
def test_requests_batched_together_give_what_each_gives_alone(parts, budget):
    """With a small budget, prompts go in chunks that cut through images while other requests
    decode; greedy and seeded requests alike give their solo tokens."""
    config, encoder = parts
    requests = mixed_requests(encoder)
    solo_engine = new_engine(config, enable_prefix_caching=False)
    solo = [alone(solo_engine, text, f, **p) for text, f, p in requests]
    engine = new_engine(config, enable_prefix_caching=False, max_num_batched_tokens=budget)
    together = run_together(engine, requests)
    assert together == solo
    if budget < 100:  # decodes and prefill chunks shared steps
        assert any(shape[0] == 1 and shape[-1] > 1 for shape in engine.shapes)


def test_paged_and_chunked_prefill_logits_equal_the_unbatched_reference(parts):
    """Float rounding may differ between batch shapes: logits within 1e-5 of one unbatched
    prefill, whatever the chunking (here: chunks of 7 tokens through two images)."""
    config, encoder = parts
    features = encoder.encode([IMAGE_CASES["two-images"]])[0]
    text = "Compare <image> with <image>."
    reference = prefill_logits(new_engine(config), text, features)[-1]
    for budget in (4096, 7):
        engine = new_engine(config, enable_prefix_caching=False, max_num_batched_tokens=budget)
        captured = []
        execute = engine.runner.execute
        engine.runner.execute = lambda batch: captured.append(execute(batch)) or captured[-1]
        next(engine.generate(text, features, engine.params(max_tokens=1, temperature=0.0)))
        torch.testing.assert_close(captured[-1][0], reference, rtol=0, atol=1e-5)
        assert len(captured) == (1 if budget == 4096 else math.ceil(engine.prepare(text, features).input_ids.numel() / 7))


def test_a_repeated_image_restores_its_blocks_and_gives_a_cold_engines_tokens(parts):
    config, encoder = parts
    features = encoder.encode([IMAGE_CASES["one-image"]])[0]
    engine = new_engine(config)
    alone(engine, QUESTION, features, max_tokens=4, temperature=0.0)
    assert engine.reports[-1].cached_tokens == 0
    warm = alone(engine, OTHER_QUESTION, features, max_tokens=8, temperature=0.0)
    prompt = engine.prepare(OTHER_QUESTION, features)
    image_end = int(torch.nonzero(prompt.visual_mask).max()) + 1
    cached = engine.reports[-1].cached_tokens
    assert cached >= image_end - engine.blocks.block_size and cached % engine.blocks.block_size == 0
    assert engine.reports[-1].computed_tokens == len(prompt.input_ids) - cached
    assert warm == alone(new_engine(config, enable_prefix_caching=False), OTHER_QUESTION, features,
                         max_tokens=8, temperature=0.0)
    # Another image of the same size: the same placeholder ids, nothing restored past the text before it.
    other = encoder.encode([[png(200, 130, 99)]])[0]
    alone(engine, OTHER_QUESTION, other, max_tokens=2, temperature=0.0)
    assert engine.reports[-1].cached_tokens < engine.blocks.block_size
    assert engine.blocks.num_used == 0  # everything finished: cached blocks are evictable, none held


def test_the_next_turn_of_a_conversation_restores_the_first(parts):
    config, encoder = parts
    features = encoder.encode([IMAGE_CASES["one-image"]])[0]
    engine = new_engine(config)
    turn1 = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    answer = alone(engine, json.dumps(turn1), features, max_tokens=6, temperature=0.0)
    turn2 = turn1 + [{"role": "assistant", "content": engine.tokenizer.decode(answer, skip_special_tokens=True)},
                     {"role": "user", "content": OTHER_QUESTION}]
    alone(engine, json.dumps(turn2), features, max_tokens=3, temperature=0.0)
    first_prompt = len(engine.prepare(json.dumps(turn1), features).input_ids)
    assert engine.reports[-1].cached_tokens >= first_prompt - 2 * engine.blocks.block_size


def test_a_failing_step_fails_its_own_requests_and_the_engine_goes_on(parts):
    config, encoder = parts
    engine = new_engine(config)
    execute = engine.runner.execute
    poisoned = []

    def faulty(batch):
        if any(s.seq in poisoned for s in batch):
            raise RuntimeError("injected fault")
        return execute(batch)

    engine.runner.execute = faulty
    empty = encoder.encode([[]])[0]
    outs = [[], []]
    bad = engine.new_sequence("doomed", empty, engine.params(max_tokens=4))
    poisoned.append(bad)
    engine.add(bad)
    while engine.has_work():
        step_into(engine, [bad], outs)
    assert len(outs[0]) == 1 and isinstance(outs[0][0], RuntimeError)
    assert "the engine step running this request failed: RuntimeError: injected fault" in str(outs[0][0])
    assert engine.blocks.num_used == 0
    assert len(alone(engine, "still serving?", empty, max_tokens=3, temperature=0.0)) == 3


def test_a_cancelled_request_leaves_at_the_next_step_and_a_waiting_one_takes_its_place(parts):
    config, encoder = parts
    engine = new_engine(config, max_num_seqs=1)
    empty = encoder.encode([[]])[0]
    outs = [[], []]
    seqs = [engine.new_sequence("first", empty, engine.params(max_tokens=50, temperature=0.0)) for _ in outs]
    for seq in seqs:
        engine.add(seq)
    step_into(engine, seqs, outs)
    step_into(engine, seqs, outs)
    assert engine.scheduler.running == [seqs[0]] and list(engine.scheduler.waiting) == [seqs[1]]
    seqs[0].cancel_requested = True
    step_into(engine, seqs, outs)
    assert outs[0][-1].finish_reason == "cancelled" and engine.scheduler.running == [seqs[1]]
    while engine.has_work():
        step_into(engine, seqs, outs)
    assert outs[1][-1].finish_reason == "length" and engine.blocks.num_used == 0


@pytest.mark.parametrize("params, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*64\)"),
])
def test_non_finite_or_out_of_range_sampling_parameters_are_refused(parts, params, message):
    engine = new_engine(parts[0])
    with pytest.raises(InvalidInput, match=message):
        engine.params(**params)


def test_a_temperature_too_small_to_divide_by_is_greedy(parts):
    config, encoder = parts
    engine = new_engine(config)
    empty = encoder.encode([[]])[0]
    tiny = alone(engine, "Tell me a story.", empty, max_tokens=6, temperature=1e-45, seed=3)
    assert tiny == alone(engine, "Tell me a story.", empty, max_tokens=6, temperature=0.0)


def test_a_request_that_could_never_fit_is_refused(parts):
    config, encoder = parts
    engine = new_engine(config, kv_cache_mb=(1 << 16) / 2**20)  # a handful of blocks
    empty = encoder.encode([[]])[0]
    with pytest.raises(InvalidInput, match="KV blocks"):
        alone(engine, "Tell me a story.", empty, max_tokens=500)
