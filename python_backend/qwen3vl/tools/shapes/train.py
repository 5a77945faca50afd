"""`qwen3vl-train-demo`: train the small Qwen3-VL-MoE demo checkpoint on pictures of shapes.

    qwen3vl-train-demo --out DIR [--steps N] [--seed S] [--batch-size B]
    qwen3vl-train-demo --out DIR --init-from BASE --json-share F [--steps N] [--lr LR]

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

The second form is a fine-tuning stage: it starts from the checkpoint BASE (its weights,
tokenizer and configs), and a share F of the one-picture chats open with "Describe the picture as
JSON." (answered '{"colour": "red", "shape": "circle", "count": 2}', questions.json_answer); the
other chats are the first stage's, so the other answers keep being trained. Its pictures come from
another stream than the first stage's. The shipped checkpoint is both stages (`make train-demo`).

Deterministic for a seed on a given machine and thread count (torch's CPU kernels may sum in
another order with other thread counts). The output is the release's layout: config.json,
generation_config.json, bf16 safetensors shards with an index, the hub's fused expert layout,
tokenizer, chat template, processor configs, `training.json` (settings and loss curve) and a
README saying how it was made.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..make_checkpoint import (FUSED_EXPERTS, PRESETS, build_tokenizer, hf_configs, write_json, write_shards,
                               write_tokenizer_and_processor)
from .questions import CATEGORIES, JSON_CATEGORY, ONE_PICTURE, Question, ask, compare
from .scenes import COLOURS, KINDS, random_scene

PRESET = "shapes"
PROBE_MIN_COVER = 0.04          # share of a visual token's pixels a shape needs to name its colour
PROBE_KIND_COVER = 0.15         # ... and to name its kind
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


def first_question_weights(json_share: float = 0.0) -> dict[str, float]:
    """The first question's category weights in one-picture chats: FIRST_QUESTION, and with
    `json_share` the JSON question at that share, taken from the categories other than describe
    (answered right nearly always, and asked in later turns of every chat anyway), so that the
    description, the answer learnt last, opens as many chats as in the first stage."""
    if not json_share:
        return FIRST_QUESTION
    others = 1.0 - FIRST_QUESTION["describe"]
    if not 0.0 < json_share <= others:
        raise ValueError(f"json_share must be in [0, {others:g}] (describe keeps its "
                         f"{FIRST_QUESTION['describe']:g}), got {json_share}")
    scale = (others - json_share) / others
    return {c: w if c == "describe" else w * scale for c, w in FIRST_QUESTION.items()} | {JSON_CATEGORY: json_share}


def chat_example(rng: random.Random, json_share: float = 0.0) -> tuple[list[dict], list, list[Question]]:
    """(messages, PIL images, questions) for one training chat; a share `json_share` of the
    one-picture chats opens with the JSON question (first_question_weights; 0: the first stage's
    weights, so its stream of chats is unchanged)."""
    if rng.random() < COMPARE_FRACTION:
        q = compare(random_scene(rng), random_scene(rng))
        questions = [q]
    else:
        scene = random_scene(rng)
        weights = first_question_weights(json_share)
        first = rng.choices(list(weights), weights=list(weights.values()))[0]
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
    """[grid_h/merge * grid_w/merge, 4] int64: for each visual token of the picture (row-major
    over merge x merge blocks of patches, the processor's order), the shape covering most of it:

    - kind and colour, 1-based in KINDS and COLOURS; 0 where no shape covers `PROBE_MIN_COVER`
      of the token. A token holding only a sliver of a shape (under `PROBE_KIND_COVER`) names
      the colour but not the kind (-100, ignored): its pixels show the colour, not the outline,
      and calling it background would teach the tower to miss small shapes that fall across
      four tokens;
    - the shape's place from the left, 1 to 3 (0: background);
    - the number of shapes in the picture, 1 to 3, on every token.

    Place and number are facts about the whole picture that the tower's attention can gather
    (a tower block attends over all of one picture's patches); on every token, they make
    counting and ordering a lookup for the language model."""
    from PIL import Image

    rows, cols = grid_h // merge, grid_w // merge
    best = torch.zeros(rows * cols)
    labels = torch.zeros(rows * cols, 4, dtype=torch.int64)
    for place, s in enumerate(scene.shapes, start=1):       # scene.shapes are left to right
        single = type(scene)(scene.width, scene.height, (type(s)(s.kind, s.colour, (0, 0, 0), s.box),))
        mask = single.image().convert("L").point(lambda v: 255 - v)   # the shape white on black
        cover = torch.from_numpy(np.asarray(mask.resize((cols, rows), Image.BOX), dtype=np.float32)).flatten() / 255
        take = (cover > best) & (cover >= PROBE_MIN_COVER)
        best = torch.where(take, cover, best)
        labels[take, :3] = torch.tensor([KINDS.index(s.kind) + 1, list(COLOURS).index(s.colour) + 1, place])
    labels[(best > 0) & (best < PROBE_KIND_COVER), 0] = -100
    labels[:, 3] = len(scene.shapes)
    return labels


def batch(processor, rng: random.Random, size: int, prefix: list[int], end_id: int, json_share: float = 0.0) -> dict:
    """One padded training batch from `size` fresh chats: the processor's outputs, `labels`
    (answers only) and `block_labels` [visual tokens, 4] for the vision probe."""
    texts, images, scenes = [], [], []
    for _ in range(size):
        messages, ims, questions = chat_example(rng, json_share)
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images += ims
        scenes += questions[0].scenes
    enc = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    enc["labels"] = answer_labels(enc["input_ids"], prefix, end_id)
    enc["block_labels"] = torch.cat([block_labels(s, int(h), int(w))
                                     for s, (_, h, w) in zip(scenes, enc["image_grid_thw"].tolist())])
    return enc


def use_fast_cpu_kernels(model) -> None:
    """Two equal-valued, faster ways for training on CPU: transformers' `grouped_mm` experts (one
    grouped matmul instead of a Python loop over experts), and the patch embedding's Conv3d, whose
    stride equals its kernel, as the linear map it is (torch's CPU Conv3d backward took a fifth of
    each step). Same parameters and names, so the checkpoint is unchanged in form; serving and the
    parity tests use the model as transformers builds it."""
    import types

    model.set_experts_implementation("grouped_mm")
    embed = model.model.visual.patch_embed

    def patch_embed_as_linear(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels [patches, C * T * P * P] -> [patches, hidden]; weight [hidden, C, T, P, P]
        weight = self.proj.weight
        return torch.nn.functional.linear(pixels.view(-1, weight[0].numel()).to(weight.dtype),
                                          weight.view(weight.shape[0], -1), self.proj.bias)

    embed.forward = types.MethodType(patch_embed_as_linear, embed)


class VisionProbe(torch.nn.Module):
    """Linear heads on the vision tower's merged output (the visual tokens the language model
    gets) that name, for each token, the kind and colour of the shape under it, and with
    `place_and_number` also that shape's place from the left and the number of shapes in the
    picture (`block_labels`). Their loss trains the tower directly, which the answers alone do
    slowly; the probe is dropped after training."""

    def __init__(self, model, weight: float, place_and_number: bool = False):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        # one head per block_labels column: kind, colour, and with place_and_number the place
        # (0-3) and the number of shapes (1-3; 0 unused)
        sizes = (len(KINDS) + 1, len(COLOURS) + 1) + ((4, 4) if place_and_number else ())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for n in sizes)
        self.weight, self.tokens = weight, None
        model.model.visual.merger.register_forward_hook(lambda _m, _i, out: setattr(self, "tokens", out))

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        tokens, self.tokens = self.tokens, None
        ce = torch.nn.functional.cross_entropy
        return self.weight * sum(ce(head(tokens), labels[:, i]) for i, head in enumerate(self.heads))


@torch.no_grad()
def answer_accuracy(model, processor, rng: random.Random, per_category: int, prefix: list[int],
                    end_id: int, batch_size: int = 32, categories=CATEGORIES) -> dict[str, float]:
    """{category: fraction right} over fresh single-question chats, in-process: an answer is
    right when every answer token (and `<|im_end|>`) is the argmax given the ones before, which
    is exactly when greedy decoding produces it."""
    from .questions import random_question

    right = {}
    for category in categories:
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
        write_json(out / fname, obj)
    write_tokenizer_and_processor(out, tok, ids, preset["image_pixels"])
    return configs["config.json"], AutoProcessor.from_pretrained(out)


# What a fine-tuning stage takes from its base beside the weights (it writes its own README and
# training.json; the shards and their index are written anew).
def copy_base_files(base: Path, out: Path):
    """The base checkpoint's configs, tokenizer and processor files copied to `out`; returns
    (config dict, processor). Raises ValueError when `out` is `base` (the base would be
    overwritten while it is the record of the first stage)."""
    from transformers import AutoProcessor

    if out.resolve() == base.resolve():
        raise ValueError(f"--out {out} is --init-from's directory: write the fine-tuned checkpoint elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (
                "model.safetensors.index.json", "README.md", "training.json"):
            shutil.copy(f, out / f.name)
    return json.loads((out / "config.json").read_text()), AutoProcessor.from_pretrained(out)


def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under the release's names and fused expert layout ([E, H, 2I] and
    [E, I, H]; transformers holds them as [E, 2I, H] and [E, H, I])."""
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(FUSED_EXPERTS):
            t = t.transpose(1, 2)
        tensors[name] = t
    return tensors


