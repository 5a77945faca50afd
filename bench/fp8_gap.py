"""The W8A16 gap: a checkpoint's FP8 weights (dequantized at load) against the weights they were
quantized from, both computed in fp32 on the CPU, side by side in one run.

    python bench/fp8_gap.py [--per-category 20] [--out bench/results/fp8_gap-cpu.json]

Each checkpoint is quantized block-wise the way Qwen's FP8 releases are (128x128 tiles,
s = amax / 448, per-expert experts; tools/fp8_checkpoint.py), once with the language model's
Linear weights only and once with the vision blocks' too. Checkpoints:

- `shapes`: the trained demo checkpoint (checkpoints/shapes), asked `--per-category` fresh
  questions per category about fresh pictures (tools/shapes/questions.py): accuracy of each
  variant, and how often FP8's greedy answer is the original's, token for token;
- `tiny`: the tests' random tiny preset (no training: its logits react to any change far more
  than a trained model's), on the tests' prompts.

Per variant: the weights' rounding error (norm of W_fp8 - W over norm of W, over the quantized
tensors); prefill logits' max |error| over the largest |logit| (mean / max over prompts) at all
prompt positions, at its text positions only (not the pictures' placeholders) and at the last
one (which picks the first answer token); the share of prompt positions whose top-1 token is
unchanged; greedy answers identical; accuracy.
The weight error counts the language model's tensors only.

W8A8 (fp8_mode native: activations quantized per token group of 128 too) is measured where the
FP8 checkpoint can run natively (model/fp8_linear.check_native_fp8): the per-expert layout needs
moe_intermediate_size % 128 == 0, which neither checkpoint has, so a third variant quantizes the
experts fused ([E, 2I, H]) and is run both ways, W8A16 and W8A8, plus a row of W8A8 against that
W8A16 (the activations' rounding alone). W8A8 runs as the torch emulation (kernels=torch,
fp8_mode native: kernels/fp8_reference.py), which the Triton kernels equal bit for bit under
the interpreter (tests/test_fp8_native.py): the same numbers a GPU's kernels give up to fp32
summation order.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_backend"))

from transformers import AutoProcessor  # noqa: E402

from qwen3vl.encoder.encoder import VisionEncoder  # noqa: E402
from qwen3vl.engine.engine import Engine  # noqa: E402
from qwen3vl.model.config import ModelConfig  # noqa: E402
from qwen3vl.model.fp8_linear import check_native_fp8  # noqa: E402
from qwen3vl.model.reference import prefill_logits  # noqa: E402
from qwen3vl.tools.make_checkpoint import make_checkpoint, quantize_fp8  # noqa: E402
from qwen3vl.tools.shapes.questions import CATEGORIES, random_question  # noqa: E402

SHAPES = ROOT / "checkpoints" / "shapes"
MAX_TOKENS = 24
# variant: (vision blocks quantized too, expert layout)
VARIANTS = {"fp8 language": (False, "per-expert"), "fp8 language + vision": (True, "per-expert"),
            "fp8 language, fused experts": (False, "transformers")}


def noise_png(width: int, height: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def load(ckpt: Path, native: bool = False) -> tuple[Engine, VisionEncoder]:
    """An fp32 CPU engine and encoder; native: fp8_mode native on the torch kernels (the W8A8
    emulation; resolve_fp8_mode keeps the interpreter for tests, so the mode is set here)."""
    with contextlib.redirect_stdout(sys.stderr):        # the loaders' progress lines; stdout is the table
        config = ModelConfig.load(ckpt, device="cpu", dtype="float32")
        if native:
            config = dataclasses.replace(config, fp8_mode="native")
        return Engine.from_checkpoint(config), VisionEncoder(config, AutoProcessor.from_pretrained(ckpt).image_processor)


def weight_error(original: Engine, fp8: Engine) -> float:
    """sqrt(sum ||W_fp8 - W||^2 / sum ||W||^2) over the language model's tensors FP8 changed."""
    want, num, den = original.model.state_dict(), 0.0, 0.0
    for name, t in fp8.model.state_dict().items():
        if not torch.equal(t, want[name]):
            num += (t.double() - want[name].double()).pow(2).sum().item()
            den += want[name].double().pow(2).sum().item()
    return (num / den) ** 0.5


