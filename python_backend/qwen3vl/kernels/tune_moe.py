"""Tune the fused-MoE tile configs on a CUDA GPU and write a config file (moe_config's format).

    python -m qwen3vl.kernels.tune_moe --experts 128 --hidden 2048 --intermediate 768 --top-k 8
    python -m qwen3vl.kernels.tune_moe ... --tokens 1,8,64 --quick --out DIR   # a shorter sweep
    python -m qwen3vl.kernels.tune_moe ... --dry-run                            # the plan, no GPU

For each token count M it times fused_moe (both GEMMs and the steps between, as served) over
every config of the search space that fits M, on random bf16 weights and softmax-top-k routing,
and keeps the fastest; the file is named for this GPU and this triton version. As vLLM's
benchmark_moe.py --tune, without Ray. Each config compiles once: the full space takes long,
--quick a few minutes.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Callable

from . import moe_config

# vLLM's and SGLang's tuned tables use these values (see configs/)
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
FULL_SPACE = dict(BLOCK_SIZE_M=(16, 32, 64, 128), BLOCK_SIZE_N=(32, 64, 128, 256), BLOCK_SIZE_K=(64, 128, 256),
                  GROUP_SIZE_M=(1, 16, 32, 64), num_warps=(4, 8), num_stages=(2, 3, 4, 5))
QUICK_SPACE = dict(BLOCK_SIZE_M=(16, 32, 64, 128), BLOCK_SIZE_N=(64, 128, 256), BLOCK_SIZE_K=(64, 128),
                   GROUP_SIZE_M=(1, 16), num_warps=(4, 8), num_stages=(2, 3, 4))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qwen3vl.kernels.tune_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=128, help="E (default: Qwen3-VL-30B-A3B's 128)")
    p.add_argument("--hidden", type=int, default=2048, help="H")
    p.add_argument("--intermediate", type=int, default=768, help="I, the expert intermediate size (N in the file name)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--tokens", type=_int_list, default=DEFAULT_TOKENS, help="token counts M, comma separated")
    p.add_argument("--quick", action="store_true", help="the smaller search space")
    p.add_argument("--iters", type=int, default=20, help="timed calls per config")
    p.add_argument("--out", type=Path, default=moe_config.CONFIG_DIR, help="folder of the config file")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = p.parse_args(argv)
    for name in ("experts", "hidden", "intermediate", "top_k", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.top_k > args.experts:
        p.error("--top-k cannot exceed --experts")
    return args


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be positive")
    return values


def search_space(m: int, quick: bool) -> list[dict]:
    """The configs tried at m tokens: the space without the BLOCK_SIZE_M larger than m needs
    (a step of m tokens has at most m rows per expert; vLLM prunes the same way)."""
    space = QUICK_SPACE if quick else FULL_SPACE
    cap = max(16, 1 << (m - 1).bit_length())
    configs = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    return [c for c in configs if c["BLOCK_SIZE_M"] <= cap]


def tune(args: argparse.Namespace, measure: Callable[[int, dict], float | None],
         log: Callable[[str], None] = print) -> dict[int, dict]:
    """token count -> the config with the least `measure(m, config)` seconds (None: it failed,
    e.g. out of shared memory). Raises RuntimeError when no config of some M ran."""
    best = {}
    for m in args.tokens:
        timings = [(t, i, c) for i, c in enumerate(search_space(m, args.quick)) if (t := measure(m, c)) is not None]
        if not timings:
            raise RuntimeError(f"no config ran at M={m}")
        seconds, _, best[m] = min(timings, key=lambda row: row[:2])
        log(f"M={m}: {seconds * 1e6:.1f} us  {best[m]}")
    return best


def gpu_measure(args: argparse.Namespace) -> Callable[[int, dict], float | None]:
    """A measure function timing fused_moe on this GPU with CUDA events (median of args.iters)."""
    import torch

    from .fused_moe import fused_moe

    dtype = getattr(torch, args.dtype)
    e, h, i, k = args.experts, args.hidden, args.intermediate, args.top_k
    gen = torch.Generator(device="cuda").manual_seed(0)
    w_gate_up = (torch.randn(e, h, 2 * i, device="cuda", generator=gen) / h ** 0.5).to(dtype)
    w_down = (torch.randn(e, i, h, device="cuda", generator=gen) / i ** 0.5).to(dtype)

    def measure(m: int, config: dict) -> float | None:
        x = torch.randn(m, h, device="cuda", generator=gen).to(dtype)
        probs = torch.softmax(torch.randn(m, e, device="cuda", generator=gen), dim=-1)
        weights, ids = torch.topk(probs, k, dim=-1)
        weights = weights.to(dtype)
        try:
            fused_moe(x, w_gate_up, w_down, weights, ids, config)  # compile and warm up
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 -- a config that does not compile or fit (shared memory) is skipped
            return None
        times = []
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fused_moe(x, w_gate_up, w_down, weights, ids, config)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    return measure


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = {m: len(search_space(m, args.quick)) for m in args.tokens}
    print(f"E={args.experts} H={args.hidden} I={args.intermediate} top-k={args.top_k} {args.dtype}: "
          f"{sum(plan.values())} runs over M in {list(plan)}")
    if args.dry_run:
        return 0
    import torch
    import triton

    if not torch.cuda.is_available():
        print("tune_moe needs a CUDA GPU (timings under the interpreter mean nothing); "
              "use --dry-run to check the plan", file=sys.stderr)
        return 2
    device = moe_config.device_name("cuda")
    started = time.strftime("%Y-%m-%d")
    best = tune(args, gpu_measure(args))
    path = args.out / moe_config.config_file_name(args.experts, args.intermediate, device, triton.__version__)
    moe_config.write_config_file(
        path, best, e=args.experts, n=args.intermediate, device=device, triton_version=triton.__version__,
        dtype=args.dtype, source=f"qwen3vl.kernels.tune_moe {started}, H={args.hidden}, top-k={args.top_k}, "
                                 f"torch {torch.__version__}, {'quick' if args.quick else 'full'} space")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
