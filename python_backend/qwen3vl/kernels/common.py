"""What the Triton kernel modules share: the dot settings (UPCAST_DOT) and a device check."""

from __future__ import annotations

import torch

from . import interpreting


def dot_options(dtype: torch.dtype) -> dict:
    """The constexprs UPCAST_DOT and DOT_PRECISION of a kernel whose tiles are `dtype`. Kernels do

        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    inline (a jit helper would cost the interpreter milliseconds a call). Upcast always under the
    interpreter (its bf16 tl.dot multiplies raw bit patterns) and for fp32 inputs, which are then
    multiplied in full fp32 ("ieee"; a GPU's fp32 tl.dot would otherwise round them to tf32).
    bf16 and fp16 on a GPU go to the tensor cores as they are ("tf32" is the default setting,
    unused for 16-bit inputs)."""
    upcast = interpreting() or dtype == torch.float32
    return dict(UPCAST_DOT=upcast, DOT_PRECISION="ieee" if upcast else "tf32")


def check_device(*tensors: torch.Tensor) -> None:
    """ValueError unless every tensor is on CUDA, or on the CPU under the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
            raise ValueError(f"a Triton kernel got a tensor on {t.device}: it runs on CUDA, or on the CPU "
                             "under TRITON_INTERPRET=1")