def write_readme(out: Path, summary: dict) -> None:
    """`out/README.md`: what the checkpoint is and the command and settings that made it."""
    accuracy = ", ".join(f"{k} {v:.0%}" for k, v in summary["in_process_accuracy"].items())
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    base = summary.get("base")
    if base:
        made = (f"Trained in two stages: {command(base, 'BASE')}\n({base['threads']} torch threads, "
                f"{base['train_s'] / 60:.0f} minutes), then the fine-tuning stage\n{command(summary, 'DIR')}\n"
                f"({summary['threads']} torch threads, {summary['train_s'] / 60:.0f} minutes)")
    else:
        made = (f"Trained by {command(summary, 'DIR')}\n({summary['threads']} torch threads, "
                f"{summary['train_s'] / 60:.0f} minutes)")
    (out / "README.md").write_text(f"""# Qwen3-VL-MoE demo checkpoint: pictures of coloured shapes

{made} with transformers'
`Qwen3VLMoeForConditionalGeneration` and its processor: the release's architecture at a small
size ({size / 1e6:.1f} MB of bf16 weights, 8 routed experts top-2, three deepstack taps, interleaved
MRoPE, GQA). It answers a handful of questions about pictures of circles, squares and triangles
(the repository's docs/demo-checkpoint.md gives the task, the accuracy through the server
and the ablations). In-process greedy accuracy at the end of training, {summary['check_per_category']}
fresh pictures per category: {accuracy}. `training.json` holds the run's settings and loss curve.
""")


