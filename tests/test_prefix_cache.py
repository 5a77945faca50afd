"""The language model's prefix cache: a repeated image (or conversation) is restored, not
prefilled again, and a hit gives bit for bit what a miss gives."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import IMAGE_CASES, png
from qwen3vl.model.config import ModelConfig
from qwen3vl.engine.engine import Engine
from qwen3vl.engine.prefix_cache import cut_points
from qwen3vl.encoder.encoder import VisionEncoder

QUESTION = "What is in the picture? Answer in one sentence."
OTHER_QUESTION = "Name the three most common colours in this image, in order."


@pytest.fixture(scope="module")
def parts(checkpoint, reference):
    config = ModelConfig.load(checkpoint, device="cpu")
    return config, VisionEncoder(config, reference[1].image_processor)


def new_engine(config, cache_mib: float = 64) -> Engine:
    engine = Engine.from_checkpoint(config, prefix_cache_bytes=int(cache_mib * 2**20))
    engine.reports = []
    engine.on_prefill = engine.reports.append
    return engine


def first_logits(engine: Engine, text: str, features) -> torch.Tensor:
    """The logits of the first generated token, as generate() computes them."""
    prompt = engine.prepare(text, features)
    with torch.inference_mode():
        return engine._prefill(prompt, features, engine.model.new_cache(1, len(prompt.input_ids) + 1))


def tokens(engine: Engine, text: str, features, n: int = 8) -> list[int]:
    return [t for s in engine.generate(text, features, engine.params(max_tokens=n, temperature=0.0)) for t in s.token_ids]


def test_segments_end_after_each_image_and_long_turns(parts):
    config, encoder = parts
    engine = new_engine(config)
    features = encoder.encode([IMAGE_CASES["two-images"]])[0]
    prompt = engine.prepare("first <image> then <image> and a question", features)
    ends = cut_points(prompt, engine.prefix_cache.turn_end_id, engine.prefix_cache.min_tokens)
    visual = prompt.visual_mask
    for end in ends[:-1]:
        image_end = bool(visual[end - 1]) and not bool(visual[end])
        assert image_end or int(prompt.input_ids[end - 1]) == engine.prefix_cache.turn_end_id
    assert sum(bool(visual[e - 1]) and not bool(visual[e]) for e in ends[:-1]) == 2  # one cut per image
    assert ends[-1] == len(prompt.input_ids)


@pytest.mark.parametrize("case", ["one-image", "two-images"])
def test_a_hit_is_bit_identical_to_a_miss(parts, case):
    config, encoder = parts
    features = encoder.encode([IMAGE_CASES[case]])[0]
    warm = new_engine(config)
    first_logits(warm, QUESTION, features)               # fills the cache
    hit = first_logits(warm, OTHER_QUESTION, features)   # same image, another question
    assert warm.reports[-1].cached_tokens > 0
    assert warm.reports[-1].cached_tokens >= features.visual_embeds.shape[0]  # the image was not prefilled
    cold = new_engine(config)
    miss = first_logits(cold, OTHER_QUESTION, features)
    assert cold.reports[-1].cached_tokens == 0
    assert torch.equal(hit, miss)
    assert tokens(warm, OTHER_QUESTION, features) == tokens(new_engine(config), OTHER_QUESTION, features)


def test_segmented_prefill_matches_the_unsegmented_one(parts):
    """The segments change the order of float operations, not the model: same tokens, logits
    within float rounding of the one-shot prefill."""
    config, encoder = parts
    features = encoder.encode([IMAGE_CASES["two-images"]])[0]
    segmented, plain = new_engine(config), Engine.from_checkpoint(config)
    assert plain.prefix_cache is None
    torch.testing.assert_close(first_logits(segmented, QUESTION, features), first_logits(plain, QUESTION, features),
                               rtol=0, atol=1e-4)
    assert tokens(segmented, QUESTION, features, 12) == tokens(plain, QUESTION, features, 12)


def test_another_image_of_the_same_size_is_a_miss(parts):
    config, encoder = parts
    engine = new_engine(config)
    a, b = (encoder.encode([[png(200, 130, seed)]])[0] for seed in (41, 42))
    assert torch.equal(a.image_grid_thw, b.image_grid_thw)
    first_logits(engine, QUESTION, a)
    first_logits(engine, QUESTION, b)
    assert engine.reports[-1].cached_tokens == 0


def test_a_conversation_reuses_its_earlier_turns(parts):
    config, encoder = parts
    engine = new_engine(config)
    features = encoder.encode([IMAGE_CASES["one-image"]])[0]
    turn1 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION * 3}]}]
    first_logits(engine, json.dumps(turn1), features)
    turn2 = turn1 + [{"role": "assistant", "content": "A picture of noise, in many colours."},
                     {"role": "user", "content": OTHER_QUESTION}]
    hit = first_logits(engine, json.dumps(turn2), features)
    prompt1 = engine.prepare(json.dumps(turn1), features)
    # everything of turn 1 up to its closing <|im_end|> is restored
    assert engine.reports[-1].cached_tokens == cut_points(prompt1, engine.prefix_cache.turn_end_id,
                                                          engine.prefix_cache.min_tokens)[-2]
    assert torch.equal(hit, first_logits(new_engine(config), json.dumps(turn2), features))


def test_the_cache_is_bounded_in_bytes(parts):
    config, encoder = parts
    images = [encoder.encode([[png(120, 120, 50 + seed)]])[0] for seed in range(4)]
    probe = new_engine(config)
    first_logits(probe, QUESTION, images[0])
    block = probe.prefix_cache.bytes  # one image's segment
    assert block > 0
    engine = new_engine(config, cache_mib=2.5 * block / 2**20)
    for features in images:
        first_logits(engine, QUESTION, features)
        assert engine.prefix_cache.bytes <= engine.prefix_cache.max_bytes
    assert len(engine.prefix_cache.blocks) == 2  # the two most recent images
    first_logits(engine, QUESTION, images[3])
    assert engine.reports[-1].cached_tokens > 0
    first_logits(engine, QUESTION, images[0])
    assert engine.reports[-1].cached_tokens == 0
