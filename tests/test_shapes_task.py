"""The demo task without a server: the picture generator keeps its promises, every question has
the answer the picture implies, and qwen3vl-train-demo writes the release's layout,
deterministically for a seed."""

from __future__ import annotations

import colorsys
import itertools
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qwen3vl.tools.shapes import train as T
from qwen3vl.tools.shapes.questions import (CATEGORIES, JSON_CATEGORY, JSON_SCHEMA, ONE_PICTURE, ask, compare,
                                            random_question)
from qwen3vl.tools.shapes.scenes import COLOURS, MAX_SIDE, MIN_SIDE, centre_gap, min_centre_gap, random_scene


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
            hue, _, value = colorsys.rgb_to_hsv(*(c / 255 for c in s.rgb))
            hue *= 360
            assert value >= (0.8 - 0.01 if s.colour in ("orange", "yellow") else 0.6 - 0.01)   # never brown or olive
            lo, hi = COLOURS[s.colour]
            assert lo - 1 <= (hue if hue <= 300 or lo >= 0 else hue - 360) <= hi + 1, (s.colour, hue)
        xs = [s.centre_x for s in scene.shapes]
        assert xs == sorted(xs)
        for a, b in itertools.combinations(scene.shapes, 2):
            assert centre_gap(a.box, b.box) >= min_centre_gap(a.box, b.box, scene.width)
            assert centre_gap(a.box, b.box) >= (max(a.box[2] - a.box[0], b.box[2] - b.box[0]) + 1) / 2


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


def test_the_json_answer_is_the_leftmost_shape_and_the_count_under_the_schema(scenes):
    import jsonschema

    rng = random.Random(4)
    for scene in scenes:
        q = ask(JSON_CATEGORY, scene, rng)
        answer = json.loads(q.answer)
        jsonschema.validate(answer, JSON_SCHEMA)
        assert list(answer) == list(JSON_SCHEMA["properties"])       # the order the grammar writes
        left = min(scene.shapes, key=lambda s: s.centre_x)
        assert (answer["colour"], answer["shape"], answer["count"]) == (left.colour, left.kind, len(scene.shapes))
        assert scene.description().startswith(f"{'an' if left.colour[0] in 'aeiou' else 'a'} {left.colour} {left.kind}")


def test_the_vision_probe_labels_cover_each_shape():
    rng = random.Random(5)
    for _ in range(30):
        scene = random_scene(rng)
        labels = T.block_labels(scene, 14, 14)
        assert labels.shape == (49, 4)
        assert (labels[:, 3] == len(scene.shapes)).all()
        for place, s in enumerate(scene.shapes, start=1):   # each shape's place from the left on its colour's tokens
            on = labels[:, 2] == place
            assert on.any() and (labels[on, 1] == list(COLOURS).index(s.colour) + 1).all()
        assert ((labels[:, 2] == 0) == (labels[:, 1] == 0)).all()
        for s in scene.shapes:      # every shape, the smallest included, names its colour somewhere
            assert (labels[:, 1] == list(COLOURS).index(s.colour) + 1).any()
        kinds = {T.KINDS.index(s.kind) + 1 for s in scene.shapes}
        assert set(labels[:, 0].tolist()) <= kinds | {0, -100}
        assert ((labels[:, 0] == -100) <= (labels[:, 1] > 0)).all()     # an unnamed kind only on a coloured token
        assert ((labels[:, 0] == 0) == (labels[:, 1] == 0)).all()


def test_fast_cpu_kernels_compute_what_transformers_does(tmp_path):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    config, processor = T.write_files(tmp_path, 0)
    tok = processor.tokenizer
    inputs = T.batch(processor, random.Random(0), 3, tok.encode("<|im_start|>assistant\n"),
                     tok.convert_tokens_to_ids("<|im_end|>"))
    inputs.pop("block_labels")
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**config)).float().eval()
    with torch.no_grad():
        plain = model(**inputs).logits
        T.use_fast_cpu_kernels(model)
        fast = model(**inputs).logits
    assert torch.allclose(plain, fast, atol=1e-4, rtol=1e-4)


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
              "preprocessor_config.json", "video_preprocessor_config.json", "training.json", "README.md"):
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


def test_a_fine_tuning_stage_starts_from_its_base_and_asks_the_json_question(trained, tmp_path):
    base = trained["a"]
    out = tmp_path / "tuned"
    summary = T.train(out, steps=2, seed=5, batch_size=2, check_per_category=1, init_from=base, json_share=0.5,
                      lr=0.0, probe_weight=0.0, log=lambda *a, **k: None)
    (_, before), (_, after) = weights(base), weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)        # lr 0: the base's weights, written back
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert JSON_CATEGORY in summary["in_process_accuracy"] and summary["base"]["steps"] == 3
    readme = (out / "README.md").read_text()
    assert "--init-from BASE" in readme and "--json-share 0.5" in readme and "--steps 3 --seed 5" in readme
    rng = random.Random(0)
    firsts = [T.chat_example(rng, json_share=0.5)[2][0].category for _ in range(200)]
    assert 0.25 < firsts.count(JSON_CATEGORY) / len(firsts) < 0.6
    assert JSON_CATEGORY not in {T.chat_example(rng)[2][0].category for _ in range(200)}
    shares = T.first_question_weights(0.4)      # the JSON share comes out of the categories but describe
    assert shares["describe"] == T.FIRST_QUESTION["describe"] and shares[JSON_CATEGORY] == 0.4
    assert abs(sum(shares.values()) - 1.0) < 1e-9 and T.first_question_weights(0.0) == T.FIRST_QUESTION
    with pytest.raises(ValueError, match="json_share"):
        T.first_question_weights(0.8)
    with pytest.raises(ValueError, match="init-from"):
        T.train(base, steps=1, init_from=base, log=lambda *a, **k: None)


def test_every_category_is_asked():
    rng = random.Random(1)
    assert {random_question(c, rng).category for c in CATEGORIES} == set(CATEGORIES)
