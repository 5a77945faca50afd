"""The language model's kernels: each op as a torch path and an OpenAI Triton path, same API.

Which path runs is one setting, `auto | torch | triton`, resolved once per engine by
`resolve_kernels(setting, device)`; `kernel_ops(kind)` then gives the functions of that path.

This module imports neither triton nor the kernel modules: choosing torch costs nothing, and
triton is imported on first use of a Triton path (`kernel_ops("triton")`). Under
`TRITON_INTERPRET=1` (the CPU) Triton kernels run in numpy, slowly: for tests, not serving.

Modules:
    reference   the torch paths (the model's current math), no triton import
    fused_moe   moe_align, the grouped GEMM, fused_moe (aligned and small-token paths)
    moe_config  tile configs per (E, N, device, triton version), nearest-key lookup
    tune_moe    the tuning sweep that writes a config file (GPU)
    attention   store_kv, unified paged attention (2D and split-KV)
    fusions     rms_norm, fused_add_rms_norm, silu_mul, qk_norm_rope
    block_fp8   W8A8 block FP8: per_token_group_quant_fp8, w8a8_block_fp8_matmul, the FP8 Linear
                (fused_moe_fp8 is in fused_moe); what fp8_mode native runs (model/fp8_linear.py)
    fp8_reference  block FP8 in torch, no triton: weight block (de)quantization, what the loader
                dequantizes with, and the W8A8 emulation the FP8 kernels are checked against
    common      what the Triton modules share (UPCAST_DOT, the device check)
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import InvalidInput

KERNEL_SETTINGS = ("auto", "torch", "triton")
_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET set)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def resolve_kernels(setting: str, device) -> str:
    """Which kernels run: "torch" or "triton".

    setting: "auto" (triton on CUDA, torch elsewhere), "torch" or "triton".
    device: a torch.device or its name ("cuda", "cuda:1", "cpu").
    Raises InvalidInput for an unknown setting, for "triton" where triton is not installed, and
    for "triton" on a device other than CUDA unless TRITON_INTERPRET=1 is set (the interpreter:
    correct but slow, for tests).
    """
    if setting not in KERNEL_SETTINGS:
        raise InvalidInput(f"kernels: {setting!r} is not one of {', '.join(KERNEL_SETTINGS)}")
    device_type = str(device).split(":")[0]
    if setting == "torch" or (setting == "auto" and device_type != "cuda"):
        return "torch"
    if importlib.util.find_spec("triton") is None:
        raise InvalidInput("kernels: triton is not installed; install it or choose kernels=torch")
    if device_type != "cuda" and not interpreting():
        raise InvalidInput(f"kernels=triton on device {device_type!r} needs Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before starting (slow, for tests) or choose kernels=torch")
    return "triton"


@dataclass(frozen=True)
class KernelOps:
    """The ops of one path; every field has the same signature in both paths (see each
    function's docstring in reference.py and in the Triton modules)."""
    fused_moe: Callable
    store_kv: Callable
    paged_attention: Callable
    rms_norm: Callable
    fused_add_rms_norm: Callable
    silu_mul: Callable
    qk_norm_rope: Callable
    # W8A8 block FP8 (fp8_mode native; model/fp8_linear.py): the torch path is the emulation
    w8a8_block_fp8_linear: Callable
    fused_moe_fp8: Callable


def kernel_ops(kind: str) -> KernelOps:
    """The functions of `kind` ("torch" or "triton", as resolve_kernels returns). Importing the
    Triton path imports triton. Raises ValueError for another kind."""
    if kind == "torch":
        from . import fp8_reference as f, reference as r
        return KernelOps(r.fused_moe_torch, r.store_kv_torch, r.paged_attention_torch, r.rms_norm_torch,
                         r.fused_add_rms_norm_torch, r.silu_mul_torch, r.qk_norm_rope_torch,
                         f.w8a8_block_fp8_linear_torch, f.fused_moe_fp8_torch)
    if kind == "triton":
        from functools import partial

        from .attention import store_kv, unified_attention
        from .block_fp8 import activation_quantizer, w8a8_block_fp8_linear
        from .fused_moe import fused_moe, fused_moe_fp8
        from .fusions import fused_add_rms_norm, qk_norm_rope, rms_norm, silu_mul
        quantize = activation_quantizer()
        return KernelOps(fused_moe, store_kv, unified_attention, rms_norm, fused_add_rms_norm, silu_mul,
                         qk_norm_rope, partial(w8a8_block_fp8_linear, quantize=quantize),
                         partial(fused_moe_fp8, quantize=quantize))
    raise ValueError(f"kernel kind {kind!r} is not torch or triton")
