"""The tensor contract (docs/api.md) in one place: names, and the models' inputs and outputs
as Triton config entries. The `model.py` shells declare these in `auto_complete_config`, so the
`config.pbtxt` files hold only what an operator changes; the client, the transfer and the tests
use the same names.
"""

from __future__ import annotations

# Public API of `ensemble` (also accepted by `qwen3_language` for text-only requests).
TEXT_INPUT = "text_input"        # BYTES [1]
IMAGES = "images"                # BYTES [-1], optional: encoded image files in prompt order
VIDEOS = "videos"                # BYTES [-1], optional: encoded video files (MP4, WebM, MKV, AVI) in prompt order
VIDEO_FPS = "video_fps"          # FP32 [1], optional: frames sampled per second of video (default the checkpoint's)
MAX_TOKENS = "max_tokens"        # INT32 [1], optional
TEMPERATURE = "temperature"      # FP32 [1], optional, 0 = greedy
TOP_P = "top_p"                  # FP32 [1], optional
TOP_K = "top_k"                  # INT32 [1], optional
SEED = "seed"                    # UINT64 [1], optional
STREAM = "stream"                # BOOL [1], optional
IGNORE_EOS = "ignore_eos"        # BOOL [1], optional: generate max_tokens whatever the stop tokens (benchmarks)
# BYTES [1], optional: vLLM's `structured_outputs` object as JSON text, exactly one of {"json": schema},
# {"json_object": true}, {"regex": "..."}, {"choice": [...]}, {"grammar": "EBNF"}, {"structural_tag": {...}}
STRUCTURED_OUTPUTS = "structured_outputs"
TOOLS = "tools"                  # BYTES [1], optional: OpenAI `tools` (a JSON list) for the chat template
TEXT_OUTPUT = "text_output"      # BYTES [1]
OUTPUT_IDS = "output_ids"        # INT32 [-1]
FINISH_REASON = "finish_reason"  # BYTES [1]: stop, length, cancelled, or empty while streaming
NUM_INPUT_TOKENS = "num_input_tokens"  # INT32 [1]: the prompt's tokens (visual tokens included)

# Request parameters (not tensors: Triton hands an ensemble request's parameters to every step).
# A generation request may carry a secret `cancel_token`; a request to `qwen3_language` with the
# parameter `cancel` set to that token cancels the generation (its `text_input` is ignored). The
# way to cancel a generation running inside the ensemble: Triton (2.51, and at its HEAD)
# passes an ensemble request's cancellation only to steps not yet started.
CANCEL_TOKEN = "cancel_token"
CANCEL = "cancel"
# A generation request may carry `stop`: a JSON array of strings (as text). The answer ends just
# before the first of them, at the token that completes it (finish_reason `stop`), in the model.
STOP = "stop"
# `raw_prompt` true: `text_input` is the whole prompt, tokenized as it is, without the chat template
# (what a text completion takes); text only.
RAW_PROMPT = "raw_prompt"

# Encoder -> language (inside the ensemble and between servers).
VISUAL_EMBEDS = "visual_embeds"        # model dtype [N, H]
DEEPSTACK_EMBEDS = "deepstack_embeds"  # model dtype [L, N, H]
IMAGE_GRID_THW = "image_grid_thw"      # INT64 [k, 3]
VIDEO_GRID_THW = "video_grid_thw"      # INT64 [v, 3]
VIDEO_TIMESTAMPS = "video_timestamps"  # FP64 [sum of t]: each video frame group's time in seconds (float64:
                                       # the prompt prints it with one decimal, as the processor does)
# Rows of visual_embeds/deepstack_embeds: every image's tokens, then every video's (frame groups in
# order); the language side puts them where the prompt's placeholders are.

# The chunked, resumable E->L transfer between servers (extra inputs and outputs of
# `qwen3_encoder`; qwen3vl.disagg).
CHUNK_TOKENS = "chunk_tokens"    # INT32 [1]: visual tokens per chunk (asks for chunked responses)
RESUME_FROM = "resume_from"      # INT64 [1]: first visual token wanted
MAX_CHUNKS = "max_chunks"        # INT32 [1]: stop after this many chunks (0: all)
IMAGE_DIGESTS = "image_digests"  # BYTES [-1]: SHA-256 of image files the encoder may have cached
VIDEO_DIGESTS = "video_digests"  # BYTES [-1]: SHA-256 of video files the encoder may have cached (with video_fps)
SHM_REGION = "shm_region"        # BYTES [1]: write the chunk into this shared-memory region
# A shm_region's name: this prefix, the pid of the process that made it, "-", a random part. An
# encoder opens no other name; a server's launcher removes a dead model process's regions by it.
SHM_REGION_PREFIX = "qwen3vl-transfer-"
CHUNK_START = "chunk_start"      # INT64 [1]: where this chunk's rows go
TOTAL_TOKENS = "total_tokens"    # INT64 [1]: N of the whole request

