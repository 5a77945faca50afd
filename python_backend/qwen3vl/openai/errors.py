"""Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), and the HTTP
status of each kind of failure:

- the request itself (a malformed or unsupported field, a bad image): 400;
- a model name this service does not serve: 404;
- the model's own verdict, read from the project's marker on the message (`qwen3vl.errors`):
  INVALID_ARG -> 400, UNAVAILABLE (no encoder server could serve an image) -> 503;
- Triton unreachable, the ensemble not loaded or not ready, or its queue full: 503;
- the request's deadline passed: 504;
- anything else: 500, with the message and never a traceback.
"""

from __future__ import annotations

import re

import grpc

from .. import errors as qerrors


class APIError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def unavailable(message: str) -> APIError:
    return APIError(503, message, code="service_unavailable")


def timeout(message: str) -> APIError:
    return APIError(504, message, code="timeout")


_IMAGE_INDEX = re.compile(r"\bimages\[(\d+)\]")
_VIDEO_INDEX = re.compile(r"\bvideos\[(\d+)\]")

# gRPC status of a failed call -> (HTTP status, code)
_RPC_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_value"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.NOT_FOUND: (503, "service_unavailable"),  # the ensemble is not loaded
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def from_model(message: str, image_params: list[str], video_params: list[str] = ()) -> APIError | None:
    """The error for a message the model marked (`[qwen3vl:CODE] ...`), or None when it is not
    marked (Triton's own). An image named by its index (`images[1]`) is named by its place in
    the request instead (`messages[2].content[0].image_url.url`), and so is a video."""
    code = qerrors.code_of(message)
    if code is None:
        return None
    text = qerrors.message_of(message)
    param = None
    for pattern, params, word in ((_IMAGE_INDEX, image_params, "image"), (_VIDEO_INDEX, video_params, "video")):
        match = pattern.search(text)
        if match and int(match.group(1)) < len(params):
            param = params[int(match.group(1))]
            text = f"{param}: {pattern.sub(word, text, count=1)}"
            break
    if code == qerrors.INVALID_ARG:
        return invalid(text, param)
    if code == qerrors.UNAVAILABLE:
        return unavailable(text)
    return APIError(500, text, param=param, code="model_error")


def from_rpc(error: grpc.aio.AioRpcError, what: str) -> APIError:
    """The error for a failed gRPC call to Triton (`what`: e.g. `ensemble at host:port`)."""
    status, code = _RPC_STATUS.get(error.code(), (500, "model_error"))
    details = error.details() or error.code().name
    if status == 504:
        return timeout(f"{what} did not finish within the request's time limit")
    if status == 503:
        return unavailable(f"{what} is unavailable: {details}")
    return APIError(status, f"{what}: {details}", code=code)
