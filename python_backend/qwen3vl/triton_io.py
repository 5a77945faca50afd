"""Helpers the Triton shells share: environment-driven settings and tensor conversion.

Kept here, not in the model.py files, so they are importable and testable without Triton.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import contract
from .config import ModelConfig, resolve_dtype


def setting(parameters: dict | None, name: str, default: str = "") -> str:
    """A served model's setting: the environment variable QWEN3VL_<NAME> (set by `qwen3vl-serve`
    or a container) over the config.pbtxt parameter <name>, over the default."""
    params = {k: v.get("string_value", "") for k, v in (parameters or {}).items()}
    return os.environ.get(f"QWEN3VL_{name.upper()}") or params.get(name) or default


def model_config_from_env(parameters: dict | None = None) -> ModelConfig:
    """The checkpoint, device and dtype for a served model (see `setting`)."""
    checkpoint = setting(parameters, "checkpoint")
    if not checkpoint:
        raise ValueError("no checkpoint: set QWEN3VL_CHECKPOINT (qwen3vl-serve --checkpoint does) "
                         "or the model's `checkpoint` parameter")
    device = setting(parameters, "device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ModelConfig.load(checkpoint, device=device, dtype=setting(parameters, "dtype", "auto"))


def served_dtype_name() -> str:
    """The E->L tensors' dtype as config auto-completion must declare it, before any model loads."""
    device = os.environ.get("QWEN3VL_DEVICE", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(os.environ.get("QWEN3VL_DTYPE", "auto"), device)
    return str(dtype).removeprefix("torch.")


def e2l_outputs(dtype_name: str) -> list[dict]:
    """Config entries of the encoder->language tensors (outputs of the encoder, inputs of the
    language model), in the model dtype."""
    tdt = contract.TRITON_DTYPE[dtype_name]
    return [
        {"name": contract.VISUAL_EMBEDS, "data_type": tdt, "dims": [-1, -1]},
        {"name": contract.DEEPSTACK_EMBEDS, "data_type": tdt, "dims": [-1, -1, -1]},
        {"name": contract.IMAGE_GRID_THW, "data_type": "TYPE_INT64", "dims": [-1, 3]},
    ]


def scalar(array: np.ndarray | None, cast):
    """A [1]-shaped optional input's value, or None when absent."""
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"expected one value, got shape {tuple(np.asarray(array).shape)}")
    value = flat[0]
    return cast(value.decode("utf-8") if isinstance(value, bytes) else value)


def bytes_list(array: np.ndarray | None) -> list[bytes]:
    if array is None:
        return []
    return [bytes(b) for b in np.asarray(array, dtype=object).reshape(-1)]
