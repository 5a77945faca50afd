"""`qwen3vl-client`: ask a served model a question, over gRPC (streaming) or HTTP.

    qwen3vl-client --url localhost:8001 --image cat.png --prompt "What is this?" --stream
    qwen3vl-client --video clip.mp4 --fps 1 --prompt "What happens?"
    qwen3vl-client --prompt "Who?" --structured-outputs '{"json": {"type": "object", ...}}'

The calls themselves are the client library's (qwen3vl.client); this is its command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..client import ServerError, ask


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="qwen3vl-client", description="Ask a Qwen3-VL-MoE Triton server a question.")
    p.add_argument("--url", default="localhost:8001", help="HOST:PORT (gRPC port for grpc, HTTP port for http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                   help="gRPC streaming, or Triton's HTTP generate endpoint (one response) (default: grpc)")
    p.add_argument("--model", default="ensemble", help="the Triton model to ask (default: ensemble)")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several, in prompt order")
    p.add_argument("--video", action="append", default=[], help="video file (MP4, WebM, MKV, AVI); repeat for "
                   "several, in prompt order (after the images unless the prompt has <image>/<video> markers)")
    p.add_argument("--fps", type=float, help="video frames sampled per second (default: the server's)")
    p.add_argument("--prompt", required=True, help="the question; or a JSON list of chat messages")
    p.add_argument("--max-tokens", type=int, help="tokens to generate at most (default: the checkpoint's)")
    p.add_argument("--temperature", type=float, help="0: greedy (default: the checkpoint's generation config)")
    p.add_argument("--top-p", type=float, help="nucleus sampling's probability mass (default: the checkpoint's)")
    p.add_argument("--top-k", type=int, help="sample among this many likeliest tokens; 0: all (default: the "
                                               "checkpoint's)")
    p.add_argument("--seed", type=int, help="the sampling's seed: the same seed, the same text")
    p.add_argument("--structured-outputs", metavar="JSON",
                   help="constrain the answer: vLLM's structured_outputs object, one of {\"json\": SCHEMA}, "
                        "{\"json_object\": true}, {\"regex\": RE}, {\"choice\": [...]}, {\"grammar\": EBNF}")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (gRPC)")
    p.add_argument("--json", action="store_true", help="print ids, text, finish reason and timings as JSON")
    p.add_argument("--timeout", type=float, default=600, metavar="S",
                   help="give up after this many seconds without a response (default: 600)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stream and args.protocol == "http":
        sys.exit("qwen3vl-client: --stream needs --protocol grpc")
    images, videos = [], []
    for kind, paths, out in (("image", args.image, images), ("video", args.video, videos)):
        for path in paths:
            try:
                out.append(Path(path).read_bytes())
            except OSError as e:
                sys.exit(f"qwen3vl-client: cannot read {kind} {path}: {e}")
    request = dict(prompt=args.prompt, images=images, videos=videos, video_fps=args.fps,
                   max_tokens=args.max_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, model=args.model, timeout_s=args.timeout,
                   structured_outputs=args.structured_outputs)
    printer = None if args.json else (lambda s: print(s, end="", flush=True))
    try:
        answer = ask(args.url, args.protocol, args.stream, on_text=printer, **request)
    except (ServerError, TimeoutError, ConnectionError) as e:
        print(f"qwen3vl-client: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # tritonclient raises its own types for unreachable servers
        print(f"qwen3vl-client: request to {args.url} failed: {e}", file=sys.stderr)
        return 1
    n = len(answer.token_ids)
    # Streamed: time to first token, then the decode rate after it. Not streamed, the answer
    # comes whole: no TTFT, and the rate is over the whole request (prefill included).
    ttft = answer.ttft_s if args.stream else None
    span = (answer.total_s - answer.ttft_s, n - 1) if args.stream else (answer.total_s, n)
    rate = span[1] / span[0] if span[1] > 0 and span[0] > 0 else None
    if args.json:
        print(json.dumps({"text": answer.text, "output_ids": answer.token_ids, "finish_reason": answer.finish_reason,
                          "num_input_tokens": answer.num_input_tokens,
                          "ttft_s": None if ttft is None else round(ttft, 4), "total_s": round(answer.total_s, 4),
                          "tokens": n, "tokens_per_s": None if rate is None else round(rate, 2)}))
    else:
        first = f"TTFT {ttft * 1000:.0f} ms; " if ttft is not None else ""
        print(f"\n[{answer.finish_reason}; {n} tokens; {first}{answer.total_s:.2f} s total]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
