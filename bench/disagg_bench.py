"""Disaggregated vs aggregated on one host, measured side by side in one run.

    python bench/disagg_bench.py [--preset small] [--rounds 7] [--image-size 448] [--out bench/results]

Starts three real servers on loopback (aggregated; encoder; language pointed at the encoder),
then interleaves in each round: a fresh image through the aggregated server, a fresh image
through the disaggregated one, and that same image again (the encoder's cache). Reports the
median of per-round ratios, and the gRPC transfer throughput of the E->L tensors. Prints one
table and writes a JSON file.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_backend"))

from qwen3vl.client import ask, encode  # noqa: E402
from qwen3vl.launch import Server  # noqa: E402
from qwen3vl.make_checkpoint import make_checkpoint  # noqa: E402


def photo(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def ttft(server: Server, image: bytes) -> float:
    return ask(server.grpc_url, "grpc", True, prompt="Describe the picture.", images=[image], max_tokens=1,
               temperature=0.0).ttft_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    ckpt = make_checkpoint(Path(".work/checkpoints") / args.preset, args.preset)
    logs = Path(".work/logs")
    cpu = ["--device", "cpu"]
    with Server(ckpt, logs / "bench-aggregated.log", extra=cpu) as agg, \
            Server(ckpt, logs / "bench-encoder.log", role="encoder", models=("qwen3_encoder",), extra=cpu) as enc, \
            Server(ckpt, logs / "bench-language.log", role="language",
                   extra=cpu + ["--encoder-url", enc.grpc_url, "--chunk-tokens", str(args.chunk_tokens)]) as lang:
        ttft(agg, photo(args.image_size, 10_000))  # warm-up both paths
        ttft(lang, photo(args.image_size, 10_001))
        rows = []
        for r in range(args.rounds):
            a_img, d_img = photo(args.image_size, 2 * r), photo(args.image_size, 2 * r + 1)
            agg_s = ttft(agg, a_img)
            dis_s = ttft(lang, d_img)
            cached_s = ttft(lang, d_img)
            start = time.perf_counter()
            tensors = encode(lang.grpc_url, [d_img])  # cached on the encoder: pure transfer
            transfer_s = time.perf_counter() - start
            nbytes = sum(t.nbytes for t in tensors.values())
            rows.append(dict(aggregated_ttft_s=agg_s, disaggregated_ttft_s=dis_s, cached_ttft_s=cached_s,
                             transfer_s=transfer_s, transfer_bytes=nbytes))
    med = lambda f: statistics.median(f(r) for r in rows)  # noqa: E731
    result = {
        "preset": args.preset, "image": f"{args.image_size}x{args.image_size}", "rounds": args.rounds,
        "visual_tokens": int(tensors["visual_embeds"].shape[0]), "device": "cpu",
        "disaggregated_over_aggregated_ttft": med(lambda r: r["disaggregated_ttft_s"] / r["aggregated_ttft_s"]),
        "cached_over_uncached_ttft": med(lambda r: r["cached_ttft_s"] / r["disaggregated_ttft_s"]),
        "grpc_transfer_mib_per_s": med(lambda r: r["transfer_bytes"] / r["transfer_s"] / 2**20),
        "per_round": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"disagg_bench-{args.preset}-cpu.json").write_text(json.dumps(result, indent=1))
    print(f"\n## Disaggregated vs aggregated, one host, CPU ({args.preset} preset, {result['image']} image, "
          f"{result['visual_tokens']} visual tokens, {args.rounds} rounds, median of per-round ratios)\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| disaggregated / aggregated TTFT | {result['disaggregated_over_aggregated_ttft']:.3f} | <= 1.2 |")
    print(f"| cached / uncached TTFT (repeated image) | {result['cached_over_uncached_ttft']:.3f} | <= 0.3 |")
    print(f"| E->L transfer over gRPC, {rows[-1]['transfer_bytes'] / 2**20:.2f} MiB (MiB/s) | "
          f"{result['grpc_transfer_mib_per_s']:.1f} | |")
    print("| shared memory / gRPC transfer, 16 MiB | not implemented | >= 5 |")


if __name__ == "__main__":
    main()
