"""The ensemble over Triton's gRPC stream (`tritonclient.grpc.aio`), one stream per request.
Responses are always streamed from Triton, also for a non-streamed completion, so that a client
that goes away can cancel the request while it generates. Stop strings go to the model (the
request parameter contract.STOP), which ends the answer at the token that completes one.

The request's tensors, the parsing of its responses and cancelling by token are the client
library's (qwen3vl.client: inputs, responses, cancel); what is this service's own is the asyncio
stream and how its failures become OpenAI errors (errors.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from ..client.cancel import CANCEL_TIMEOUT_S, LANGUAGE_MODEL, cancel_generation_async, new_token, token_parameters
from ..client.inputs import build_inputs, generation_parameters
from ..client.responses import Chunk, chunk_of
from .errors import APIError, from_model, from_rpc, unavailable


@dataclass
class EnsembleRequest:
    text_input: str
    images: list[bytes]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # UINT64 on the wire: a negative seed wraps around (two's complement)
    stop: list[str] = field(default_factory=list)  # stop strings, applied by the model (contract.STOP)
    videos: list[bytes] = field(default_factory=list)
    video_fps: float | None = None  # frames sampled per second of every video (None: the server's)
    raw_prompt: bool = False  # text_input is the whole prompt: no chat template (a text completion)
    structured_outputs: dict | None = None  # vLLM's object (engine/structured.py), None: free text
    tools: list | None = None               # OpenAI's tools, for the chat template


def ensemble_inputs(req: EnsembleRequest) -> list[grpcclient.InferInput]:
    """The request's tensors, always streamed (see the module docstring)."""
    return build_inputs(grpcclient, req.text_input, req.images, max_tokens=req.max_tokens,
                        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stream=True,
                        videos=req.videos, video_fps=req.video_fps, structured_outputs=req.structured_outputs,
                        tools=req.tools)


class Ensemble:
    """The Triton server at `url` (gRPC HOST:PORT), its ensemble model and the language model
    the ensemble runs (for cancel requests). Create it inside the event loop that uses it
    (gRPC's aio channel belongs to one loop)."""

    def __init__(self, url: str, model: str = "ensemble", language_model: str = LANGUAGE_MODEL,
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

    def generate(self, req: EnsembleRequest, request_id: str = "", image_params: list[str] = (),
                 video_params: list[str] = ()) -> Generation:
        return Generation(self, ensemble_inputs(req), request_id, list(image_params), generation_parameters(req.stop, req.raw_prompt),
                          list(video_params))

    def cancel(self, token: str, started: bool) -> None:
        """Cancel the generation named by `token` in the language model, in the background.
        `started`: a response of it had arrived (so a generation not found has finished)."""
        task = asyncio.get_running_loop().create_task(
            cancel_generation_async(self.client, token, started, self.language_model))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def close(self) -> None:
        for task in list(self._cancels):
            await asyncio.wait({task}, timeout=CANCEL_TIMEOUT_S)
        await self.client.close()


class Generation:
    """One request's responses (`async for chunk in generation`), until the one with a finish
    reason. Raises APIError for an error from Triton or the model. `close()` cancels the
    request if it has not finished (a client gone, an error)."""

    def __init__(self, ensemble: Ensemble, inputs: list, request_id: str, image_params: list[str],
                 parameters: dict[str, str] | None = None, video_params: list[str] = ()):
        self.ensemble, self.image_params, self.video_params = ensemble, image_params, list(video_params)
        self.finished, self.started = False, False
        self.token = new_token()
        self._done = asyncio.Event()  # keeps our side of the stream open until the last response

        async def requests():
            yield {"model_name": ensemble.model, "inputs": inputs, "request_id": request_id,
                   "parameters": {**token_parameters(self.token), **(parameters or {})}}
            await self._done.wait()

        self._call = ensemble.client.stream_infer(requests(), stream_timeout=ensemble.timeout_s)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
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
        chunk = chunk_of(result)
        if chunk.finish_reason:
            self.finished = True
            self._done.set()
        return chunk

    async def _error(self, message: str) -> APIError:
        """A marked error is the model's (its code says the status); an unmarked one is Triton's:
        503 when the ensemble is not ready (not loaded, shutting down), else 500."""
        marked = from_model(message, self.image_params, self.video_params)
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