# Triton data type of each model dtype name, for the E->L tensors.
TRITON_DTYPE = {"float32": "TYPE_FP32", "bfloat16": "TYPE_BF16", "float16": "TYPE_FP16"}


def _tensor(name: str, data_type: str, dims: list[int], optional: bool | None = None) -> dict:
    entry = {"name": name, "data_type": data_type, "dims": dims}
    if optional is not None:
        entry["optional"] = optional
    return entry


# The language model's request inputs, all but text_input optional. Inside the ensemble they
# travel through the encoder step unchanged: Triton requires every input of a step that follows
# a decoupled step (the batching encoder) to come from that step, not from the ensemble's inputs.
LANGUAGE_REQUEST = [
    _tensor(TEXT_INPUT, "TYPE_STRING", [1]),
    _tensor(MAX_TOKENS, "TYPE_INT32", [1], True),
    _tensor(TEMPERATURE, "TYPE_FP32", [1], True),
    _tensor(TOP_P, "TYPE_FP32", [1], True),
    _tensor(TOP_K, "TYPE_INT32", [1], True),
    _tensor(SEED, "TYPE_UINT64", [1], True),
    _tensor(STREAM, "TYPE_BOOL", [1], True),
    _tensor(IGNORE_EOS, "TYPE_BOOL", [1], True),
    _tensor(STRUCTURED_OUTPUTS, "TYPE_STRING", [1], True),
    _tensor(TOOLS, "TYPE_STRING", [1], True),
]
LANGUAGE_REQUEST_INPUTS = tuple(t["name"] for t in LANGUAGE_REQUEST)

# `ensemble`: the language request plus the images. text_input is declared optional there only
# so that a request without it reaches the encoder and gets a clear INVALID_ARG (ensemble/config.pbtxt).
MEDIA_INPUTS = [_tensor(IMAGES, "TYPE_STRING", [-1], True), _tensor(VIDEOS, "TYPE_STRING", [-1], True),
                _tensor(VIDEO_FPS, "TYPE_FP32", [1], True)]
ENSEMBLE_INPUTS = [{**LANGUAGE_REQUEST[0], "optional": True}, *MEDIA_INPUTS, *LANGUAGE_REQUEST[1:]]

LANGUAGE_OUTPUTS = [
    _tensor(TEXT_OUTPUT, "TYPE_STRING", [1]),
    _tensor(OUTPUT_IDS, "TYPE_INT32", [-1]),
    _tensor(FINISH_REASON, "TYPE_STRING", [1]),
    _tensor(NUM_INPUT_TOKENS, "TYPE_INT32", [1]),
]

TRANSFER_INPUTS = [
    _tensor(CHUNK_TOKENS, "TYPE_INT32", [1], True),
    _tensor(RESUME_FROM, "TYPE_INT64", [1], True),
    _tensor(MAX_CHUNKS, "TYPE_INT32", [1], True),
    _tensor(IMAGE_DIGESTS, "TYPE_STRING", [-1], True),
    _tensor(VIDEO_DIGESTS, "TYPE_STRING", [-1], True),
    _tensor(SHM_REGION, "TYPE_STRING", [1], True),
]
TRANSFER_OUTPUTS = [
    _tensor(CHUNK_START, "TYPE_INT64", [1]),
    _tensor(TOTAL_TOKENS, "TYPE_INT64", [1]),
]


def e2l_tensors(dtype_name: str) -> list[dict]:
    """The encoder->language tensors (outputs of the encoder, inputs of the language model) in
    the model dtype (`float32`, `bfloat16` or `float16`)."""
    tdt = TRITON_DTYPE[dtype_name]
    return [
        _tensor(VISUAL_EMBEDS, tdt, [-1, -1]),
        _tensor(DEEPSTACK_EMBEDS, tdt, [-1, -1, -1]),
        _tensor(IMAGE_GRID_THW, "TYPE_INT64", [-1, 3]),
        _tensor(VIDEO_GRID_THW, "TYPE_INT64", [-1, 3]),
        _tensor(VIDEO_TIMESTAMPS, "TYPE_FP64", [-1]),
    ]


def language_io(dtype_name: str) -> tuple[list[dict], list[dict]]:
    """`qwen3_language`: (inputs, outputs). The E->L tensors are optional (text-only requests)."""
    return ([*LANGUAGE_REQUEST, *({**t, "optional": True} for t in e2l_tensors(dtype_name))],
            list(LANGUAGE_OUTPUTS))


def encoder_io(dtype_name: str) -> tuple[list[dict], list[dict]]:
    """`qwen3_encoder`, local and remote alike: (inputs, outputs). Images and videos are
    optional (a text-only request through the ensemble); the language request passes through."""
    passthrough = [{**t, "optional": True} for t in LANGUAGE_REQUEST]
    return ([*MEDIA_INPUTS, *passthrough, *TRANSFER_INPUTS],
            [*e2l_tensors(dtype_name), *({k: v for k, v in t.items() if k != "optional"} for t in LANGUAGE_REQUEST),
             *TRANSFER_OUTPUTS])
