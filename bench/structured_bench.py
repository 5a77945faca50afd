"""What a grammar costs a decode step: batch-8 decode tokens/s with every sequence constrained by
a JSON schema, against the same batch unconstrained, side by side in one run (alternating
rounds, the medians compared).

    python bench/structured_bench.py [--preset tiny|small] [--checkpoint DIR] [--batch 8]
        [--tokens 128] [--rounds 3] [--device cpu|cuda] [--out bench/results/structured-cpu.json]

The engine runs in this process (no server): each round generates `--tokens` tokens for each of
`--batch` requests. The constrained requests ask for a JSON array of at least 400 enum items, so
no answer completes inside `--tokens` and both batches decode the same number of tokens; the
grammar is compiled (and cached) in a warm-up round first. Decode tokens/s counts the tokens
generated after every sequence of the batch has its first one (prefill excluded). The cost per
step is the mask fill per constrained row (xgrammar's fill_next_token_bitmask, serial on the
engine thread), the UTF-8 guard, the bitmask's application and the matcher's advance; that
work is also timed inside the constrained steps themselves (`grammar_share_of_step`), which a
loaded machine disturbs less than the two rates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_backend"))

from qwen3vl.engine.engine import Engine  # noqa: E402
from qwen3vl.engine.structured import GrammarState, StructuredOutputs  # noqa: E402
from qwen3vl.features import VisualFeatures  # noqa: E402
from qwen3vl.model.config import ModelConfig  # noqa: E402
from qwen3vl.settings import ServingConfig  # noqa: E402
from qwen3vl.tools.make_checkpoint import make_checkpoint  # noqa: E402

SCHEMA = {"type": "object", "properties": {"items": {
    "type": "array", "minItems": 400, "items": {"enum": ["red", "green", "blue"]}}}, "required": ["items"]}


class GrammarClock:
    """Seconds spent in the grammar's work (masks, the matchers' advance) and decode steps seen,
    wrapped around the engine's own calls: the share of a step the grammar takes, measured in
    the same steps (less sensitive to a loaded machine than two separate rates)."""

    def __init__(self, engine: Engine):
        self.seconds, self.steps, self.step_seconds = 0.0, 0, 0.0
        engine.grammars.mask = self.timed(engine.grammars.mask)
        GrammarState.accept = self.timed(GrammarState.accept)

    def timed(self, fn):
        def timed_fn(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - start
        return timed_fn


def decode_rate(engine: Engine, batch: int, tokens: int, constrained: bool,
                clock: GrammarClock | None = None) -> tuple[float, int]:
    """(decode tokens/s, decode tokens) of one batch run to `tokens` tokens each."""
    so = StructuredOutputs.parse(json.dumps({"json": SCHEMA})) if constrained else None
    params = engine.params(max_tokens=tokens, temperature=0.0, ignore_eos=not constrained)
    seqs = [engine.new_sequence(f"List colours, round {i}", VisualFeatures.empty(engine.config), params,
                                structured=so) for i in range(batch)]
    for seq in seqs:
        engine.add(seq)
    start, counted = None, 0
    while engine.has_work():
        before, step_start = (clock.seconds if clock else 0.0), time.perf_counter()
        out = engine.step()
        if clock is not None and start is not None:
            clock.steps += 1
            clock.step_seconds += time.perf_counter() - step_start
        elif clock is not None:
            clock.seconds = before  # prefill steps are not counted
        if out.failures:
            raise RuntimeError(f"a request failed: {next(iter(out.failures.values()))}")
        if start is None:
            if all(seq.output_ids for seq in seqs):
                start = time.perf_counter()
            continue
        counted += sum(len(step.token_ids) for step in out.steps.values())
    elapsed = time.perf_counter() - start
    if any(len(seq.output_ids) != tokens for seq in seqs):
        raise RuntimeError("a sequence ended early: the rates would not compare the same work")
    return counted / elapsed, counted


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Constrained / unconstrained decode tokens/s at one batch size, "
                                            "side by side in one run.")
    p.add_argument("--preset", default="tiny", help="make a random checkpoint of this preset (default: tiny)")
    p.add_argument("--checkpoint", help="use this checkpoint instead of a random one")
    p.add_argument("--batch", type=int, default=8, help="requests decoding together (default: 8)")
    p.add_argument("--tokens", type=int, default=128, help="tokens each request generates (default: 128)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each kind, alternating (default: 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp) / args.preset, args.preset)
        config = ModelConfig.load(checkpoint, device=args.device)
        engine = Engine.from_checkpoint(config, ServingConfig(kv_cache_mb=256, max_num_seqs=max(8, args.batch)))
        decode_rate(engine, args.batch, 8, True)  # warm-up: the grammar's compile, the first steps
        decode_rate(engine, args.batch, 8, False)
        rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        clock = GrammarClock(engine)
        for _ in range(args.rounds):
            for kind in rates:
                constrained = kind == "constrained"
                rates[kind].append(decode_rate(engine, args.batch, args.tokens, constrained,
                                               clock if constrained else None)[0])
        engine.grammars.close()
    median = {kind: statistics.median(values) for kind, values in rates.items()}
    result = {"checkpoint": str(args.checkpoint or f"random {args.preset}"), "device": args.device,
              "batch": args.batch, "tokens": args.tokens, "rounds": args.rounds,
              "decode_tokens_per_s": {k: [round(v, 1) for v in vals] for k, vals in rates.items()},
              "median_tokens_per_s": {k: round(v, 1) for k, v in median.items()},
              "ratio_constrained_over_unconstrained": round(median["constrained"] / median["unconstrained"], 3),
              "constrained_decode_step_ms": round(1000 * clock.step_seconds / clock.steps, 2),
              "grammar_ms_per_step": round(1000 * clock.seconds / clock.steps, 3),
              "grammar_share_of_step": round(clock.seconds / clock.step_seconds, 4)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
