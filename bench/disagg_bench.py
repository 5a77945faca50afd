"""Disaggregated vs aggregated on one host, measured side by side in one run.

    python bench/disagg_bench.py [--preset small] [--rounds 7] [--image-size 448] [--out bench/results]

Starts three real servers on loopback (aggregated; encoder; language pointed at the encoder),
then interleaves in each round: a fresh image through the aggregated server, a fresh image
through the disaggregated one, and that same image again with another question (the encoder's
feature cache and the language server's prefix cache; the question is prefilled). Reports the
median of per-round ratios, and the gRPC transfer throughput of the E->L tensors. Prints one
table and writes a JSON file.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_backend"))

from qwen3vl.client import ask, encode  # noqa: E402
from qwen3vl.launch.server import Server  # noqa: E402
from qwen3vl.tools.make_checkpoint import make_checkpoint  # noqa: E402


def photo(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


QUESTION = "Describe the picture."
FOLLOW_UP = "Which colour covers most of the picture?"  # the repeat asks something else


def ttft(server: Server, image: bytes, prompt: str = QUESTION) -> float:
    return ask(server.grpc_url, "grpc", True, prompt=prompt, images=[image], max_tokens=1, temperature=0.0).ttft_s


def shm_vs_grpc(ckpt, enc: Server, logs: Path, cpu: list[str], args) -> dict:
    """Transfer time of one cached image of about `--transfer-mib` MiB of E->L tensors, read
    from each language server's own metrics (qwen3vl_transfer_seconds_total: from the first
    request to the encoder to the assembled tensors; the bench client's own upload and copy
    back are not counted): a language server using system shared memory and one using gRPC,
    interleaved."""
    from qwen3vl.model.config import ModelConfig

    config = ModelConfig.load(ckpt, device="cpu")
    per_token = (1 + config.deepstack_layers) * config.visual_hidden_size * 4  # fp32 on CPU
    side = int(round((args.transfer_mib * 2**20 / per_token) ** 0.5)) * 32    # tokens = (side / 32)^2
    image = photo(side, 99)
    env = {"QWEN3VL_ENCODER_TIMEOUT_S": "900"}
    common = cpu + ["--encoder-url", enc.grpc_url, "--chunk-tokens", str(args.chunk_tokens)]
    with Server(ckpt, logs / "bench-language-shm.log", role="language", extra=common + ["--shared-memory"],
                env=env, models=("qwen3_encoder",)) as shm_lang, \
            Server(ckpt, logs / "bench-language-grpc.log", role="language", extra=common, env=env,
                   models=("qwen3_encoder",)) as grpc_lang:
        def fetch_s(server):
            before = metric(server, "qwen3vl_transfer_seconds_total")
            tensors = encode(server.grpc_url, [image], timeout_s=900)
            return metric(server, "qwen3vl_transfer_seconds_total") - before, tensors

        _, tensors = fetch_s(grpc_lang)  # encodes once; every fetch after this is a cache hit
        fetch_s(shm_lang)
        nbytes = tensors["visual_embeds"].nbytes + tensors["deepstack_embeds"].nbytes
        ratios, shm_times, grpc_times = [], [], []
        for _ in range(args.rounds):
            g, _ = fetch_s(grpc_lang)
            s, _ = fetch_s(shm_lang)
            grpc_times.append(g)
            shm_times.append(s)
            ratios.append(g / s)
    return {"mib": nbytes / 2**20, "visual_tokens": int(tensors["visual_embeds"].shape[0]),
            "shm_over_grpc_throughput": statistics.median(ratios),
            "shm_mib_per_s": nbytes / 2**20 / statistics.median(shm_times),
            "grpc_mib_per_s": nbytes / 2**20 / statistics.median(grpc_times)}


def metric(server: Server, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--transfer-mib", type=float, default=16, help="E->L payload for the shm/gRPC comparison")
    args = ap.parse_args()
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
            # Alternate which deployment goes first: whatever the one before leaves running
            # (a stub's garbage collection, a server's last writes) lands on both sides alike.
            if r % 2 == 0:
                agg_s = ttft(agg, a_img)
            dis_s = ttft(lang, d_img)
            cached_s = ttft(lang, d_img, FOLLOW_UP)
            if r % 2 == 1:
                agg_s = ttft(agg, a_img)
            start = time.perf_counter()
            tensors = encode(lang.grpc_url, [d_img])  # cached on the encoder: pure transfer
            transfer_s = time.perf_counter() - start
            nbytes = sum(t.nbytes for t in tensors.values())
            rows.append(dict(aggregated_ttft_s=agg_s, disaggregated_ttft_s=dis_s, cached_ttft_s=cached_s,
                             transfer_s=transfer_s, transfer_bytes=nbytes))
        transfer = shm_vs_grpc(ckpt, enc, logs, cpu, args)
    med = lambda f: statistics.median(f(r) for r in rows)  # noqa: E731
    result = {
        "preset": args.preset, "image": f"{args.image_size}x{args.image_size}", "rounds": args.rounds,
        "visual_tokens": int(tensors["visual_embeds"].shape[0]), "device": "cpu",
        "disaggregated_over_aggregated_ttft": med(lambda r: r["disaggregated_ttft_s"] / r["aggregated_ttft_s"]),
        "cached_over_uncached_ttft": med(lambda r: r["cached_ttft_s"] / r["disaggregated_ttft_s"]),
        "grpc_transfer_mib_per_s": med(lambda r: r["transfer_bytes"] / r["transfer_s"] / 2**20),
        "transfer": transfer,
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
    print(f"| cached / uncached TTFT (repeated image, another question) | {result['cached_over_uncached_ttft']:.3f} "
          f"| <= 0.3 |")
    print(f"| shared memory / gRPC transfer throughput, {transfer['mib']:.1f} MiB "
          f"({transfer['shm_mib_per_s']:.0f} vs {transfer['grpc_mib_per_s']:.0f} MiB/s) | "
          f"{transfer['shm_over_grpc_throughput']:.2f} | >= 5 |")


if __name__ == "__main__":
    main()