def run(model: tuple[Engine, VisionEncoder], prompts: list[tuple[str, list[bytes]]]) -> list[dict]:
    engine, encoder = model
    out = []
    for text, images in prompts:
        features = encoder.encode([images])[0]
        logits = prefill_logits(engine, text, features)
        steps = list(engine.generate(text, features, engine.params(max_tokens=MAX_TOKENS, temperature=0.0)))
        out.append({"logits": logits, "text_rows": ~engine.prepare(text, features).visual_mask,
                    "tokens": [t for s in steps for t in s.token_ids], "text": "".join(s.text for s in steps)})
    return out


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def compare(original: list[dict], fp8: list[dict], answers: list[str] | None) -> dict:
    """The gap over the prompts: logits at every prompt position and at the last one (which picks
    the first answer token), top-1 agreement over prompt positions, greedy answers, accuracy."""
    errors = [relative(b["logits"], a["logits"]) for a, b in zip(original, fp8)]
    text = [relative(b["logits"][a["text_rows"]], a["logits"][a["text_rows"]]) for a, b in zip(original, fp8)]
    last = [relative(b["logits"][-1], a["logits"][-1]) for a, b in zip(original, fp8)]
    top1 = [(b["logits"].argmax(-1) == a["logits"].argmax(-1)).float().mean().item() for a, b in zip(original, fp8)]
    row = {"prompts": len(original), "logit_error_mean": sum(errors) / len(errors), "logit_error_max": max(errors),
           "text_logit_error_mean": sum(text) / len(text), "text_logit_error_max": max(text),
           "last_logit_error_mean": sum(last) / len(last), "last_logit_error_max": max(last),
           "top1_agreement": sum(top1) / len(top1),
           "greedy_identical": sum(a["tokens"] == b["tokens"] for a, b in zip(original, fp8)) / len(original)}
    if answers:
        row["accuracy_original"] = sum(a["text"].strip() == w for a, w in zip(original, answers)) / len(answers)
        row["accuracy_fp8"] = sum(b["text"].strip() == w for b, w in zip(fp8, answers)) / len(answers)
    return row


def measure(name: str, ckpt: Path, prompts, answers, work: Path) -> dict:
    original = load(ckpt)
    reference = run(original, prompts)
    rows = {}
    text = original[0].config.text
    for variant, (vision, layout) in VARIANTS.items():
        start = time.perf_counter()
        path = quantize_fp8(ckpt, work / f"{name}-{'vision' if vision else 'language'}-{layout}", layout, vision=vision)
        fp8 = load(path)
        w8a16 = run(fp8, prompts)
        rows[variant] = {"weight_error": weight_error(original[0], fp8[0]), **compare(reference, w8a16, answers)}
        print(f"{name} {variant}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if check_native_fp8(path, "native", "auto", text.num_experts, text.moe_intermediate_size,
                            lambda line: print(f"{name} {variant}: {line}", file=sys.stderr)) != "native":
            continue
        start = time.perf_counter()
        w8a8 = run(load(path, native=True), prompts)
        rows[f"{variant}, W8A8"] = {"weight_error": rows[variant]["weight_error"], **compare(reference, w8a8, answers)}
        rows[f"{variant}, W8A8 vs its W8A16"] = {"weight_error": 0.0, **compare(w8a16, w8a8, None)}
        print(f"{name} {variant} W8A8: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-category", type=int, default=20, help="demo questions per category")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fp8_gap-cpu.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rng = random.Random(f"{args.seed}/fp8-gap")
    questions = [random_question(c, rng) for c in CATEGORIES for _ in range(args.per_category)]
    demo = [(q.text, [s.png() for s in q.scenes]) for q in questions]
    tiny_prompts = [("What is in the picture? Answer in one sentence.", []),
                    ("What is in the picture? Answer in one sentence.", [noise_png(200, 130, 1)]),
                    ("Describe the picture.", [noise_png(96, 300, 2), noise_png(260, 180, 3)]),
                    ("Tell me a story about a lighthouse.", [])]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"shapes": measure("shapes", SHAPES, demo, [q.answer for q in questions], work),
                   "tiny": measure("tiny", make_checkpoint(work / "tiny", "tiny"), tiny_prompts, None, work)}
    report = {"what": "W8A16 (FP8 weights dequantized to fp32) and W8A8 (fp8_mode native, the torch emulation) "
                      "against the original weights, fp32 on the CPU",
              "per_category": args.per_category, "max_tokens": MAX_TOKENS, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| checkpoint | variant | weight error | logit error: all positions | text positions | last position "
          "| top-1 agree | greedy identical | accuracy original -> fp8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ckpt, rows in results.items():
        for variant, r in rows.items():
            acc = f"{r['accuracy_original']:.1%} -> {r['accuracy_fp8']:.1%}" if "accuracy_fp8" in r else "-"
            print(f"| {ckpt} ({r['prompts']} prompts) | {variant} | {r['weight_error']:.2%} | "
                  f"{r['logit_error_mean']:.3f} / {r['logit_error_max']:.3f} | "
                  f"{r['text_logit_error_mean']:.3f} / {r['text_logit_error_max']:.3f} | "
                  f"{r['last_logit_error_mean']:.3f} / {r['last_logit_error_max']:.3f} | {r['top1_agreement']:.1%} | "
                  f"{r['greedy_identical']:.1%} | {acc} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
