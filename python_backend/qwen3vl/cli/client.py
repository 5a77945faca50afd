"""`qwen3vl-client`: ask a served model a question, over gRPC (streaming) or HTTP.

    qwen3vl-client --url localhost:8001 --image cat.png --prompt "What is this?" --stream
    qwen3vl-client --video clip.mp4 --fps 1 --prompt "What happens?"
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tritonclient.utils import np_to_triton_dtype

from .. import contract, errors
from ..grpc_stream import StreamError, stream_infer


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str
    num_input_tokens: int = 0  # the prompt's tokens (visual tokens included)


@dataclass
class Answer:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    ttft_s: float = 0.0
    total_s: float = 0.0
    chunks: int = 0
    num_input_tokens: int = 0


class ServerError(RuntimeError):
    """The server answered the request with an error; `code` is the Triton status code where
    the server marked it (INVALID_ARG, NOT_FOUND, UNAVAILABLE, ...), else None."""

    def __init__(self, message: str, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        self.code, self.http_status = code, http_status


def infer_input(module, name: str, array: np.ndarray):
    """A tritonclient InferInput holding `array` (object arrays travel as BYTES); `module` is
    tritonclient.grpc or .http."""
    t = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


def build_inputs(module, prompt: str, images: list[bytes] = (), max_tokens=None, temperature=None,
                 top_p=None, top_k=None, seed=None, stream=False, ignore_eos=None, videos: list[bytes] = (),
                 video_fps=None) -> list:
    """tritonclient InferInput list for the contract; `module` is tritonclient.grpc or .http."""
    def tensor(name, array):
        return infer_input(module, name, array)

    inputs = [tensor(contract.TEXT_INPUT, np.array([prompt.encode("utf-8")], dtype=object))]
    if images:
        inputs.append(tensor(contract.IMAGES, np.array(list(images), dtype=object)))
    if videos:
        inputs.append(tensor(contract.VIDEOS, np.array(list(videos), dtype=object)))
    optional = [(contract.VIDEO_FPS, video_fps, np.float32),
                (contract.MAX_TOKENS, max_tokens, np.int32), (contract.TEMPERATURE, temperature, np.float32),
                (contract.TOP_P, top_p, np.float32), (contract.TOP_K, top_k, np.int32), (contract.SEED, seed, np.uint64),
                (contract.IGNORE_EOS, ignore_eos, np.bool_)]
    for name, value, np_type in optional:
        if value is not None:
            inputs.append(tensor(name, np.array([value], dtype=np_type)))
    inputs.append(tensor(contract.STREAM, np.array([bool(stream)])))
    return inputs


def _chunk(result) -> Chunk:
    text = result.as_numpy(contract.TEXT_OUTPUT)
    ids = result.as_numpy(contract.OUTPUT_IDS)
    reason = result.as_numpy(contract.FINISH_REASON)
    prompt = result.as_numpy(contract.NUM_INPUT_TOKENS)
    return Chunk(text.reshape(-1)[0].decode("utf-8") if text is not None else "",
                 ids.reshape(-1).tolist() if ids is not None else [],
                 reason.reshape(-1)[0].decode() if reason is not None else "",
                 int(prompt.reshape(-1)[0]) if prompt is not None else 0)


def stream_results(url: str, model: str, inputs_for, timeout_s: float = 600, cancellable: bool = False) -> Iterator:
    """Results of one request over gRPC's bidirectional stream (what decoupled models need),
    until the response flagged final. `inputs_for(tritonclient.grpc)` builds the inputs.
    `cancellable` (a generation request): the request carries a secret cancel token, and when it
    is left unfinished (the caller stops reading, an error, a timeout) the generation is
    cancelled by that token too, since Triton does not pass a stream's cancellation on to a
    running step of an ensemble (README, Cancelling).
    Raises ServerError with the server's message (its `code` from the project's marker)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    token = uuid.uuid4().hex if cancellable else None
    try:
        yield from stream_infer(client, model, inputs_for(grpcclient), timeout_s,
                                on_unfinished=(lambda: cancel_generation(url, token)) if token else None,
                                parameters={contract.CANCEL_TOKEN: token} if token else None)
    except StreamError as e:
        raise ServerError(str(e.error), errors.code_of(e.error)) from None
    finally:
        client.close()


def stream_grpc(url: str, model: str = "ensemble", timeout_s: float = 600, stream: bool = True,
                **request) -> Iterator[Chunk]:
    """Chunks of one generation request: one per new piece of text with `stream`, else a
    single one; the last has a finish reason."""
    inputs_for = lambda module: build_inputs(module, stream=stream, **request)  # noqa: E731
    for result in stream_results(url, model, inputs_for, timeout_s, cancellable=True):
        yield _chunk(result)


def cancel_generation(url: str, token: str, model: str = "qwen3_language", timeout_s: float = 30) -> bool:
    """Cancel the generation that carries `token` (contract.CANCEL); False when none runs it
    (it finished already). Never raises: a server that is gone has cancelled it anyway."""
    def inputs_for(module):
        t = module.InferInput(contract.TEXT_INPUT, [1], "BYTES")
        t.set_data_from_numpy(np.array([b""], dtype=object))
        return [t]

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        list(stream_infer(client, model, inputs_for(grpcclient), timeout_s, parameters={contract.CANCEL: token}))
        return True
    except Exception:  # noqa: BLE001 - NOT_FOUND (finished), or the server is gone
        return False
    finally:
        client.close()


