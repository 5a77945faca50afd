"""`qwen3vl-bench demo-accuracy`: how often the served demo checkpoint answers right, through real
servers, beside ablations that show what the answers depend on.

    qwen3vl-bench demo-accuracy [--checkpoint checkpoints/shapes] [--per-category 200]
                                [--deployments aggregated,disaggregated-grpc,disaggregated-shm]
                                [--out bench/results/demo_accuracy.json]

Every question is about a freshly drawn picture (seeded by `--seed`; the training pictures come
from another stream, so none of these was trained on) and goes to a started server like any
client's: half as a plain prompt, half in the JSON chat form, over gRPC streaming, greedy.

Rows:
- one per deployment: `aggregated` (one server), `disaggregated-grpc` (an encoder server and a
  language server, E->L tensors in chunks over gRPC), `disaggregated-shm` (the same through
  shared memory);
- `blank picture`: each picture replaced by a white one of the same size (the answer must then
  come from the question alone: about chance);
- `E->L direct`: the encoder's tensors fetched from `qwen3_encoder` and handed to
  `qwen3_language` unchanged (the control for the next row);
- `deepstack zeroed`: the same with the three deepstack layers set to zero, so the language
  model sees only the merger's output;
- `json {colour, shape, count}` (aggregated): the describe questions' pictures, asked "Describe
  the picture as JSON." under a JSON schema (structured output, `questions.JSON_SCHEMA`): valid
  JSON, and each field right (the leftmost shape's colour and kind, and how many shapes) beside
  the free-text describe answers of the same pictures. The grammar makes every answer JSON; the
  model's fine-tuning stage (`qwen3vl-train-demo --json-share`) is what makes the fields right.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import contract
from ...client import encode, infer, raw_results, stream_grpc
from ...launch.server import Server
from ...paths import REPO_ROOT
from .questions import CATEGORIES, CHANCE, JSON_QUESTION, JSON_SCHEMA, Question, json_answer, random_question
from .scenes import Scene

CHECKPOINT = REPO_ROOT / "checkpoints" / "shapes"
MAX_TOKENS = 24                  # the longest answer is 17 tokens
TARGETS = {"colour": 0.95, "shape": 0.95, "count": 0.95, "exists": 0.95, "describe": 0.85}
DEPLOYMENTS = ("aggregated", "disaggregated-grpc", "disaggregated-shm")
ABLATIONS = ("blank picture", "E->L direct", "deepstack zeroed")
JSON_ROW = "json {colour, shape, count}"
JSON_MAX_TOKENS = 120  # the demo's small vocabulary writes JSON's punctuation a character a token


@dataclass
class Result:
    question: Question
    reply: str

    @property
    def right(self) -> bool:
        return self.question.is_right(self.reply)


def questions(per_category: int, seed: int, categories=CATEGORIES) -> list[Question]:
    """`per_category` questions of each category, each about a picture drawn for it."""
    rng = random.Random(f"{seed}/accuracy")
    return [random_question(c, rng) for c in categories for _ in range(per_category)]


def blank(scene: Scene) -> Scene:
    return Scene(scene.width, scene.height, ())


def prompt_for(question: Question, chat_form: bool) -> str:
    """The question as a plain prompt (the server puts the pictures first) or as JSON chat
    messages with one image item per picture; both render the same tokens."""
    if not chat_form:
        return question.text
    content = [{"type": "image"} for _ in question.scenes] + [{"type": "text", "text": question.text}]
    return json.dumps([{"role": "user", "content": content}])


def ask_ensemble(url: str, question: Question, chat_form: bool, blank_pictures: bool = False) -> str:
    """The served answer to `question` (gRPC streaming through the ensemble, greedy)."""
    scenes = [blank(s) if blank_pictures else s for s in question.scenes]
    chunk_texts = []
    for chunk in stream_grpc(url, prompt=prompt_for(question, chat_form), images=[s.png() for s in scenes],
                             max_tokens=MAX_TOKENS, temperature=0.0, stream=True):
        chunk_texts.append(chunk.text)
    return "".join(chunk_texts)


def ask_language_directly(url: str, question: Question, chat_form: bool, zero_deepstack: bool) -> str:
    """The answer from `qwen3_language` given the encoder's E->L tensors for the pictures, taken
    from `qwen3_encoder` on the same server, with the deepstack layers zeroed if asked."""
    tensors = encode(url, [s.png() for s in question.scenes])
    deepstack = tensors[contract.DEEPSTACK_EMBEDS]
    if zero_deepstack:
        deepstack = np.zeros_like(deepstack)
    inputs = {contract.TEXT_INPUT: np.array([prompt_for(question, chat_form).encode()], dtype=object),
              contract.VISUAL_EMBEDS: tensors[contract.VISUAL_EMBEDS], contract.DEEPSTACK_EMBEDS: deepstack,
              contract.IMAGE_GRID_THW: tensors[contract.IMAGE_GRID_THW],
              contract.MAX_TOKENS: np.array([MAX_TOKENS], dtype=np.int32),
              contract.TEMPERATURE: np.array([0.0], dtype=np.float32)}

    results = raw_results(url, "qwen3_language", inputs)
    return "".join(out.reshape(-1)[0].decode() for r in results
                   if (out := r.as_numpy(contract.TEXT_OUTPUT)) is not None)


def run(url: str, qs: list[Question], variant: str = "real", concurrency: int = 8) -> list[Result]:
    """Ask every question (concurrently, `concurrency` in flight); even-numbered ones as plain
    prompts, odd ones in the chat form. `variant`: "real", a deployment name, or an ablation."""
    def one(i_q):
        i, q = i_q
        chat = bool(i % 2)
        if variant == "blank picture":
            return Result(q, ask_ensemble(url, q, chat, blank_pictures=True))
        if variant in ("E->L direct", "deepstack zeroed"):
            return Result(q, ask_language_directly(url, q, chat, zero_deepstack=variant == "deepstack zeroed"))
        return Result(q, ask_ensemble(url, q, chat))

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, enumerate(qs)))


def json_row(url: str, qs: list[Question], concurrency: int = 8) -> dict[str, float]:
    """The describe questions' pictures asked JSON_QUESTION under JSON_SCHEMA: the share of
    answers that parse, of each field right, of answers all right, and of the free-text
    describe answers right (asked the same way, for comparison)."""
    asked = [q for q in qs if q.category == "describe"]

    def one(q: Question) -> dict | None:
        text = "".join(c.text for c in stream_grpc(url, prompt=JSON_QUESTION, images=[s.png() for s in q.scenes],
                                                   max_tokens=JSON_MAX_TOKENS, temperature=0.0, stream=True,
                                                   structured_outputs={"json": JSON_SCHEMA}))
        try:
            return json.loads(text)
        except ValueError:
            return None

    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, asked))
    wants = [json.loads(json_answer(q.scenes[0])) for q in asked]
    n = max(1, len(asked))
    row = {"valid": sum(a is not None for a in answers) / n}
    for field in ("colour", "shape", "count"):
        row[field] = sum(a is not None and a.get(field) == w[field] for a, w in zip(answers, wants)) / n
    row["all"] = sum(a == w for a, w in zip(answers, wants)) / n
    row["free text describe"] = accuracy(run(url, asked)).get("describe", 0.0)
    return row


def accuracy(results: list[Result]) -> dict[str, float]:
    """{category: fraction right} for the categories present."""
    out = {}
    for c in CATEGORIES:
        rows = [r.right for r in results if r.question.category == c]
        if rows:
            out[c] = sum(rows) / len(rows)
    return out


def infer_greedy(url: str, question: Question, protocol: str = "http") -> str:
    """One whole answer (not streamed) over `protocol`: for spot checks."""
    return infer(url, protocol, prompt=question.text, images=[s.png() for s in question.scenes],
                 max_tokens=MAX_TOKENS, temperature=0.0).text


def start_servers(checkpoint: Path, deployment: str, log_dir: Path):
    """Context managers of the servers a deployment needs, the one clients talk to last."""
    if deployment == "aggregated":
        return [Server(checkpoint, log_dir / "demo-aggregated.log",
                       models=("ensemble", "qwen3_encoder", "qwen3_language"))]
    encoder = Server(checkpoint, log_dir / "demo-encoder.log", role="encoder", models=("qwen3_encoder",))
    extra = ["--encoder-url", encoder.grpc_url] + (["--shared-memory"] if deployment.endswith("shm") else [])
    return [encoder, Server(checkpoint, log_dir / f"demo-{deployment}.log", role="language", extra=extra)]


def table(rows: dict[str, dict[str, float]]) -> str:
    cats = [c for c in CATEGORIES if any(c in r for r in rows.values())]
    lines = ["| | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    lines.append("| target | " + " | ".join(f">= {TARGETS[c]:.0%}" if c in TARGETS else "" for c in cats) + " |")
    lines.append("| chance | " + " | ".join(f"{CHANCE[c]:.0%}" for c in cats) + " |")
    for name, acc in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{acc[c]:.1%}" if c in acc else "" for c in cats) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from contextlib import ExitStack

    p = argparse.ArgumentParser(prog="qwen3vl-bench demo-accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="the demo checkpoint (default: checkpoints/shapes)")
    p.add_argument("--per-category", type=int, default=200, help="questions (fresh pictures) per category")
    p.add_argument("--seed", type=int, default=1000, help="the pictures' seed (training used another stream)")
    p.add_argument("--deployments", default=",".join(DEPLOYMENTS),
                   help=f"comma separated, of {', '.join(DEPLOYMENTS)} (default: all)")
    p.add_argument("--no-ablations", action="store_true",
                   help=f"skip the ablations on the aggregated server ({', '.join(ABLATIONS)})")
    p.add_argument("--no-json", action="store_true", help=f"skip the {JSON_ROW!r} row (structured output)")
    p.add_argument("--concurrency", type=int, default=8, help="questions in flight at once (default: 8)")
    p.add_argument("--log-dir", type=Path, default=Path(".work/logs"), help="the servers' logs (default: .work/logs)")
    p.add_argument("--out", type=Path, help="JSON results")
    args = p.parse_args(argv)
    qs = questions(args.per_category, args.seed)
    rows, wrong, json_answers = {}, {}, None
    for deployment in args.deployments.split(","):
        variants = [deployment] + ([] if args.no_ablations or deployment != "aggregated" else list(ABLATIONS))
        with ExitStack() as stack:
            servers = [stack.enter_context(s) for s in start_servers(args.checkpoint, deployment, args.log_dir)]
            url = servers[-1].grpc_url
            for variant in variants:
                # Ablations skip the two-picture question: their point is one picture's content.
                asked = qs if variant == deployment else [q for q in qs if q.category != "compare"]
                results = run(url, asked, variant, args.concurrency)
                rows[variant] = accuracy(results)
                wrong[variant] = [{"category": r.question.category, "question": r.question.text,
                                   "answer": r.question.answer, "reply": r.reply} for r in results if not r.right][:20]
                print(f"{variant}: " + ", ".join(f"{c} {a:.1%}" for c, a in rows[variant].items()), flush=True)
            if deployment == "aggregated" and not args.no_json:
                json_answers = json_row(url, qs, args.concurrency)
                print(f"{JSON_ROW}: " + ", ".join(f"{k} {v:.1%}" for k, v in json_answers.items()), flush=True)
    print()
    print(table(rows))
    if json_answers is not None:
        print(f"\n| {JSON_ROW} | " + " | ".join(json_answers) + " |\n|---|" + "---|" * len(json_answers)
              + "\n| aggregated | " + " | ".join(f"{v:.1%}" for v in json_answers.values()) + " |")
    passed = all(rows[d].get(c, 1.0) >= t for d in rows if d in DEPLOYMENTS for c, t in TARGETS.items())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint.name), "per_category": args.per_category,
                                        "seed": args.seed, "accuracy": rows, "chance": CHANCE, "targets": TARGETS,
                                        "json_schema_answers": json_answers,
                                        "meets_targets": passed, "wrong_examples": wrong}, indent=2) + "\n")
    print(f"\ntargets {'met' if passed else 'NOT met'} in every deployment")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
