"""`qwen3vl-train-demo`: train the small Qwen3-VL-MoE demo checkpoint on pictures of shapes.

    qwen3vl-train-demo --out DIR [--steps N] [--seed S] [--batch-size B]

The model is transformers' `Qwen3VLMoeForConditionalGeneration` at the `shapes` preset's size
(the release's architecture: a vision tower with three deepstack taps, interleaved MRoPE, GQA,
8 routed experts with top-2), fed by transformers' `Qwen3VLProcessor` built from the files this
script writes. Every step draws fresh pictures from a generator seeded by `--seed`, so the model
never sees a picture twice and a test set drawn with another seed is new to it.

One training example is one picture (or, for "Which picture has more shapes?", two) and a chat
of several questions about it, one per turn, in random order; the loss is on the assistant
answers only (each answer's tokens and its `<|im_end|>`). The first turn is exactly what the
server renders for a single question, and asking several questions per picture spreads the cost
of the vision tower over more answers.

Deterministic for a seed on a given machine and thread count (torch's CPU kernels may sum in
another order with other thread counts). The output is the release's layout: config.json,
generation_config.json, bf16 safetensors shards with an index, the hub's fused expert layout,
tokenizer, chat template, processor configs, and a README saying how it was made.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..cli.make_checkpoint import (PRESETS, _write_json, hf_configs, write_shards,
                                   write_tokenizer_and_processor, build_tokenizer)
from .questions import CATEGORIES, ONE_PICTURE, Question, ask, compare
from .scenes import COLOURS, KINDS, random_scene

PRESET = "shapes"
PROBE_MIN_COVER = 0.15          # share of a visual token's pixels a shape needs to name it
PROBE_WEIGHT = 1.0              # the vision probe's loss beside the answers' (0: no probe)
EXISTS_PER_PICTURE = 2           # "Is there ...?" turns per one-picture chat (one turn of each other category)
# The first question's category in one-picture chats; the rest follow it. The weights favour the
# questions the model learns last (a colour named by kind; the whole description).
FIRST_QUESTION = {"describe": 0.3, "colour": 0.3, "shape": 0.15, "exists": 0.15, "count": 0.1}
COMPARE_FRACTION = 0.15          # chats about two pictures


def tokenizer_corpus(rng: random.Random, n: int = 4000) -> list[str]:
    """Text the demo's BPE is trained on: the task's questions and answers, with the words of
    every colour and kind, so that each question is a handful of tokens."""
    lines = []
    for _ in range(n):
        scene = random_scene(rng)
        for category in ONE_PICTURE:
            q = ask(category, scene, rng)
            if q is not None:
                lines += [q.text, q.answer]
    lines += [compare(random_scene(rng), random_scene(rng)).text, "the first.", "the second.", "neither."]
    lines += [f"{c} {k}" for c in COLOURS for k in KINDS] + ["system", "user", "assistant"]
    return lines


def chat_example(rng: random.Random) -> tuple[list[dict], list, list[Question]]:
    """(messages, PIL images, questions) for one training chat."""
    if rng.random() < COMPARE_FRACTION:
        q = compare(random_scene(rng), random_scene(rng))
        questions = [q]
    else:
        scene = random_scene(rng)
        first = rng.choices(list(FIRST_QUESTION), weights=list(FIRST_QUESTION.values()))[0]
        rest = [c for c in ONE_PICTURE if c not in (first, "describe")] + ["exists"] * (EXISTS_PER_PICTURE - 1)
        rng.shuffle(rest)
        # "Describe the picture." tells every shape, and any answer tells something: a later
        # turn may be answered from the text before it. Only the first turn is what the server
        # asks, so its category is drawn with weights; describe comes first or last.
        order = [first] + rest + (["describe"] if first != "describe" else [])
        questions = [q for c in order if (q := ask(c, scene, rng)) is not None]
    images = [s.image() for s in questions[0].scenes]
    messages = []
    for i, q in enumerate(questions):
        content = [{"type": "image"} for _ in images] if i == 0 else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": q.text}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": q.answer}]})
    return messages, images, questions


def answer_labels(input_ids: torch.Tensor, prefix: list[int], end_id: int) -> torch.Tensor:
    """labels [B, T] int64: input_ids where a token belongs to an assistant answer (after each
    `prefix` = ids of "<|im_start|>assistant\\n", up to and including `end_id`), else -100."""
    labels = torch.full_like(input_ids, -100)
    n = len(prefix)
    for b, row in enumerate(input_ids.tolist()):
        t = 0
        while t < len(row):
            if row[t:t + n] == prefix:
                t += n
                while t < len(row):
                    labels[b, t] = row[t]
                    t += 1
                    if row[t - 1] == end_id:
                        break
            else:
                t += 1
    return labels


def block_labels(scene, grid_h: int, grid_w: int, merge: int = 2) -> torch.Tensor:
    """[grid_h/merge * grid_w/merge, 2] int64: for each visual token of the picture (row-major
    over merge x merge blocks of patches, the processor's order), (kind, colour) of the shape
    covering most of it, 1-based in KINDS and COLOURS, or (0, 0) where no shape covers
    `PROBE_MIN_COVER` of it."""
    from PIL import Image

    rows, cols = grid_h // merge, grid_w // merge
    best = torch.zeros(rows * cols)
    labels = torch.zeros(rows * cols, 2, dtype=torch.int64)
    for s in scene.shapes:
        single = type(scene)(scene.width, scene.height, (type(s)(s.kind, s.colour, (0, 0, 0), s.box),))
        mask = single.image().convert("L").point(lambda v: 255 - v)   # the shape white on black
        cover = torch.from_numpy(np.asarray(mask.resize((cols, rows), Image.BOX), dtype=np.float32)).flatten() / 255
        take = (cover > best) & (cover >= PROBE_MIN_COVER)
        best = torch.where(take, cover, best)
        labels[take] = torch.tensor([KINDS.index(s.kind) + 1, list(COLOURS).index(s.colour) + 1])
    return labels


def batch(processor, rng: random.Random, size: int, prefix: list[int], end_id: int) -> dict:
    """One padded training batch from `size` fresh chats: the processor's outputs, `labels`
    (answers only) and `block_labels` [visual tokens, 2] for the vision probe."""
    texts, images, scenes = [], [], []
    for _ in range(size):
        messages, ims, questions = chat_example(rng)
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images += ims
        scenes += questions[0].scenes
    enc = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    enc["labels"] = answer_labels(enc["input_ids"], prefix, end_id)
    enc["block_labels"] = torch.cat([block_labels(s, int(h), int(w))
                                     for s, (_, h, w) in zip(scenes, enc["image_grid_thw"].tolist())])
    return enc


class VisionProbe(torch.nn.Module):
    """Linear heads on the vision tower's merged output (the visual tokens the language model
    gets) that name the kind and colour of the shape under each token. Their loss trains the
    tower directly, which the answers alone do slowly; the probe is dropped after training."""

    def __init__(self, model, weight: float):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.kind, self.colour = torch.nn.Linear(hidden, len(KINDS) + 1), torch.nn.Linear(hidden, len(COLOURS) + 1)
        self.weight, self.tokens = weight, None
        model.model.visual.merger.register_forward_hook(lambda _m, _i, out: setattr(self, "tokens", out))

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        tokens, self.tokens = self.tokens, None
        ce = torch.nn.functional.cross_entropy
        return self.weight * (ce(self.kind(tokens), labels[:, 0]) + ce(self.colour(tokens), labels[:, 1]))


@torch.no_grad()
def answer_accuracy(model, processor, rng: random.Random, per_category: int, prefix: list[int],
                    end_id: int, batch_size: int = 32) -> dict[str, float]:
    """{category: fraction right} over fresh single-question chats, in-process: an answer is
    right when every answer token (and `<|im_end|>`) is the argmax given the ones before, which
    is exactly when greedy decoding produces it."""
    from .questions import random_question

    right = {}
    for category in CATEGORIES:
        questions = [random_question(category, rng) for _ in range(per_category)]
        hits = 0
        for i in range(0, len(questions), batch_size):
            chunk = questions[i:i + batch_size]
            texts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"} for _ in q.scenes] + [{"type": "text", "text": q.text}]},
                 {"role": "assistant", "content": [{"type": "text", "text": q.answer}]}], tokenize=False)
                for q in chunk]
            enc = processor(text=texts, images=[s.image() for q in chunk for s in q.scenes],
                            padding=True, return_tensors="pt")
            labels = answer_labels(enc["input_ids"], prefix, end_id)
            logits = model(**enc).logits
            predicted = logits[:, :-1].argmax(-1)
            target, mask = labels[:, 1:], labels[:, 1:] != -100
            hits += int(((predicted == target) | ~mask).all(-1).sum())
        right[category] = hits / len(questions)
    return right


def write_files(out: Path, seed: int):
    """The checkpoint's configs, tokenizer and processor files; returns (config dict, processor)."""
    from transformers import AutoProcessor

    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS[PRESET]
    tok, ids = build_tokenizer(tokenizer_corpus(random.Random(f"{seed}/tokenizer")), preset["bpe_vocab"])
    configs = hf_configs(PRESET, ids)
    configs["generation_config.json"].update(do_sample=False)   # greedy: one right answer
    for name in ("temperature", "top_p", "top_k"):
        configs["generation_config.json"].pop(name)
    for fname, obj in configs.items():
        _write_json(out / fname, obj)
    write_tokenizer_and_processor(out, tok, ids, preset["image_pixels"])
    return configs["config.json"], AutoProcessor.from_pretrained(out)


