"""`qwen3vl-soak`: many mixed requests at a concurrency above the server's batch limit, checking
that nothing is lost, doubled or corrupted and that the model processes give memory back.

    qwen3vl-soak [--preset small] [--requests 600] [--concurrency 12] [--max-num-seqs 4]

It starts its own server (`--max-num-seqs` below the concurrency, so requests queue), sends a
warm-up, measures the Python backend stubs' resident memory, sends the mix, measures again, and
prints a JSON report. The mix: text-only, one image and two images; streamed, whole, and streams
the client cancels after a chunk or two; greedy and seeded sampling. Every request that is not
cancelled is sent twice, once streamed and once whole, and the two must give the same ids and
text. `make test` runs a short version of the same function (tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..client import ServerError, infer, stream_grpc
from ..launch.server import PROGRESS_S, Server
from ..paths import REPO_ROOT


def noise_png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SoakReport:
    requests: int = 0
    cancelled: int = 0
    errors: list[str] = field(default_factory=list)      # unexpected errors, each a message
    mismatches: list[str] = field(default_factory=list)  # streamed != whole
    seconds: float = 0.0
    rss_mib_before: float | None = None
    rss_mib_after: float | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and not self.mismatches


def plan(n: int, seed: int, images: list[bytes]) -> list[dict]:
    """`n` requests: pairs (streamed, whole) of the same request, and cancelled streams, shuffled."""
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        k = rng.choice((0, 0, 1, 2))
        picked = rng.sample(images, k)
        prompt = f"Request {len(out)}: " + ("compare <image> and <image>." if k == 2 else "describe it.")
        params = dict(prompt=prompt, images=picked, max_tokens=rng.randint(4, 24))
        if rng.random() < 0.3:
            params.update(temperature=0.8, top_p=0.9, seed=rng.randrange(2**32))
        else:
            params.update(temperature=0.0)
        if rng.random() < 0.15:
            out.append({"mode": "cancel", "after": rng.randint(1, 2), "request": {**params, "max_tokens": 400}})
        else:
            pair = len(out)
            out.append({"mode": "stream", "pair": pair, "request": params})
            out.append({"mode": "whole", "pair": pair, "request": params})
    rng.shuffle(out)
    return out[:n]


def run_one(url: str, item: dict, timeout_s: float) -> tuple[list[int], str] | None:
    """(ids, text), or None for a cancelled stream."""
    if item["mode"] == "whole":
        chunk = infer(url, "grpc", timeout_s=timeout_s, **item["request"])
        return chunk.token_ids, chunk.text
    ids, text = [], ""
    for i, chunk in enumerate(stream_grpc(url, timeout_s=timeout_s, **item["request"]), 1):
        ids += chunk.token_ids
        text += chunk.text
        if item["mode"] == "cancel" and i >= item["after"]:
            return None  # leaving the generator cancels the request
    return ids, text


def soak(url: str, requests: int, concurrency: int, images: list[bytes], seed: int = 0,
         timeout_s: float = 300, progress: Callable[[str], None] | None = None) -> SoakReport:
    """Send the mix at `concurrency`; the report lists every unexpected error and mismatch.
    `progress` is told how far it is every PROGRESS_S."""
    items = plan(requests, seed, images)
    report = SoakReport(requests=len(items))
    results: dict[int, dict[str, tuple]] = {}

    def one(item):
        try:
            out = run_one(url, item, timeout_s)
        except (ServerError, TimeoutError, ConnectionError) as e:
            report.errors.append(f"{item['mode']} {item['request']['prompt']!r}: {e}")
            return
        if out is None:
            report.cancelled += 1
        else:
            results.setdefault(item["pair"], {})[item["mode"]] = out

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        pending = [pool.submit(one, item) for item in items]
        while wait(pending, timeout=PROGRESS_S if progress else None).not_done:
            progress(f"{sum(f.done() for f in pending)} of {len(items)} requests done, {len(report.errors)} errors, "
                     f"{time.perf_counter() - start:.0f} s")
        for f in pending:
            f.result()
    report.seconds = time.perf_counter() - start
    for pair, got in results.items():
        if len(got) == 2 and got["stream"] != got["whole"]:
            report.mismatches.append(f"request {pair}: streamed {got['stream']} != whole {got['whole']}")
    return report


def stub_rss_mib(server: Server) -> float:
    """Resident memory (MiB) of the server's Python backend stubs, from /proc."""
    total_kib = 0
    for process in server.model_processes():
        try:
            status = (Path("/proc") / str(process.pid) / "status").read_text()
        except OSError:
            continue
        total_kib += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total_kib / 1024


def main(argv=None) -> int:
    from .make_checkpoint import make_checkpoint

    p = argparse.ArgumentParser(prog="qwen3vl-soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small",
                   help="the random checkpoint's size (qwen3vl-make-checkpoint's presets) (default: small)")
    p.add_argument("--requests", type=int, default=600, help="requests in the mix (default: 600)")
    p.add_argument("--concurrency", type=int, default=12, help="requests in flight at once (default: 12)")
    p.add_argument("--max-num-seqs", type=int, default=4,
                   help="the server's running batch, below the concurrency so that requests queue (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="the mix's seed (default: 0)")
    args = p.parse_args(argv)
    def say(line: str) -> None:  # stderr: stdout is the JSON report
        print(f"qwen3vl-soak: {line}", file=sys.stderr, flush=True)

    ckpt = REPO_ROOT / ".work" / "checkpoints" / args.preset
    say(f"the {args.preset} preset's random checkpoint at {ckpt} (made if missing)")
    ckpt = make_checkpoint(ckpt, args.preset)
    images = [noise_png(w, h, i) for i, (w, h) in enumerate([(96, 96), (200, 130), (64, 300), (320, 240)])]
    log = REPO_ROOT / ".work" / "logs" / "soak.log"
    say(f"starting a server with --max-num-seqs {args.max_num_seqs} (log: {log})")
    with Server(ckpt, log, extra=["--device", "cpu", "--max-num-seqs", str(args.max_num_seqs)], progress=say) as server:
        say(f"server ready; warming up: {2 * args.concurrency} requests")
        warm = soak(server.grpc_url, 2 * args.concurrency, args.concurrency, images, seed=args.seed + 1)
        before = stub_rss_mib(server)
        say(f"the model processes hold {before:.0f} MiB; sending {args.requests} mixed requests "
            f"at concurrency {args.concurrency}")
        report = soak(server.grpc_url, args.requests, args.concurrency, images, seed=args.seed, progress=say)
        report.rss_mib_before, report.rss_mib_after = before, stub_rss_mib(server)
        say(f"done in {report.seconds:.0f} s; the model processes hold {report.rss_mib_after:.0f} MiB; "
            "stopping the server")
    out = {**report.__dict__, "warm_up_errors": warm.errors, "requests_per_s": report.requests / report.seconds,
           "ok": report.ok and not warm.errors}
    print(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
