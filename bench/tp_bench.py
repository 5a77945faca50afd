"""Tensor parallel on this machine (gloo on the CPU, NCCL on GPUs): each rank's resident weights,
and a batch of decodes' step time in one process and at --tensor-parallel-size, with the
embedding and LM head split by vocabulary (what serves) and replicated on every rank.

    python bench/tp_bench.py [--preset small] [--tp 2] [--batch 8] [--steps 24] [--ep]

The rows: weights per rank (MiB, from each rank's parameters), the median decode step (ms) after
the prompts' prefill, and its ratio to one process. On 2 CPU cores the ranks share the cores, so
the step times say what the collectives cost, not what more GPUs gain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_backend"))

from qwen3vl.engine.engine import Engine  # noqa: E402
from qwen3vl.features import VisualFeatures  # noqa: E402
from qwen3vl.model.config import ModelConfig  # noqa: E402
from qwen3vl.parallel.engine import parallel_engine  # noqa: E402
from qwen3vl.settings import ServingConfig  # noqa: E402
from qwen3vl.tools.make_checkpoint import make_checkpoint  # noqa: E402


def decode_steps(engine: Engine, batch: int, steps: int) -> list[float]:
    """Seconds of each step once every sequence decodes (prompts prefilled first)."""
    empty = VisualFeatures.empty(engine.config)
    for i in range(batch):
        engine.add(engine.new_sequence(f"Tell me story number {i}.", empty,
                                       engine.params(max_tokens=steps + 2, ignore_eos=True, temperature=0.0)))
    while any(s.prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    times = []
    while engine.has_work():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[:-1] or times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--checkpoint", help="a checkpoint directory instead of a random --preset one")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--ep", action="store_true", help="expert parallel")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    args = p.parse_args()
    ckpt = args.checkpoint or make_checkpoint(Path(tempfile.gettempdir()) / f"qwen3vl-{args.preset}", args.preset)
    config = ModelConfig.load(ckpt)
    base = dict(kv_cache_mb=256, enable_prefix_caching=False)
    rows = []
    one = Engine.from_checkpoint(config, ServingConfig(**base))
    total = sum(p.numel() * p.element_size() for p in one.model.parameters())
    rows.append(("1 process", {0: total}, statistics.median(decode_steps(one, args.batch, args.steps))))
    del one
    for vocab_parallel in (True, False):
        engine, group = parallel_engine(config, ServingConfig(**base, tensor_parallel_size=args.tp,
                                                              enable_expert_parallel=args.ep,
                                                              vocab_parallel=vocab_parallel))
        try:
            step = statistics.median(decode_steps(engine, args.batch, args.steps))
            rows.append((f"TP{args.tp}{' EP' if args.ep else ''}, vocab {'split' if vocab_parallel else 'replicated'}",
                         dict(group.weight_bytes), step))
        finally:
            group.stop()
    print(f"\n{ckpt} ({config.dtype}, {config.device}), {args.batch} decodes per step:")
    print(f"{'layout':36} {'weights per rank (MiB)':>24} {'of one process':>15} {'decode step (ms)':>17} {'ratio':>6}")
    for name, weights, step in rows:
        most = max(weights.values())
        print(f"{name:36} {', '.join(f'{b / 2**20:.1f}' for _, b in sorted(weights.items())):>24} "
              f"{most / total:>15.3f} {1e3 * step:>17.2f} {step / rows[0][2]:>6.2f}")


if __name__ == "__main__":
    main()