def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under the release's names and fused expert layout ([E, H, 2I] and
    [E, I, H]; transformers holds them as [E, 2I, H] and [E, H, I])."""
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            t = t.transpose(1, 2)
        tensors[name] = t
    return tensors


def train(out, steps: int = 2200, seed: int = 0, batch_size: int = 16, lr: float = 2e-3,
          probe_weight: float = PROBE_WEIGHT, check_per_category: int = 100, log=print) -> dict:
    """Train and write the checkpoint to `out`; returns the training summary (also written to
    `out/training.json`)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    out = Path(out)
    torch.manual_seed(seed)
    config_dict, processor = write_files(out, seed)
    config = Qwen3VLMoeConfig(**config_dict)
    config.text_config.router_aux_loss_coef = 0.01
    model = Qwen3VLMoeForConditionalGeneration(config).float().train()
    probe = VisionProbe(model, probe_weight)
    tok = processor.tokenizer
    prefix = tok.encode("<|im_start|>assistant\n")
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    params = list(model.named_parameters()) + list(probe.named_parameters())
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    data = random.Random(f"{seed}/train")
    start, history = time.monotonic(), []
    for step in range(1, steps + 1):
        inputs = batch(processor, data, batch_size, prefix, end_id)
        labels = inputs.pop("block_labels")
        answers_loss = model(**inputs, output_router_logits=True).loss
        probe_loss = probe.loss(labels)
        loss = answers_loss + probe_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps:
            history.append({"step": step, "loss": round(answers_loss.item(), 4), "probe_loss": round(probe_loss.item(), 4),
                            "elapsed_s": round(time.monotonic() - start, 1)})
            log(f"step {step}/{steps}  loss {answers_loss.item():.4f}  probe {probe_loss.item():.4f}  "
                f"{time.monotonic() - start:.0f} s", flush=True)
    model.eval()
    accuracy = answer_accuracy(model, processor, random.Random(f"{seed}/check"), check_per_category, prefix, end_id)
    log("in-process greedy accuracy on fresh pictures: "
        + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()), flush=True)
    write_shards(out, hub_state_dict(model), PRESETS[PRESET]["shard_bytes"])
    summary = {"preset": PRESET, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
               "probe_weight": probe_weight,
               "threads": torch.get_num_threads(), "train_s": round(time.monotonic() - start, 1),
               "final_loss": history[-1]["loss"], "in_process_accuracy": accuracy,
               "history": history}
    _write_json(out / "training.json", summary)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen3vl-train-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--probe-weight", type=float, default=PROBE_WEIGHT,
                    help="weight of the vision probe's loss (0: train on the answers alone)")
    a = ap.parse_args(argv)
    summary = train(a.out, a.steps, a.seed, a.batch_size, a.lr, a.probe_weight)
    print(f"wrote {a.out}: {a.steps} steps in {summary['train_s']:.0f} s, final loss {summary['final_loss']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