def command(summary: dict, out: str) -> str:
    """The `qwen3vl-train-demo` command line that a training summary records."""
    line = (f"qwen3vl-train-demo --out {out}" + (" --init-from BASE" if summary.get("base") else "")
            + f" --steps {summary['steps']} --seed {summary['seed']} --batch-size {summary['batch_size']}"
            f" --lr {summary['lr']:g} --probe-weight {summary['probe_weight']:g}"
            + (" --probe-place-and-number" if summary["probe_place_and_number"] else "")
            + (f" --json-share {summary['json_share']:g}" if summary.get("json_share") else ""))
    return f"`{line}`"


def train(out, steps: int = 5200, seed: int = 0, batch_size: int = 16, lr: float = 2e-3,
          probe_weight: float = PROBE_WEIGHT, probe_place_and_number: bool = False,
          check_per_category: int = 100, init_from=None, json_share: float = 0.0, log=print) -> dict:
    """Train and write the checkpoint to `out`; returns the training summary (also written to
    `out/training.json`). With `init_from` (a checkpoint this function wrote), start from its
    weights and files instead of fresh ones (a fine-tuning stage; its pictures come from another
    stream); `json_share` of the one-picture chats then open with the JSON question
    (first_question_weights). Raises ValueError for a `json_share` below 0 or above what
    describe's weight leaves, or `out` equal to `init_from`."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    first_question_weights(json_share)  # raises for a share outside [0, what describe's weight leaves]
    out = Path(out)
    torch.manual_seed(seed)
    if init_from is None:
        config_dict, processor = write_files(out, seed)
    else:
        config_dict, processor = copy_base_files(Path(init_from), out)
    config = Qwen3VLMoeConfig(**config_dict)
    config.text_config.router_aux_loss_coef = 0.01
    if init_from is None:
        model = Qwen3VLMoeForConditionalGeneration(config).float().train()
    else:
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(init_from, config=config,
                                                                   dtype=torch.float32).train()
    use_fast_cpu_kernels(model)
    probe = VisionProbe(model, probe_weight, probe_place_and_number)
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
    data = random.Random(f"{seed}/train" if init_from is None else f"{seed}/finetune")
    start, history = time.monotonic(), []
    for step in range(1, steps + 1):
        inputs = batch(processor, data, batch_size, prefix, end_id, json_share)
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
    categories = CATEGORIES + ((JSON_CATEGORY,) if json_share else ())
    accuracy = answer_accuracy(model, processor, random.Random(f"{seed}/check"), check_per_category, prefix, end_id,
                               categories=categories)
    log("in-process greedy accuracy on fresh pictures: "
        + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()), flush=True)
    write_shards(out, hub_state_dict(model), PRESETS[PRESET]["shard_bytes"])
    summary = {"preset": PRESET, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
               "probe_weight": probe_weight, "probe_place_and_number": probe_place_and_number,
               "check_per_category": check_per_category, "json_share": json_share,
               "threads": torch.get_num_threads(), "train_s": round(time.monotonic() - start, 1),
               "final_loss": history[-1]["loss"], "in_process_accuracy": accuracy,
               "history": history}
    if init_from is not None:
        # The first stage's record (settings and loss curve), so that this checkpoint says how
        # all of it was made.
        summary["base"] = json.loads((Path(init_from) / "training.json").read_text())
    write_json(out / "training.json", summary)
    write_readme(out, summary)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen3vl-train-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--steps", type=int, default=5200, help="training steps (default: 5200, the shipped model's)")
    ap.add_argument("--seed", type=int, default=0, help="the weights' and pictures' seed (default: 0)")
    ap.add_argument("--batch-size", type=int, default=16, help="chats per step (default: 16)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 0.002)")
    ap.add_argument("--probe-weight", type=float, default=PROBE_WEIGHT,
                    help="weight of the vision probe's loss (0: train on the answers alone)")
    ap.add_argument("--probe-place-and-number", action="store_true",
                    help="the probe also names each shape's place from the left and the number of shapes "
                         "(an experiment: counts and descriptions improve, colours and yes/no fall)")
    ap.add_argument("--init-from", type=Path, metavar="BASE",
                    help="fine-tune: start from this checkpoint (one this command wrote) instead of fresh weights")
    ap.add_argument("--json-share", type=float, default=0.0,
                    help='share of one-picture chats that open with "Describe the picture as JSON." (default: 0)')
    a = ap.parse_args(argv)
    try:
        summary = train(a.out, a.steps, a.seed, a.batch_size, a.lr, a.probe_weight, a.probe_place_and_number,
                        init_from=a.init_from, json_share=a.json_share)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {a.out}: {a.steps} steps in {summary['train_s']:.0f} s, final loss {summary['final_loss']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