def encode(url: str, images: list[bytes], model: str = "qwen3_encoder", timeout_s: float = 600,
           videos: list[bytes] = (), video_fps: float | None = None) -> dict:
    """The encoder's E->L tensors for these images and videos: {name: numpy array}."""
    def inputs_for(module):  # an empty list too: a request that names no images is not an encode
        def tensor(name, array):
            return infer_input(module, name, array)

        inputs = [tensor(contract.IMAGES, np.array(list(images), dtype=object).reshape(len(images)))]
        if videos:
            inputs.append(tensor(contract.VIDEOS, np.array(list(videos), dtype=object).reshape(len(videos))))
        if video_fps is not None:
            inputs.append(tensor(contract.VIDEO_FPS, np.array([video_fps], dtype=np.float32)))
        return inputs

    names = (contract.VISUAL_EMBEDS, contract.DEEPSTACK_EMBEDS, contract.IMAGE_GRID_THW, contract.VIDEO_GRID_THW,
             contract.VIDEO_TIMESTAMPS)
    for result in stream_results(url, model, inputs_for, timeout_s):
        return {name: result.as_numpy(name) for name in names}
    raise ServerError(f"{model} sent no outputs")


def raw_results(url: str, model: str, tensors: dict[str, np.ndarray], timeout_s: float = 600) -> list:
    """All results of one gRPC streaming request made of exactly these input tensors (direct
    calls to a model of the ensemble, fault tests)."""
    inputs_for = lambda module: [infer_input(module, k, v) for k, v in tensors.items()]  # noqa: E731
    return list(stream_results(url, model, inputs_for, timeout_s))


def infer(url: str, protocol: str = "http", model: str = "ensemble", timeout_s: float = 600, **request) -> Chunk:
    """The whole answer in one response (stream off). Over HTTP this is Triton's generate
    endpoint (JSON; images travel as base64 data URLs): HTTP's /infer endpoint does not serve
    decoupled models."""
    if protocol == "grpc":
        chunks = list(stream_grpc(url, model, timeout_s, **{**request, "stream": False}))
        return Chunk("".join(c.text for c in chunks), [i for c in chunks for i in c.token_ids], chunks[-1].finish_reason,
                     chunks[-1].num_input_tokens)
    body = generate_body(**request)
    req = urllib.request.Request(f"http://{url}/v2/models/{model}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            out = json.loads(response.read())
    except urllib.error.HTTPError as e:
        message = json.loads(e.read() or b"{}").get("error", str(e))
        raise ServerError(message, errors.code_of(message), e.code) from None
    ids = out.get(contract.OUTPUT_IDS, [])
    return Chunk(out.get(contract.TEXT_OUTPUT, ""), [ids] if isinstance(ids, int) else list(ids),
                 out.get(contract.FINISH_REASON, ""), int(out.get(contract.NUM_INPUT_TOKENS, 0)))


def generate_body(prompt: str, images: list[bytes] = (), stream: bool = False, videos: list[bytes] = (),
                  **params) -> dict:
    """JSON body for Triton's generate endpoints."""
    body = {contract.TEXT_INPUT: prompt, contract.STREAM: stream}
    if images:
        body[contract.IMAGES] = ["data:image;base64," + base64.b64encode(b).decode() for b in images]
    if videos:
        body[contract.VIDEOS] = ["data:video;base64," + base64.b64encode(b).decode() for b in videos]
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def ask(url: str, protocol: str, stream: bool, on_text=None, **request) -> Answer:
    """Run one request, timing first text and the whole answer."""
    answer, start = Answer(), time.perf_counter()
    chunks = stream_grpc(url, **request) if stream else iter([infer(url, protocol, **request)])
    for chunk in chunks:
        if not answer.chunks:
            answer.ttft_s = time.perf_counter() - start
        answer.chunks += 1
        answer.text += chunk.text
        answer.token_ids += chunk.token_ids
        answer.finish_reason = chunk.finish_reason or answer.finish_reason
        answer.num_input_tokens = chunk.num_input_tokens or answer.num_input_tokens
        if on_text:
            on_text(chunk.text)
    answer.total_s = time.perf_counter() - start
    return answer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="qwen3vl-client", description="Ask a Qwen3-VL-MoE Triton server a question.")
    p.add_argument("--url", default="localhost:8001", help="HOST:PORT (gRPC port for grpc, HTTP port for http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model", default="ensemble")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several, in prompt order")
    p.add_argument("--video", action="append", default=[], help="video file (MP4, WebM, MKV, AVI); repeat for "
                   "several, in prompt order (after the images unless the prompt has <image>/<video> markers)")
    p.add_argument("--fps", type=float, help="video frames sampled per second (default: the server's)")
    p.add_argument("--prompt", required=True, help="the question; or a JSON list of chat messages")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print text as it is generated (gRPC)")
    p.add_argument("--json", action="store_true", help="print ids, text, finish reason and timings as JSON")
    p.add_argument("--timeout", type=float, default=600)
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
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, model=args.model, timeout_s=args.timeout)
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
