"""Tensors as bytes: the few places torch and numpy meet, written once.

numpy has no bfloat16. tritonclient hands BF16 tensors over as `ml_dtypes.bfloat16` arrays,
and torch has no such dtype, so every bf16 crossing goes through a 16-bit integer view of the
same bits (no copy, no rounding).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

_SAME_SIZE_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that holds `dtype`'s bits (bfloat16: uint16)."""
    return np.dtype(np.uint16) if dtype == torch.bfloat16 else np.dtype(str(dtype).removeprefix("torch."))


def to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """numpy -> torch without copying; a bf16 array (ml_dtypes, or uint16 bits) through a 16-bit view."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, contiguous, on the CPU (hash keys that must tell any two values apart)."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def copy_bits(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src bit for bit, through torch's multi-threaded copy (numpy's is one thread).
    Both are viewed as integers of the same width, so any dtype (ml_dtypes' bfloat16 too) copies."""
    as_int = _SAME_SIZE_INT[dst.itemsize]
    with warnings.catch_warnings():  # src may be a read-only gRPC buffer: it is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(np.asarray(src).view(as_int))
    torch.from_numpy(dst.view(as_int)).copy_(source)
