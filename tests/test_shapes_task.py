"""The demo task without a server: the picture generator keeps its promises, every question has
the answer the picture implies, and qwen3vl-train-demo writes the release's layout,
deterministically for a seed."""

from __future__ import annotations

import colorsys
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qwen3vl.shapes import train as T
from qwen3vl.shapes.questions import CATEGORIES, ONE_PICTURE, ask, compare, random_question
from qwen3vl.shapes.scenes import COLOURS, MAX_SIDE, MIN_CENTRE_GAP, MIN_SIDE, random_scene


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(11)
    return [random_scene(rng) for _ in range(300)]


def test_pictures_keep_the_stated_sizes_spacing_and_colours(scenes):
    for scene in scenes:
        assert MIN_SIDE <= scene.width <= MAX_SIDE and MIN_SIDE <= scene.height <= MAX_SIDE
        assert 1 <= len(scene.shapes) <= 3
        short = min(scene.width, scene.height)
        for s in scene.shapes:
            left, top, right, bottom = s.box
            assert 0 <= left and right < scene.width and 0 <= top and bottom < scene.height
            assert 0.2 * short - 1 <= right - left + 1 <= 0.45 * short + 1
            hue = colorsys.rgb_to_hsv(*(c / 255 for c in s.rgb))[0] * 360
            lo, hi = COLOURS[s.colour]
            assert lo - 1 <= (hue if hue <= 300 or lo >= 0 else hue - 360) <= hi + 1, (s.colour, hue)
        xs = [s.centre_x for s in scene.shapes]
        assert xs == sorted(xs) and all(b - a >= MIN_CENTRE_GAP * scene.width for a, b in zip(xs, xs[1:]))


def test_shapes_do_not_overlap_in_the_drawn_pixels(scenes):
    for scene in scenes[:60]:
        image = np.asarray(scene.image()).astype(int)
        painted = (image != 255).any(-1).sum()
        alone = sum((np.asarray(type(scene)(scene.width, scene.height, (s,)).image()) != 255).any(-1).sum()
                    for s in scene.shapes)
        assert painted == alone          # no pixel painted twice


def test_every_answer_follows_from_the_picture(scenes):
    rng = random.Random(3)
    numbers = {"one.": 1, "two.": 2, "three.": 3}
    for scene in scenes:
        kinds = [(s.colour, s.kind) for s in scene.shapes]
        for category in ONE_PICTURE:
            q = ask(category, scene, rng)
            if q is None:
                continue
            assert q.answer.endswith(".") and q.answer == q.answer.lower()
            if category == "count":
                assert numbers[q.answer] == len(scene.shapes)
            elif category == "colour":
                kind = q.text.split()[-1].rstrip("?")
                assert [c for c, k in kinds if k == kind] == [q.answer[:-1]]
            elif category == "shape":
                colour = q.text.split()[-2]
                assert [f"a {k}." for c, k in kinds if c == colour] == [q.answer]
            elif category == "exists":
                colour, kind = q.text.rstrip("?").split()[-2:]
                assert q.answer == ("yes." if (colour, kind) in kinds else "no.")
                assert q.text.startswith("Is there an " if colour == "orange" else "Is there a ")
            else:
                assert q.answer == scene.description()
    two = compare(scenes[0], scenes[1])
    assert two.answer in ("the first.", "the second.", "neither.") and len(two.scenes) == 2
    answers = {random_question("exists", rng).answer for _ in range(50)}
    assert answers == {"yes.", "no."}


def test_the_vision_probe_labels_cover_each_shape():
    rng = random.Random(5)
    for _ in range(30):
        scene = random_scene(rng)
        labels = T.block_labels(scene, 14, 14)
        for s in scene.shapes:
            assert (labels[:, 0] > 0).any()
        assert labels.shape == (49, 2)


def test_answer_labels_mark_only_the_answers():
    ids = torch.tensor([[9, 1, 2, 5, 6, 3, 1, 2, 7, 3, 0]])
    labels = T.answer_labels(ids, prefix=[1, 2], end_id=3)
    assert labels.tolist() == [[-100, -100, -100, 5, 6, 3, -100, -100, 7, 3, -100]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two runs of a few steps with seed 5 and one with seed 6."""
    out = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        path = tmp_path_factory.mktemp(f"train-{name}")
        T.train(path, steps=3, seed=seed, batch_size=2, check_per_category=1, log=lambda *a, **k: None)
        out[name] = path
    return out


def weights(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for name, shard in index["weight_map"].items():
        with safe_open(path / shard, "pt") as f:
            tensors[name] = f.get_tensor(name)
    return index, tensors


def test_training_writes_the_release_layout(trained):
    path = trained["a"]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
              "preprocessor_config.json", "video_preprocessor_config.json", "training.json"):
        assert (path / f).is_file(), f
    index, tensors = weights(path)
    assert len(set(index["weight_map"].values())) >= 2
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    assert text["num_experts"] == 8 and text["num_experts_per_tok"] == 2
    assert len(config["vision_config"]["deepstack_visual_indexes"]) == 3
    assert text["rope_scaling"]["mrope_interleaved"] and text["num_key_value_heads"] < text["num_attention_heads"]
    gate_up = tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.dtype == torch.bfloat16
    assert gate_up.shape == (8, text["hidden_size"], 2 * text["moe_intermediate_size"])   # hub [E, H, 2I]

    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(path)
    assert model.config.text_config.num_experts == 8
    processor = AutoProcessor.from_pretrained(path)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]


def test_training_is_deterministic_for_a_seed(trained):
    (_, a), (_, b), (_, c) = (weights(trained[k]) for k in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_every_category_is_asked():
    rng = random.Random(1)
    assert {random_question(c, rng).category for c in CATEGORIES} == set(CATEGORIES)
