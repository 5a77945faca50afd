"""Cancelling a generation by its token.

Closing a request's stream cancels the ensemble request, but Triton passes that on only to
steps not yet started, so a generation already running in `qwen3_language` would go on to its
end (docs/api.md, Cancelling). So a generation request carries a secret token (the request parameter
contract.CANCEL_TOKEN), and cancelling it also sends `qwen3_language` a cancel request naming
that token (contract.CANCEL). This module is the one place that makes tokens and cancel
requests, for the thread-based clients and for the asyncio client of the OpenAI service.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import numpy as np

from .. import contract
from ..grpc_stream import stream_infer
from .inputs import infer_input

log = logging.getLogger(__name__)

LANGUAGE_MODEL = "qwen3_language"
# A cancel request that finds no generation while none of its responses had come may have
# overtaken it on its way into the language model: ask again, this many times, this far apart.
CANCEL_TRIES, CANCEL_RETRY_S, CANCEL_TIMEOUT_S = 3, 0.5, 10.0


def new_token() -> str:
    """A fresh secret token: only who holds it can cancel the generation."""
    return uuid.uuid4().hex


def token_parameters(token: str) -> dict[str, str]:
    """The request parameters that name a generation request by `token`."""
    return {contract.CANCEL_TOKEN: token}


def cancel_request(module, token: str) -> tuple[list, dict[str, str]]:
    """(inputs, parameters) of the cancel request for `token`: an empty `text_input`, which the
    language model ignores, and the token as contract.CANCEL; `module` is tritonclient.grpc or
    .http."""
    return [infer_input(module, contract.TEXT_INPUT, np.array([b""], dtype=object))], {contract.CANCEL: token}


def cancel_generation(url: str, token: str, model: str = LANGUAGE_MODEL, timeout_s: float = 30) -> bool:
    """Cancel the generation that carries `token` on the server at `url` (gRPC); False when
    none runs it (it finished already). Never raises: a server that is gone has cancelled it
    anyway."""
    import tritonclient.grpc as grpcclient

    inputs, parameters = cancel_request(grpcclient, token)
    client = grpcclient.InferenceServerClient(url)
    try:
        list(stream_infer(client, model, inputs, timeout_s, parameters=parameters))
        return True
    except Exception:  # noqa: BLE001 - NOT_FOUND (finished), or the server is gone
        return False
    finally:
        client.close()


async def cancel_generation_async(client, token: str, started: bool, model: str = LANGUAGE_MODEL) -> None:
    """Cancel the generation that carries `token` through `client` (a tritonclient.grpc.aio
    InferenceServerClient). `started`: a response of it had arrived, so a generation not found
    has finished; otherwise the cancel is asked again (CANCEL_TRIES). Never raises."""
    import grpc
    import tritonclient.grpc as grpcclient

    inputs, parameters = cancel_request(grpcclient, token)
    for attempt in range(CANCEL_TRIES):
        try:
            _result, error = await _first_response(client, {"model_name": model, "inputs": inputs,
                                                            "parameters": parameters})
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            log.warning("could not cancel a request in %s: %s", model, e)
            return
        if error is None:
            return
        if started or attempt == CANCEL_TRIES - 1:
            log.debug("cancel request: %s", error)
            return
        await asyncio.sleep(CANCEL_RETRY_S)


async def _first_response(client, request: dict):
    """(result, error) of the first response to one request on its own stream, which then closes."""
    done = asyncio.Event()

    async def requests():
        yield request
        await done.wait()

    call = client.stream_infer(requests(), stream_timeout=CANCEL_TIMEOUT_S)
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT_S):
            return await call.__anext__()
    finally:
        done.set()
        call.cancel()
