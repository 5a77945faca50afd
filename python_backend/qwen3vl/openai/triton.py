"""The ensemble over Triton's gRPC stream (`tritonclient.grpc.aio`), one stream per request.
Responses are always streamed from Triton, also for a non-streamed completion, so that a stop
string or a client that goes away can cancel the request while it generates.

Cancelling: closing the stream cancels the ensemble request, but Triton passes that on only to
steps not yet started, so a generation already running in `qwen3_language` would go on to its
end. Each request therefore carries a secret `cancel_token` parameter, and cancelling also
sends `qwen3_language` a cancel request naming it (contract.CANCEL)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .. import contract
from .errors import APIError, from_model, from_rpc, unavailable

log = logging.getLogger(__name__)

# A cancel request that finds no generation while none of its responses had come may have
# overtaken it on its way into the language model: ask again, this many times, this far apart.
CANCEL_TRIES, CANCEL_RETRY_S, CANCEL_TIMEOUT_S = 3, 0.5, 10.0


@dataclass
class EnsembleRequest:
    text_input: str
    images: list[bytes]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # UINT64 on the wire: a negative seed wraps around (two's complement)


@dataclass
class Piece:
    """One response of the ensemble: new text, its token ids, the finish reason on the last."""
    text: str
    token_ids: list[int]
    finish_reason: str
    num_input_tokens: int


def _tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


def ensemble_inputs(req: EnsembleRequest) -> list[grpcclient.InferInput]:
    inputs = [_tensor(contract.TEXT_INPUT, np.array([req.text_input.encode("utf-8")], dtype=object)),
              _tensor(contract.STREAM, np.array([True]))]
    if req.images:
        inputs.append(_tensor(contract.IMAGES, np.array(req.images, dtype=object)))
    seed = None if req.seed is None else req.seed % 2**64
    for name, value, dtype in ((contract.MAX_TOKENS, req.max_tokens, np.int32),
                               (contract.TEMPERATURE, req.temperature, np.float32),
                               (contract.TOP_P, req.top_p, np.float32),
                               (contract.TOP_K, req.top_k, np.int32), (contract.SEED, seed, np.uint64)):
        if value is not None:
            inputs.append(_tensor(name, np.array([value], dtype=dtype)))
    return inputs


def _piece(result) -> Piece:
    def first(name):
        array = result.as_numpy(name)
        return None if array is None or array.size == 0 else array.reshape(-1)[0]

    ids = result.as_numpy(contract.OUTPUT_IDS)
    text, reason, prompt = first(contract.TEXT_OUTPUT), first(contract.FINISH_REASON), first(contract.NUM_INPUT_TOKENS)
    return Piece(text.decode("utf-8") if text is not None else "",
                 ids.reshape(-1).tolist() if ids is not None else [],
                 reason.decode() if reason is not None else "",
                 int(prompt) if prompt is not None else 0)


class Ensemble:
    """The Triton server at `url` (gRPC HOST:PORT), its ensemble model and the language model
    the ensemble runs (for cancel requests). Create it inside the event loop that uses it
    (gRPC's aio channel belongs to one loop)."""

    def __init__(self, url: str, model: str = "ensemble", language_model: str = "qwen3_language",
                 timeout_s: float = 600):
        self.url, self.model, self.language_model, self.timeout_s = url, model, language_model, timeout_s
        self.client = grpcaio.InferenceServerClient(url)
        self.name = f"{model} at {url}"
        self._cancels: set[asyncio.Task] = set()  # cancel requests in flight (kept from the GC)

    async def ready(self) -> bool:
        """Triton is up and the ensemble is ready."""
        try:
            return bool(await self.client.is_server_ready() and await self.client.is_model_ready(self.model))
        except (InferenceServerException, grpc.aio.AioRpcError, OSError):
            return False

    def generate(self, req: EnsembleRequest, request_id: str = "", image_params: list[str] = ()) -> Generation:
        return Generation(self, ensemble_inputs(req), request_id, list(image_params))

    def cancel(self, token: str, started: bool) -> None:
        """Cancel the generation named by `token` in the language model, in the background.
        `started`: a response of it had arrived (so a generation not found has finished)."""
        task = asyncio.get_running_loop().create_task(self._cancel(token, started))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, token: str, started: bool) -> None:
        inputs = [_tensor(contract.TEXT_INPUT, np.array([b""], dtype=object))]
        for attempt in range(CANCEL_TRIES):
            try:
                _result, error = await _first_response(self.client, {
                    "model_name": self.language_model, "inputs": inputs, "parameters": {contract.CANCEL: token}})
            except (grpc.aio.AioRpcError, TimeoutError) as e:
                log.warning("could not cancel a request in %s: %s", self.language_model, e)
                return
            if error is None:
                return
            if started or attempt == CANCEL_TRIES - 1:
                log.debug("cancel request: %s", error)
                return
            await asyncio.sleep(CANCEL_RETRY_S)

    async def close(self) -> None:
        for task in list(self._cancels):
            await asyncio.wait({task}, timeout=CANCEL_TIMEOUT_S)
        await self.client.close()


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


class Generation:
    """One request's responses (`async for piece in generation`), until the one with a finish
    reason. Raises APIError for an error from Triton or the model. `close()` cancels the
    request if it has not finished (a stop string, a client gone)."""

    def __init__(self, ensemble: Ensemble, inputs: list, request_id: str, image_params: list[str]):
        self.ensemble, self.image_params = ensemble, image_params
        self.finished, self.started = False, False
        self.token = uuid.uuid4().hex  # secret: only who holds it can cancel the generation
        self._done = asyncio.Event()  # keeps our side of the stream open until the last response

        async def requests():
            yield {"model_name": ensemble.model, "inputs": inputs, "request_id": request_id,
                   "parameters": {contract.CANCEL_TOKEN: self.token}}
            await self._done.wait()

        self._call = ensemble.client.stream_infer(requests(), stream_timeout=ensemble.timeout_s)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Piece:
        if self.finished:
            raise StopAsyncIteration
        try:
            result, error = await self._call.__anext__()
        except grpc.aio.AioRpcError as e:
            self._end()
            if e.code() != grpc.StatusCode.UNAVAILABLE:  # e.g. the deadline: the generation may still run
                self.ensemble.cancel(self.token, self.started)
            raise from_rpc(e, self.ensemble.name) from None
        except StopAsyncIteration:
            self._end()
            raise unavailable(f"{self.ensemble.name} ended the stream before the answer was complete") from None
        if error is not None:
            self._end()
            raise await self._error(str(error)) from None
        self.started = True
        piece = _piece(result)
        if piece.finish_reason:
            self.finished = True
            self._done.set()
        return piece

    async def _error(self, message: str) -> APIError:
        """A marked error is the model's (its code says the status); an unmarked one is Triton's:
        503 when the ensemble is not ready (not loaded, shutting down), else 500."""
        marked = from_model(message, self.image_params)
        if marked is not None:
            return marked
        if not await self.ensemble.ready():
            return unavailable(f"{self.ensemble.name} is not ready: {message}")
        return APIError(500, f"{self.ensemble.name} failed: {message}", code="model_error")

    def _end(self) -> None:
        """The request is over (an error or the deadline ended it): close our side of the stream."""
        self.finished = True
        self._done.set()
        self._call.cancel()

    async def close(self) -> bool:
        """Cancel the request unless it finished; True when it was cancelled."""
        self._done.set()
        if self.finished:
            return False
        self.finished = True
        self._call.cancel()
        self.ensemble.cancel(self.token, self.started)
        return True
