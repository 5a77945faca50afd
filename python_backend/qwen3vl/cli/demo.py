"""`make demo`: a random checkpoint, a real tritonserver, one image, a streamed answer.

The checkpoint's weights are random, so its words are nonsense; everything else (processor,
vision tower, deepstack, MoE decoder, streaming through the ensemble over gRPC) is real.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from .client import ask
from .launch import Server
from .make_checkpoint import make_checkpoint


def demo_image() -> bytes:
    """A 320x240 drawing: a sun, a house, grass."""
    im = Image.new("RGB", (320, 240), (135, 206, 235))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 180, 320, 240], fill=(34, 139, 34))
    d.ellipse([240, 20, 300, 80], fill=(255, 215, 0))
    d.rectangle([90, 110, 190, 180], fill=(178, 34, 34))
    d.polygon([(80, 110), (140, 60), (200, 110)], fill=(120, 60, 20))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qwen3vl-demo")
    p.add_argument("--checkpoint", default=".work/checkpoints/small")
    p.add_argument("--preset", default="small")
    p.add_argument("--prompt", default="Describe this picture.")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)
    checkpoint = make_checkpoint(args.checkpoint, preset=args.preset)
    print(f"checkpoint: {checkpoint} (random weights: the words will be nonsense)", flush=True)
    log = Path(".work/logs/demo-server.log")
    print(f"starting tritonserver (log: {log}) ...", flush=True)
    with Server(checkpoint, log) as server:
        print(f"server ready: gRPC {server.grpc_url}, HTTP {server.http_url}", flush=True)
        print(f"\nuser: [image] {args.prompt}\nassistant: ", end="", flush=True)
        answer = ask(server.grpc_url, "grpc", stream=True, prompt=args.prompt, images=[demo_image()],
                     max_tokens=args.max_tokens, temperature=0.0,
                     on_text=lambda s: print(s, end="", flush=True))
        n = len(answer.token_ids)
        rate = (n - 1) / (answer.total_s - answer.ttft_s) if n > 1 and answer.total_s > answer.ttft_s else 0.0
        print(f"\n\n[{answer.chunks} streamed responses, {n} tokens, finish_reason={answer.finish_reason}, "
              f"TTFT {answer.ttft_s * 1000:.0f} ms, {rate:.1f} tokens/s after the first]")
        if not answer.token_ids or not answer.finish_reason:
            print("demo: no answer came back", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
