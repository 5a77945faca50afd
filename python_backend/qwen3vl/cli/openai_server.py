"""`qwen3vl-openai`: the OpenAI-compatible API (`/v1/chat/completions` with images and videos,
`/v1/completions`, `/v1/models`, `/health`, `/metrics`) in front of a Triton server's ensemble.

    qwen3vl-openai --triton-url localhost:8001 --port 9000
"""

from __future__ import annotations

import argparse
import sys

from ..openai import DEFAULT_MODEL_NAME


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qwen3vl-openai", description=__doc__.split("\n\n")[0])
    p.add_argument("--triton-url", required=True, metavar="HOST:GRPC_PORT", help="the Triton server's gRPC endpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="port to listen on (default: 9000)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                   help=f"the model name clients send and /v1/models lists, whatever the checkpoint "
                        f"(default: {DEFAULT_MODEL_NAME}, in every deployment)")
    p.add_argument("--triton-model", default="ensemble", help="the Triton model to call (default: ensemble)")
    p.add_argument("--triton-language-model", default="qwen3_language",
                   help="the language model the ensemble runs, where cancel requests go (default: qwen3_language)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="a request's time limit, first token to last; past it: 504 (default: 600)")
    p.add_argument("--default-max-tokens", type=int, default=None, metavar="N",
                   help="max_tokens when a request gives none (default: the model's, 128)")
    p.add_argument("--allow-image-url-domains", action="append", default=[], metavar="DOMAINS",
                   help="fetch http(s) image and video URLs of these hosts (comma separated, repeatable; "
                        "`*.example.com` for subdomains). Default: none, only data URLs")
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20, metavar="N",
                   help="largest image, data URL or fetched (default: 20 MiB)")
    p.add_argument("--image-fetch-timeout", type=float, default=10.0, metavar="S",
                   help="time limit to fetch one image or video URL (default: 10)")
    p.add_argument("--max-video-bytes", type=int, default=256 * 2**20, metavar="N",
                   help="largest video of a video_url part, data URL or fetched from the image URL hosts "
                        "(default: 256 MiB, the model's own max_video_bytes)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the service's and uvicorn's log level (default: info)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    from ..openai.app import ServiceConfig
    from ..openai.images import ImagePolicy

    domains = tuple(d.strip() for arg in args.allow_image_url_domains for d in arg.split(",") if d.strip())
    return ServiceConfig(triton_url=args.triton_url, model_name=args.model_name, triton_model=args.triton_model,
                         triton_language_model=args.triton_language_model,
                         request_timeout_s=args.request_timeout, default_max_tokens=args.default_max_tokens,
                         images=ImagePolicy(allowed_domains=domains, max_bytes=args.max_image_bytes,
                                            fetch_timeout_s=args.image_fetch_timeout,
                                            max_video_bytes=args.max_video_bytes))


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    import uvicorn

    from ..openai.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    print(f"qwen3vl-openai: http://{args.host}:{args.port}/v1 -> {config.triton_model} at {config.triton_url} "
          f"(model name {config.model_name!r}; image URLs from: {', '.join(config.images.allowed_domains) or 'none'})",
          flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
