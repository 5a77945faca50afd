"""Reading a Triton request's inputs, and building outputs and error replies."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from .. import errors
from ..errors import InvalidInput
from ..model.config import ModelConfig
from ..settings import ServingConfig

log = logging.getLogger(__name__)


def model_config(settings: ServingConfig) -> ModelConfig:
    """The checkpoint, device, dtype, kernels and FP8 mode for a served model. Raises InvalidInput when no
    checkpoint is set."""
    if not settings.checkpoint:
        raise InvalidInput("no checkpoint: set QWEN3VL_CHECKPOINT (qwen3vl-serve --checkpoint does) "
                           "or the model's `checkpoint` parameter")
    if settings.resolved_device == "cpu":
        # Small CPU ops gain little from a second thread, and a thread that waits for a core
        # the server's own threads hold stalls every op (measured: served decode steps 1.3x
        # slower with torch on both of 2 cores than with one).
        torch.set_num_threads(settings.torch_threads)
    return ModelConfig.load(settings.checkpoint, device=settings.resolved_device, dtype=settings.torch_dtype,
                            kernels=settings.kernels, fp8_mode=settings.fp8_mode)


def request_parameters(request) -> dict:
    """The request's parameters ({} when none, or when they are not a JSON object)."""
    try:
        params = json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def input_array(pb, request, name: str) -> np.ndarray | None:
    t = pb.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def scalar(pb, request, name: str, cast):
    """A [1]-shaped optional input's value, or None when absent. Raises InvalidInput naming the
    input when it holds other than one value, or one that `cast` rejects."""
    array = input_array(pb, request, name)
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise InvalidInput(f"{name} must hold one value, got shape {list(np.asarray(array).shape)}")
    value = flat[0]
    try:
        return cast(value.decode("utf-8") if isinstance(value, bytes) else value)
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{name} is not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    except (ValueError, TypeError):
        raise InvalidInput(f"{name}: {str(value)[:40]!r} is not a valid {cast.__name__}") from None


def bytes_list(pb, request, name: str) -> list[bytes]:
    """A BYTES [-1] input's elements ([] when absent)."""
    array = input_array(pb, request, name)
    return [] if array is None else [bytes(b) for b in np.asarray(array, dtype=object).reshape(-1)]


def torch_input(pb, request, name: str) -> torch.Tensor | None:
    """An input as a torch tensor of its own dtype (bf16 included), cloned: the request's
    buffers are not ours to keep once execute() has returned."""
    t = pb.get_input_tensor_by_name(request, name)
    return None if t is None else torch.from_dlpack(t.to_dlpack()).clone()


def torch_output(pb, name: str, t: torch.Tensor):
    """A torch tensor (any dtype, bf16 included) as an output tensor, without a copy. An empty
    one is made afresh: one from a numpy array of the wire (e.g. a [0, 3] grid) can carry
    strides that DLPack export calls non-contiguous."""
    if t.numel() == 0:
        t = torch.empty(t.shape, dtype=t.dtype)
    return pb.Tensor.from_dlpack(name, to_dlpack(t.contiguous()))


def error_response(pb, error: BaseException):
    """An error reply: the Triton code of `error` (errors.code_for) and its message with the
    marker, so the code survives where only a message travels (gRPC streams)."""
    code = errors.code_for(error)
    if code == errors.INTERNAL:
        log.error("request failed: %s: %s", type(error).__name__, error)
    message = errors.marked(code, str(error) or type(error).__name__)
    return pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, code)))


def auto_complete(model_config, io_for_dtype):
    """Declare a model's inputs, outputs and decoupled policy from the contract in Triton's
    `auto_complete_config`, the E->L tensors in the dtype the settings give (the model has not
    loaded yet). `io_for_dtype`: contract.language_io or contract.encoder_io."""
    settings = ServingConfig.load(model_config.as_dict().get("parameters"))
    inputs, outputs = io_for_dtype(settings.dtype_name)
    for tensor in inputs:
        model_config.add_input(tensor)
    for tensor in outputs:
        model_config.add_output(tensor)
    model_config.set_model_transaction_policy({"decoupled": True})
    return model_config
