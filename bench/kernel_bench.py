"""The kernels against their torch paths, side by side (qwen3vl.kernels).

    python bench/kernel_bench.py --out FILE          # a CUDA GPU, Qwen3-VL-30B-A3B dims, bf16
    python bench/kernel_bench.py --tiny --out FILE   # the same code on the CPU under Triton's
                                                     # interpreter, tiny dims, fp32, in seconds

Each row is one op at one token count: the torch path and the Triton path run in interleaved
rounds (the order alternating each round), and the row reports each path's median time and the
median over rounds of the per-round ratio torch / triton (> 1: Triton is faster), and how far
the Triton output is from the torch one (max |difference| / max |torch|; exit status 1 when
any op is past the dtype's tolerance). Under the
interpreter the Triton times are numpy's, not a GPU's: --tiny checks the code paths, it measures
nothing. Prints one table and writes a JSON file.

Ops (T = tokens): fused MoE [T, H] top-k; attention decode (T sequences, one query each, a long
context) and prefill (one sequence of T new tokens); store_kv; rms_norm; fused_add_rms_norm;
silu_mul over the MoE's [T*K, 2I]; qk_norm_rope; and block FP8 (W8A8): the fused MoE on FP8
experts and one FP8 Linear (q_proj's dims), each against its torch emulation
(kernels/fp8_reference.py: its time is an emulation's, not a fast path's; compare the Triton
time with the bf16 fused MoE row's). Under the interpreter the FP8 rows quantize activations
with torch (the interpreter's fp32 -> fp8 cast misses some carries).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_backend"))

# Qwen3-VL-30B-A3B's text dims; tiny ones for the interpreter.
REAL = dict(experts=128, hidden=2048, inter=768, top_k=8, q_heads=32, kv_heads=4, head_dim=128, block_size=16,
            context=2048, eps=1e-6)
TINY = dict(experts=8, hidden=64, inter=32, top_k=2, q_heads=4, kv_heads=2, head_dim=32, block_size=16,
            context=40, eps=1e-6)
REAL_TOKENS = (1, 8, 64, 1024)
TINY_TOKENS = (1, 4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny dims on the CPU under the interpreter (a smoke run)")
    p.add_argument("--tokens", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                   help=f"token counts (default {REAL_TOKENS}, --tiny {TINY_TOKENS})")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10, --tiny 2)")
    p.add_argument("--reps", type=int, default=None, help="calls per timing (default 20, --tiny 1)")
    p.add_argument("--out", type=Path, default=None, help="the JSON result file")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _paged_batch(dims: dict, q_lens: list[int], seq_lens: list[int], device: str, dtype, gen):
    """A KV pool holding every sequence's context in shuffled pages, and the step's metadata."""
    bs, hkv, d, hq = dims["block_size"], dims["kv_heads"], dims["head_dim"], dims["q_heads"]
    pages = [-(-s // bs) for s in seq_lens]
    order = torch.randperm(sum(pages), generator=gen, device=device).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=device)
    start = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[start:start + n]
        start += n
    slots = sum(pages) * bs
    k_cache = torch.randn(slots, hkv, d, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(slots, hkv, d, generator=gen, device=device).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=gen, device=device).to(dtype)
    meta = (cu.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device), table)
    return q, k_cache, v_cache, meta, max(q_lens)


def cases(dims: dict, t: int, device: str, dtype, gen):
    """(op, torch fn, triton fn) at t tokens; each fn takes no argument."""
    from qwen3vl.kernels import attention, block_fp8, fused_moe, fusions
    from qwen3vl.kernels import fp8_reference as f8
    from qwen3vl.kernels import reference as ref

    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen, device=device) * s).to(dtype)  # noqa: E731
    e, h, i, k, eps = dims["experts"], dims["hidden"], dims["inter"], dims["top_k"], dims["eps"]
    hq, hkv, d, bs = dims["q_heads"], dims["kv_heads"], dims["head_dim"], dims["block_size"]
    x, res = rand(t, h), rand(t, h)
    w_gu, w_dn = rand(e, h, 2 * i, s=h ** -0.5), rand(e, i, h, s=i ** -0.5)
    probs = torch.softmax(torch.randn(t, e, generator=gen, device=device), dim=-1)
    tw, ids = torch.topk(probs, k, dim=-1)
    tw = tw.to(dtype)
    moe_args = (x, w_gu, w_dn, tw, ids)
    out = [("fused_moe", lambda: ref.fused_moe_torch(*moe_args), lambda: fused_moe.fused_moe(*moe_args))]
    quant = f8.per_token_group_quant_fp8_torch if device == "cpu" else block_fp8.per_token_group_quant_fp8
    w13, w13_s = f8.quantize_block_fp8(w_gu.transpose(1, 2))        # the release's [E, 2I, H] per expert
    w2, w2_s = f8.quantize_block_fp8(w_dn.transpose(1, 2))
    fp8_args = (x, w13, w13_s, w2, w2_s, tw, ids)
    out.append(("fused_moe fp8", lambda: f8.fused_moe_fp8_torch(*fp8_args),
                lambda: fused_moe.fused_moe_fp8(*fp8_args, quantize=quant)))
    wq, wq_s = f8.quantize_block_fp8(rand(hq * d, h, s=h ** -0.5))
    out.append(("w8a8 linear", lambda: f8.w8a8_block_fp8_linear_torch(x, wq, wq_s),
                lambda: block_fp8.w8a8_block_fp8_linear(x, wq, wq_s, quantize=quant)))

    scale = d ** -0.5
    for op, q_lens, seq_lens in (("attention decode", [1] * t, [dims["context"]] * t), ("attention prefill", [t], [t])):
        q, kc, vc, (cu, sl, bt), max_q = _paged_batch(dims, q_lens, seq_lens, device, dtype, gen)
        args = (q, kc, vc, cu, sl, bt, bs, scale)
        out.append((op, lambda a=args, m=max_q: ref.paged_attention_torch(*a, max_query_len=m),
                    lambda a=args, m=max_q: attention.unified_attention(*a, max_query_len=m)))
    kn, vn = rand(t, hkv, d), rand(t, hkv, d)
    kc, vc = torch.zeros(2 * t, hkv, d, device=device, dtype=dtype), torch.zeros(2 * t, hkv, d, device=device, dtype=dtype)
    slots = torch.randperm(2 * t, generator=gen, device=device)[:t]
    out.append(("store_kv", lambda: ref.store_kv_torch(kn, vn, kc, vc, slots), lambda: attention.store_kv(kn, vn, kc, vc, slots)))
    w = rand(h, s=0.1) + 1
    out.append(("rms_norm", lambda: ref.rms_norm_torch(x, w, eps), lambda: fusions.rms_norm(x, w, eps)))
    out.append(("fused_add_rms_norm", lambda: ref.fused_add_rms_norm_torch(x, res, w, eps),
                lambda: fusions.fused_add_rms_norm(x, res, w, eps)))
    gu = rand(t * k, 2 * i)
    out.append(("silu_mul", lambda: ref.silu_mul_torch(gu), lambda: fusions.silu_mul(gu)))
    q, kk = rand(t, hq, d), rand(t, hkv, d)
    qw, kw = rand(d, s=0.1) + 1, rand(d, s=0.1) + 1
    angles = torch.rand(t, d // 2, generator=gen, device=device) * 100
    cos, sin = (torch.cat((f(angles),) * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    out.append(("qk_norm_rope", lambda: ref.qk_norm_rope_torch(q, kk, qw, kw, cos, sin, eps),
                lambda: fusions.qk_norm_rope(q, kk, qw, kw, cos, sin, eps)))
    return out


def _time(fn, reps: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def rel_err(a, b) -> float | None:
    """max |a - b| / max |b| over the outputs (a tuple: the worst of its parts); None for ops
    that return nothing (store_kv writes in place)."""
    if a is None or b is None:
        return None
    if isinstance(a, tuple):
        return max(rel_err(x, y) for x, y in zip(a, b))
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure(torch_fn, triton_fn, rounds: int, reps: int, device: str) -> dict:
    err = rel_err(triton_fn(), torch_fn())  # compiles and warms up, and the two must agree
    times = {"torch": [], "triton": []}
    for r in range(rounds):
        for name in (("torch", "triton") if r % 2 == 0 else ("triton", "torch")):
            times[name].append(_time(torch_fn if name == "torch" else triton_fn, reps, device))
    ratios = [a / b for a, b in zip(times["torch"], times["triton"])]
    return {"torch_ms": statistics.median(times["torch"]) * 1e3, "triton_ms": statistics.median(times["triton"]) * 1e3,
            "torch_over_triton": statistics.median(ratios), "rel_err": err}


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda:
        if not args.tiny:
            print("kernel_bench: no CUDA GPU here; --tiny runs the same code under Triton's interpreter", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules import triton
    import triton

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    dims = REAL if cuda else TINY
    tokens = args.tokens or (REAL_TOKENS if cuda else TINY_TOKENS)
    rounds = args.rounds or (10 if cuda else 2)
    reps = args.reps or (20 if cuda else 1)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    with torch.inference_mode():
        for t in tokens:
            for op, torch_fn, triton_fn in cases(dims, t, device, dtype, gen):
                rows.append({"op": op, "tokens": t, **measure(torch_fn, triton_fn, rounds, reps, device)})
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter: the Triton times mean nothing)"
    print(f"kernel_bench on {name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
          f"triton {triton.__version__}; {rounds} rounds x {reps} calls; dims {dims}")
    # bf16 rounds the output (and, in fused MoE, the intermediate) at 2^-8 relative: a few ulps
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    print(f"{'op':<20} {'tokens':>6} {'torch ms':>10} {'triton ms':>10} {'torch/triton':>12} {'rel err':>9}")
    for row in rows:
        err = row["rel_err"]
        row["agrees"] = err is None or err <= tolerance
        print(f"{row['op']:<20} {row['tokens']:>6} {row['torch_ms']:>10.3f} {row['triton_ms']:>10.3f} "
              f"{row['torch_over_triton']:>12.2f} {'-' if err is None else f'{err:.1e}':>9}"
              f"{'' if row['agrees'] else f'  DIFFERS (> {tolerance:g})'}")
    result = {"device": name, "dtype": str(dtype), "torch": torch.__version__, "triton": triton.__version__,
              "interpreter": not cuda, "rounds": rounds, "reps": reps, "dims": dims, "tolerance": tolerance,
              "rows": rows}
    out = args.out or Path(__file__).resolve().parent / "results" / f"kernel_bench-{'gpu' if cuda else 'tiny-cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(row["agrees"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
