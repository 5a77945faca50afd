"""Requests as the contract (qwen3vl.contract) names their tensors: the one place that turns a
generation, an encode, an E->L transfer or a cancel into tritonclient InferInputs, and a
generation into the JSON body of Triton's HTTP generate endpoint.

Every builder takes `module`, tritonclient.grpc or tritonclient.http (each has its own
InferInput class), so that this module imports neither: the asyncio client of the OpenAI
service, the thread-based clients and the transfer inside a Triton model all build the same way.
"""

from __future__ import annotations

import base64
import json

import numpy as np
from tritonclient.utils import np_to_triton_dtype

from .. import contract


def infer_input(module, name: str, array: np.ndarray):
    """A tritonclient InferInput holding `array` (object arrays travel as BYTES)."""
    t = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


def build_inputs(module, prompt: str, images: list[bytes] = (), max_tokens=None, temperature=None,
                 top_p=None, top_k=None, seed=None, stream=False, ignore_eos=None, videos: list[bytes] = (),
                 video_fps=None, structured_outputs=None, tools=None) -> list:
    """The InferInputs of one generation request to the ensemble (or `qwen3_language`); a
    parameter left None is not sent, so the server's default applies. `seed` is UINT64 on the
    wire: a negative seed wraps around (two's complement), as the OpenAI API lets clients send.
    `structured_outputs` (vLLM's object, e.g. {"json": schema}) and `tools` (OpenAI's list)
    travel as JSON text; a str is sent as it is."""
    def tensor(name, array):
        return infer_input(module, name, array)

    inputs = [tensor(contract.TEXT_INPUT, np.array([prompt.encode("utf-8")], dtype=object))]
    if images:
        inputs.append(tensor(contract.IMAGES, np.array(list(images), dtype=object)))
    if videos:
        inputs.append(tensor(contract.VIDEOS, np.array(list(videos), dtype=object)))
    seed = None if seed is None else seed % 2**64
    optional = [(contract.VIDEO_FPS, video_fps, np.float32),
                (contract.MAX_TOKENS, max_tokens, np.int32), (contract.TEMPERATURE, temperature, np.float32),
                (contract.TOP_P, top_p, np.float32), (contract.TOP_K, top_k, np.int32), (contract.SEED, seed, np.uint64),
                (contract.IGNORE_EOS, ignore_eos, np.bool_)]
    for name, value, np_type in optional:
        if value is not None:
            inputs.append(tensor(name, np.array([value], dtype=np_type)))
    for name, value in ((contract.STRUCTURED_OUTPUTS, structured_outputs), (contract.TOOLS, tools)):
        if value is not None:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            inputs.append(tensor(name, np.array([text.encode("utf-8")], dtype=object)))
    inputs.append(tensor(contract.STREAM, np.array([bool(stream)])))
    return inputs


def generation_parameters(stop: list[str] = (), raw_prompt: bool = False) -> dict:
    """A generation request's parameters besides its tensors: the stop strings (contract.STOP, a
    JSON array as text) when there are any; contract.RAW_PROMPT when the text is the whole
    prompt (no chat template)."""
    params: dict = {contract.STOP: json.dumps(list(stop))} if stop else {}
    if raw_prompt:
        params[contract.RAW_PROMPT] = True
    return params


def encode_inputs(module, images: list[bytes], videos: list[bytes] = (), video_fps: float | None = None) -> list:
    """The InferInputs of one request to `qwen3_encoder` for its E->L tensors. The images go as
    a list even when empty: a request that names no images is not an encode."""
    inputs = [infer_input(module, contract.IMAGES, np.array(list(images), dtype=object).reshape(len(images)))]
    if videos:
        inputs.append(infer_input(module, contract.VIDEOS, np.array(list(videos), dtype=object).reshape(len(videos))))
    if video_fps is not None:
        inputs.append(infer_input(module, contract.VIDEO_FPS, np.array([video_fps], dtype=np.float32)))
    return inputs


def transfer_inputs(module, media: bytes, *, by_digest: bool, chunk_tokens: int, resume_from: int, max_chunks: int,
                    shm_region: str | None = None, video_fps: float | None = None) -> list:
    """The InferInputs of one E->L transfer request to an encoder server: one image, or one video
    with `video_fps` (the file, or its SHA-256 digest with `by_digest`), the chunking, where to
    resume, and the shared-memory region to write into, if any."""
    if video_fps is None:
        files = [(contract.IMAGE_DIGESTS if by_digest else contract.IMAGES, np.array([media], dtype=object))]
    else:  # a video: the file (or its digest) and the rate it is sampled at
        files = [(contract.VIDEO_DIGESTS if by_digest else contract.VIDEOS, np.array([media], dtype=object)),
                 (contract.VIDEO_FPS, np.array([video_fps], dtype=np.float32))]
    tensors = [*files,
               (contract.CHUNK_TOKENS, np.array([chunk_tokens], dtype=np.int32)),
               (contract.RESUME_FROM, np.array([resume_from], dtype=np.int64)),
               (contract.MAX_CHUNKS, np.array([max_chunks], dtype=np.int32)),
               *([(contract.SHM_REGION, np.array([shm_region.encode()], dtype=object))] if shm_region else [])]
    return [infer_input(module, name, value) for name, value in tensors]


def generate_body(prompt: str, images: list[bytes] = (), stream: bool = False, videos: list[bytes] = (),
                  **params) -> dict:
    """The JSON body of a generation for Triton's generate endpoints: images and videos travel
    as base64 data URLs; a parameter left None is not sent."""
    body = {contract.TEXT_INPUT: prompt, contract.STREAM: stream}
    if images:
        body[contract.IMAGES] = ["data:image;base64," + base64.b64encode(b).decode() for b in images]
    if videos:
        body[contract.VIDEOS] = ["data:video;base64," + base64.b64encode(b).decode() for b in videos]
    for name in (contract.STRUCTURED_OUTPUTS, contract.TOOLS):  # BYTES inputs: JSON text
        if params.get(name) is not None and not isinstance(params[name], str):
            params[name] = json.dumps(params[name], ensure_ascii=False)
    body.update({k: v for k, v in params.items() if v is not None})
    return body
