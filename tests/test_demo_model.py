"""The bundled demo checkpoint (checkpoints/shapes, made by qwen3vl-train-demo) as a functional test
model: its answers are right only if the pixels, the vision tower, the deepstack layers and every
E->L transfer path are right. Every question is about a freshly drawn picture, asked through real
servers.

The pictures are fixed (seeded) and decoding greedy, so each check gives the same result on a
machine every time. The thresholds sit below what `qwen3vl-bench demo-accuracy` measured on 200
questions per category (docs/demo-checkpoint.md: colour 99.5 %, shape 100 %, count 97 %,
yes/no 100 %, describe 85 %, two pictures 71.5 %; JSON answers all three fields right 93 %),
leaving room for a few answers that float
rounding on another CPU could flip; chance is 17 %, 33 %, 33 %, 50 %, ~0 % and 33 %.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import LOG_DIR, reference_generate
from qwen3vl.client import infer
from qwen3vl.launch.server import Server
from qwen3vl.tools.shapes import accuracy as acc
from qwen3vl.tools.shapes.questions import CHANCE, ONE_PICTURE

QUESTIONS = 24                      # per category
SEED = 2024                         # not the benchmark's pictures, nor training's
# The two-picture comparison (71.5 % on 200, chance 33 %) is too weak to gate on 24 questions; its
# answers still must come out the same through every transfer path.
FLOOR = {"colour": 0.8, "shape": 0.9, "count": 0.8, "exists": 0.9, "describe": 0.55}
JSON_FLOOR = 0.75                   # all three fields right (measured: see docs/demo-checkpoint.md)


@pytest.fixture(scope="module")
def questions():
    return acc.questions(QUESTIONS, SEED)


@pytest.fixture(scope="module")
def shapes_server():
    with Server(acc.CHECKPOINT, LOG_DIR / "shapes-aggregated.log",
                models=("ensemble", "qwen3_encoder", "qwen3_language"), extra=["--device", "cpu"]) as s:
        yield s


@pytest.fixture(scope="module")
def aggregated(shapes_server, questions):
    return acc.run(shapes_server.grpc_url, questions)


def test_answers_are_right_through_the_aggregated_server(aggregated):
    scores = acc.accuracy(aggregated)
    wrong = [(r.question.text, r.question.answer, r.reply) for r in aggregated if not r.right]
    assert all(scores[c] >= FLOOR[c] for c in FLOOR), (scores, wrong[:10])


@pytest.mark.parametrize("transfer", ["grpc", "shm"])
def test_disaggregated_answers_equal_the_aggregated_ones(questions, aggregated, transfer):
    """An encoder server and a language server, E->L tensors in chunks over gRPC or through
    shared memory: every answer is the aggregated server's, so the accuracy is too."""
    encoder = Server(acc.CHECKPOINT, LOG_DIR / f"shapes-encoder-{transfer}.log", role="encoder",
                     models=("qwen3_encoder",), extra=["--device", "cpu"])
    with encoder:
        extra = ["--device", "cpu", "--chunk-tokens", "16", "--encoder-url", encoder.grpc_url]
        with Server(acc.CHECKPOINT, LOG_DIR / f"shapes-language-{transfer}.log", role="language",
                    extra=extra + (["--shared-memory"] if transfer == "shm" else [])) as language:
            results = acc.run(language.grpc_url, questions)
            if transfer == "shm":
                from conftest import metric
                assert metric(language, "qwen3vl_transfer_shm_bytes_received_total") > 0
    assert [r.reply for r in results] == [r.reply for r in aggregated]


def test_a_blank_picture_answers_at_about_chance(shapes_server, questions):
    one_picture = [q for q in questions if q.category in ("colour", "shape", "count", "exists")]
    scores = acc.accuracy(acc.run(shapes_server.grpc_url, one_picture, "blank picture"))
    mean, chance = sum(scores.values()) / len(scores), sum(CHANCE[c] for c in scores) / len(scores)
    assert mean <= chance + 0.2, scores


def test_the_deepstack_layers_reach_the_language_model(shapes_server, questions, aggregated):
    """E->L tensors handed to qwen3_language unchanged give the ensemble's answers (the control);
    with the three deepstack layers zeroed the answers change."""
    one_picture = [q for q in questions if q.category in ONE_PICTURE]
    control = acc.run(shapes_server.grpc_url, one_picture, "E->L direct")
    zeroed = acc.run(shapes_server.grpc_url, one_picture, "deepstack zeroed")
    by_question = {id(r.question): r.reply for r in aggregated}
    assert [r.reply for r in control] == [by_question[id(q)] for q in one_picture]
    # On 200 per category the zeroed layers cost 3 to 10 points on colour, count and describe
    # (docs/demo-checkpoint.md); if they never reached the model, no answer would change.
    changed = sum(a.reply != b.reply for a, b in zip(control, zeroed))
    assert changed >= len(one_picture) // 30, f"{changed} of {len(one_picture)} answers changed"


def test_json_answers_under_the_schema_are_valid_and_right_about_as_often_as_free_text(shapes_server, questions):
    """"Describe the picture as JSON." under the {colour, shape, count} schema (structured output):
    every answer parses, and the fields are right about as often as the free-text descriptions of
    the same pictures (docs/demo-checkpoint.md gives the 200-picture row)."""
    row = acc.json_row(shapes_server.grpc_url, questions)
    assert row["valid"] == 1.0, row
    assert row["all"] >= JSON_FLOOR and row["all"] >= row["free text describe"] - 0.1, row


def test_http_answers_equal_the_streamed_ones(shapes_server, questions, aggregated):
    for r in aggregated[::QUESTIONS // 2]:
        assert acc.infer_greedy(shapes_server.http_url, r.question) == r.reply


def test_greedy_tokens_equal_transformers(shapes_server, questions):
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(acc.CHECKPOINT, dtype=torch.float32).eval()
    reference = (model, AutoProcessor.from_pretrained(acc.CHECKPOINT))
    for q in questions[::QUESTIONS // 2]:
        images = [s.png() for s in q.scenes]
        served = infer(shapes_server.grpc_url, "grpc", prompt=q.text, images=images, max_tokens=acc.MAX_TOKENS,
                       temperature=0.0).token_ids
        assert served == reference_generate(reference, q.text, images, acc.MAX_TOKENS)[:len(served)], q.text


def test_make_demo_grades_its_answers(tmp_path):
    """The demo draws its picture, serves the checkpoint, streams each answer and grades it."""
    out = subprocess.run([sys.executable, "-m", "qwen3vl.tools.demo", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "picture-7.png").is_file()
    graded = [line for line in out.stdout.splitlines() if line.startswith("  -> ")]
    right = sum(line.startswith("  -> right") for line in graded)
    assert len(graded) == 5 and right >= 4, out.stdout
    assert f"{right} of 5 answers right" in out.stdout
