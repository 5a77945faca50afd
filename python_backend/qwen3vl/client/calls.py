"""Blocking calls to a served model, one request each: generations over gRPC's bidirectional
stream (what decoupled models need) or Triton's HTTP generate endpoint, the encoder's E->L
tensors, and raw requests to one model of the ensemble (tests, benchmarks, the demo)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .. import contract, errors
from ..grpc_stream import StreamError, stream_infer
from .cancel import cancel_generation, new_token, token_parameters
from .inputs import build_inputs, encode_inputs, generate_body, infer_input
from .responses import Chunk, NoServer, ServerError, chunk_of, chunk_of_json, no_server


@dataclass
class Answer:
    """One whole answer and its timing (`ask`)."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    ttft_s: float = 0.0
    total_s: float = 0.0
    chunks: int = 0
    num_input_tokens: int = 0


def stream_results(url: str, model: str, inputs_for, timeout_s: float = 600, cancellable: bool = False) -> Iterator:
    """Results of one request over gRPC's bidirectional stream, until the response flagged
    final. `inputs_for(tritonclient.grpc)` builds the inputs.
    `cancellable` (a generation request): the request carries a secret cancel token, and when it
    is left unfinished (the caller stops reading, an error, a timeout) the generation is
    cancelled by that token too (cancel.py says why).
    Raises ServerError with the server's message (its `code` from the project's marker)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    token = new_token() if cancellable else None
    try:
        yield from stream_infer(client, model, inputs_for(grpcclient), timeout_s,
                                on_unfinished=(lambda: cancel_generation(url, token)) if token else None,
                                parameters=token_parameters(token) if token else None)
    except StreamError as e:
        if (detail := no_server(e.error)) is not None:
            raise NoServer(url, "gRPC", detail) from None
        raise ServerError(str(e.error), errors.code_of(e.error)) from None
    finally:
        client.close()


def stream_grpc(url: str, model: str = "ensemble", timeout_s: float = 600, stream: bool = True,
                **request) -> Iterator[Chunk]:
    """Chunks of one generation request (`request`: build_inputs' parameters): one per new piece
    of text with `stream`, else a single one; the last has a finish reason."""
    inputs_for = lambda module: build_inputs(module, stream=stream, **request)  # noqa: E731
    for result in stream_results(url, model, inputs_for, timeout_s, cancellable=True):
        yield chunk_of(result)


def encode(url: str, images: list[bytes], model: str = "qwen3_encoder", timeout_s: float = 600,
           videos: list[bytes] = (), video_fps: float | None = None) -> dict:
    """The encoder's E->L tensors for these images and videos: {name: numpy array}."""
    inputs_for = lambda module: encode_inputs(module, images, videos, video_fps)  # noqa: E731
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
    except urllib.error.URLError as e:
        if isinstance(e.reason, (ConnectionRefusedError, socket.gaierror)):
            raise NoServer(url, "HTTP", e.reason.strerror or str(e.reason)) from None
        raise
    return chunk_of_json(out)


def ask(url: str, protocol: str, stream: bool, on_text=None, **request) -> Answer:
    """Run one request, timing first text and the whole answer; `on_text(text)` for each chunk."""
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
