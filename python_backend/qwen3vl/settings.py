"""One serving configuration, built once per model from three sources and passed down.

Each setting is written once, in `ServingConfig` below: its default, what it means, and its
`qwen3vl-serve` flag where it has one. A served model reads, in order of precedence:

1. the environment variable `QWEN3VL_<NAME>` (what `qwen3vl-serve` writes from its flags, or a
   container's `env`),
2. the model's `config.pbtxt` parameter `<name>` (what differs between config variants, e.g. the
   language server's `encoder_mode: remote`),
3. the default here.

The settings table of docs/serving.md is generated from this class (`settings_table()`; a test
keeps the document equal to it).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import InvalidInput
from .model.config import resolve_device, resolve_dtype

ENV_PREFIX = "QWEN3VL_"


def _setting(default: Any, help: str, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class ServingConfig:
    """Everything the served models are told; fields are the setting names (lower case)."""

    # -- every model
    checkpoint: str = _setting("", "checkpoint directory: config.json, safetensors + index, tokenizer, "
                                   "processor configs", "--checkpoint")
    device: str = _setting("auto", "`auto` (cuda when available), `cpu`, `cuda`, `cuda:N`", "--device")
    dtype: str = _setting("auto", "`auto` (bf16 on GPU, fp32 on CPU), `float32`, `bfloat16`; the E->L "
                                  "tensors use it too", "--dtype")
    cpu_threads: int = _setting(0, "torch threads of each model on the CPU (0: all cores but one, which the "
                                   "server's own threads need: gRPC, responses)", "--cpu-threads")
    # -- admission and overload (every model)
    max_queued_requests: int = _setting(256, "requests waiting for a slot at most (each model's queue); one more "
                                             "is refused at once with UNAVAILABLE (server busy)",
                                        "--max-queued-requests")
    max_queue_time_s: float = _setting(0.0, "a request still waiting for a slot after this long fails with "
                                            "UNAVAILABLE (0: no deadline)", "--max-queue-time-s")
    max_images_per_request: int = _setting(16, "images in one request at most", "--max-images-per-request")
    max_visual_tokens_per_request: int = _setting(16384, "visual tokens of one request's images at most, computed "
                                                         "from the image headers before any vision work",
                                                  "--max-visual-tokens-per-request")
    max_image_pixels: int = _setting(50_000_000, "pixels of one image file at most (a decoded image takes 3 "
                                                 "bytes per pixel before it is resized)", "--max-image-pixels")
    max_videos_per_request: int = _setting(4, "videos in one request at most", "--max-videos-per-request")
    max_video_bytes: int = _setting(256 << 20, "bytes of one video file at most", "--max-video-bytes")
    max_video_seconds: float = _setting(600.0, "duration of one video at most (frames / frame rate, from its "
                                              "header; the decoder walks the file up to its last sampled frame)",
                                        "--max-video-seconds")
    max_video_frames: int = _setting(768, "frames sampled from one video at most (the processor's own cap is its "
                                          "max_frames, 768)", "--max-video-frames")
    max_video_frame_pixels: int = _setting(3840 * 2160, "pixels of one video frame at most", "--max-video-frame-pixels")
    video_fps: float = _setting(0.0, "frames sampled per second of video when a request gives no video_fps (0: the "
                                     "checkpoint's video processor's, 2 for the released ones)", "--video-fps")
    video_cap_pixels_per_frame: bool = _setting(False, "the video processor's per-frame pixel cap (qwen-vl-utils' "
                                                       "budget: max(min(768*32^2, longest_edge/frames), "
                                                       "1.05*shortest_edge)); off: transformers 5.24's default, one "
                                                       "pixel budget for the whole clip", "--video-cap-pixels-per-frame")
    allow_special_tokens_in_prompt: bool = _setting(False, "treat special-token text typed inside messages "
                                                           "(`<|im_end|>`, `<|im_start|>`...) as the control "
                                                           "token; off: it is plain text, only the chat template "
                                                           "makes control tokens", "--allow-special-tokens-in-prompt")
    inject_fault_image_sha256: str = _setting("", "fault tests only: a vision forward holding the image file with "
                                                  "this SHA-256 (hex) raises")
    log_requests: bool = _setting(False, "debug: log each request's prompt text and parameters (otherwise logs "
                                         "never hold prompt text or image bytes)", "--log-requests")
    # -- qwen3_language
    max_model_len: int = _setting(0, "prompt + generated tokens limit (0: the model's)", "--max-model-len")
    max_num_seqs: int = _setting(64, "sequences in flight (the running batch) at most; more wait in a FIFO queue",
                                 "--max-num-seqs")
    max_num_batched_tokens: int = _setting(2048, "tokens per engine step: one per running decode, the rest to "
                                                 "prefill chunks", "--max-num-batched-tokens")
    enable_chunked_prefill: bool = _setting(True, "split long prompts into chunks that share steps with the "
                                                  "running decodes", "--enable-chunked-prefill")
    enable_prefix_caching: bool = _setting(True, "reuse the KV blocks of repeated prompt prefixes (an image, a "
                                                 "system prompt, earlier turns)", "--enable-prefix-caching")
    block_size: int = _setting(16, "tokens per KV block", "--block-size")
    kv_cache_mb: float = _setting(0.0, "the KV cache, prefix-cached blocks included (0: on GPU what "
                                       "gpu_memory_utilization leaves after the weights; on CPU 1024)", "--kv-cache-mb")
    kernels: str = _setting("auto", "the language model's MoE and attention kernels: `auto` (OpenAI Triton on "
                                    "CUDA, torch elsewhere), `torch`, `triton` (on a CPU only under "
                                    "TRITON_INTERPRET=1: slow, for tests)", "--kernels")
    fp8_mode: str = _setting("auto", "Qwen's block-FP8 checkpoints (`quantization_config` quant_method fp8): "
                                     "`dequantize` (FP8 weights to the model dtype at load: bf16 on GPU, fp32 on "
                                     "CPU; runs everywhere), `native` (the language model's FP8 weights kept with "
                                     "their block scales, W8A8 block-FP8 Triton kernels: needs kernels=triton on a "
                                     "GPU of compute capability 8.9+, or on a CPU under TRITON_INTERPRET=1 for tests), "
                                     "`auto` (native on such a GPU when the checkpoint can run natively, else "
                                     "dequantize); no effect on other checkpoints", "--fp8-mode")
    gpu_memory_utilization: float = _setting(0.9, "share of the GPU's memory the language model may use in all "
                                                  "(with kv_cache_mb 0; vLLM's meaning: other processes on the "
                                                  "card do not count against it, but the KV pool never takes more "
                                                  "than is free)", "--gpu-memory-utilization")
    tensor_parallel_size: int = _setting(1, "processes (GPUs: rank r on cuda:r) the language model is split "
                                            "across: attention heads, experts and vocabulary (docs/tensor-parallel.md)",
                                         "--tensor-parallel-size")
    enable_expert_parallel: bool = _setting(False, "with tensor_parallel_size > 1: each rank holds whole experts "
                                                   "(E / N) instead of a slice of every expert",
                                            "--enable-expert-parallel")
    vocab_parallel: bool = _setting(True, "tensor parallel: the embedding and LM head split by vocabulary across "
                                          "the ranks (off: whole on every rank; docs/tensor-parallel.md measures both)")
    distributed_timeout_s: float = _setting(600.0, "tensor parallel: how long the ranks' rendezvous, each rank's "
                                                   "loading and any collective may take before the model fails",
                                            "--distributed-timeout-s")
    enforce_eager: bool = _setting(False, "run every step eagerly: no CUDA graphs (by default pure-decode steps "
                                          "replay graphs captured at start, on CUDA with kernels triton)",
                                   "--enforce-eager")
    # -- qwen3_encoder
    encoder_mode: str = _setting("local", "`local`: the vision tower runs here; `remote`: fetch from encoder "
                                          "servers (set by the language role's config variant)")
    encoder_max_queue_delay_ms: float = _setting(0.0, "how long the encoder waits for more requests to batch")
    encoder_max_batch_images: int = _setting(64, "images and videos per vision forward at most")
    encoder_cache_mb: float = _setting(1024.0, "the encoder's feature cache (per image and per video)")
    # -- qwen3_encoder on a language server (encoder_mode remote)
    encoder_urls: str = _setting("", "encoder servers' gRPC HOST:PORT, comma separated (the flag: repeat it for several)", "--encoder-url")
    transfer_chunk_tokens: int = _setting(1024, "visual tokens per E->L transfer chunk", "--chunk-tokens")
    encoder_timeout_s: float = _setting(30.0, "give up on an image after this long")
    encoder_same_wait_s: float = _setting(3.0, "how long to wait for a failed encoder to come back before "
                                               "moving to the next")
    transfer_shared_memory: bool = _setting(False, "E->L tensors through system shared memory (encoders on "
                                                   "this host)", "--shared-memory")
    transfer_shm_region_mib: float = _setting(64.0, "the largest shared-memory region the language server "
                                                    "makes (up to 8 kept idle); a larger image takes several "
                                                    "responses")

    # ---- building it
    @classmethod
    def load(cls, parameters: Mapping | None = None, environ: Mapping[str, str] | None = None) -> "ServingConfig":
        """From `environ` (default: os.environ) over Triton model `parameters` ({key:
        {"string_value": ...}} as in the model config JSON) over the defaults.

        Raises InvalidInput naming the setting when a value does not parse."""
        environ = os.environ if environ is None else environ
        params = {k: (v.get("string_value", "") if isinstance(v, Mapping) else str(v))
                  for k, v in (parameters or {}).items()}
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper()) or params.get(f.name)
            if raw not in (None, ""):
                values[f.name] = _parse(f, raw)
        return cls(**values)

    def env(self, names=None) -> dict[str, str]:
        """The `QWEN3VL_*` variables that carry the settings `names` (default: those that differ
        from the defaults): what `qwen3vl-serve` hands tritonserver."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (f.name in names) if names is not None else value != f.default:
                out[ENV_PREFIX + f.name.upper()] = _format(value)
        return out

    # ---- derived values, each computed in one place
    @property
    def resolved_device(self) -> str:
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.resolved_device)

    @property
    def dtype_name(self) -> str:
        """`float32`, `bfloat16` or `float16`: the E->L tensors' dtype."""
        return str(self.torch_dtype).removeprefix("torch.")

    @property
    def torch_threads(self) -> int:
        """torch threads of a model on the CPU: `cpu_threads`, or all cores but one (which the
        server's own threads need: gRPC, the response thread)."""
        return self.cpu_threads or max(1, len(os.sched_getaffinity(0)) - 1)

    @property
    def encoder_url_list(self) -> list[str]:
        return [u for u in self.encoder_urls.replace(",", " ").split() if u]

    def context_window(self, model_max_len: int) -> int:
        """Prompt + generated tokens at most: max_model_len, or the model's own
        (`max_position_embeddings`) when it is 0."""
        return self.max_model_len or model_max_len

    @staticmethod
    def mib(value: float) -> int:
        return int(value * 2**20)


def _parse(f: dataclasses.Field, raw: str):
    kind = type(f.default)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError:
        raise InvalidInput(f"setting {f.name} ({ENV_PREFIX}{f.name.upper()}): {raw!r} is not a "
                           f"{kind.__name__}") from None


def _format(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def settings_table() -> str:
    """docs/serving.md's table of settings (markdown), generated from ServingConfig."""
    rows = ["| setting (`QWEN3VL_*` variable, config.pbtxt parameter) | `qwen3vl-serve` flag | default | meaning |",
            "|---|---|---|---|"]
    for f in dataclasses.fields(ServingConfig):
        default = _format(f.default) if f.default != "" else "(none)"
        rows.append(f"| `{ENV_PREFIX}{f.name.upper()}`, `{f.name}` | {('`' + f.metadata['flag'] + '`') if f.metadata['flag'] else ''} "
                    f"| {default} | {f.metadata['help']} |")
    return "\n".join(rows)
