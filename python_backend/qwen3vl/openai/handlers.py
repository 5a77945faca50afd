"""One chat completion: the request checked and mapped, the images loaded, the ensemble asked;
the answer returned whole (`chat.completion`) or as server-sent events (`chat.completion.chunk`,
then `data: [DONE]`). Errors before the first response of the model are HTTP errors; an error
after a stream has begun is sent as a last event in OpenAI's error shape."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..client.responses import Chunk, Logprobs
from .errors import APIError, unavailable
from .images import ImageLoader
from .messages import to_chat
from .metrics import Metrics
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .stop import StopStrings
from .triton import Ensemble, EnsembleRequest, Generation

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    id: str
    created: int
    request: ChatCompletionRequest
    ensemble_request: EnsembleRequest
    image_params: list[str]


@dataclass
class Piece:
    """What one response of the model adds to a choice: text (stop strings applied), the
    logprobs of its tokens (when asked for), and on the choice's last its finish reason."""
    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class ChoiceState:
    stops: StopStrings
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


def token_logprobs(logprobs: Logprobs) -> list[TokenLogprob]:
    """The model's logprobs of a response in OpenAI's shape."""
    def entry(token: bytes, logprob: float) -> dict:
        return {"token": token.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(token)}

    return [TokenLogprob(**entry(token, logprob),
                         top_logprobs=[TopLogprob(**entry(t, lp)) for t, lp in zip(top_tokens, top_values)])
            for token, logprob, top_tokens, top_values in zip(logprobs.tokens, logprobs.logprobs,
                                                              logprobs.top_tokens, logprobs.top_logprobs)]


class Answer:
    """One request's answer as it arrives: its choices' pieces with stop strings applied, each
    choice's `finish_reason`, and the token counts. Leaving it unfinished cancels the Triton
    request."""

    def __init__(self, generation: Generation, stops: list[str], metrics: Metrics, choices: int = 1):
        self.generation, self.metrics = generation, metrics
        self.choices = [ChoiceState(StopStrings(stops)) for _ in range(choices)]
        self.prompt_tokens = self.completion_tokens = 0
        self.reported = False  # the streamed response recorded its status
        self._first: Chunk | None = None

    async def start(self) -> None:
        """Wait for the model's first response: until then, a failure is the request's status."""
        try:
            self._first = await self.generation.__anext__()
        except BaseException as e:
            if await self.generation.close() and not isinstance(e, Exception):  # the client went away
                self.metrics.cancelled.labels("client_disconnected").inc()
            raise

    async def pieces(self) -> AsyncIterator[Piece]:
        """Each choice's pieces as they arrive, ending with one that has its finish reason
        (nothing empty: a piece has text, logprobs or the end)."""
        piece, reason, left = self._first, "error", len(self.choices)
        try:
            while True:
                choice = self.choices[piece.index]
                self.prompt_tokens = piece.num_input_tokens or self.prompt_tokens
                if choice.finish_reason is None:  # a choice a stop string ended: the rest is dropped
                    self.completion_tokens += len(piece.token_ids)
                    text, stopped = choice.stops.feed(piece.text)
                    logprobs = token_logprobs(piece.logprobs) if piece.logprobs is not None else None
                    end = None
                    if stopped or piece.finish_reason:
                        if piece.finish_reason == "cancelled" and not stopped:
                            raise unavailable("the model cancelled the request (is the server shutting down?)")
                        if stopped:
                            reason = "stop_string"
                        end = choice.finish_reason = "stop" if stopped else piece.finish_reason
                        text += "" if stopped else choice.stops.flush()
                        left -= 1
                    if text or logprobs or end:
                        yield Piece(piece.index, text, logprobs, end)
                    if not left:
                        return
                piece = await self.generation.__anext__()
        except BaseException as e:  # the client went away (cancelled), or an error
            if not isinstance(e, Exception):
                reason = "client_disconnected"
            raise
        finally:
            if await self.generation.close():
                self.metrics.cancelled.labels(reason).inc()

    @property
    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens)


class ChatHandler:
    def __init__(self, ensemble: Ensemble, images: ImageLoader, metrics: Metrics, model_name: str,
                 default_max_tokens: int | None = None):
        self.ensemble, self.images, self.metrics = ensemble, images, metrics
        self.model_name, self.default_max_tokens = model_name, default_max_tokens

    async def prepare(self, req: ChatCompletionRequest) -> Prepared:
        """Raises APIError: 400 for the request's faults, 404 for another model's name."""
        req.check()
        if req.model != self.model_name:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        chat = to_chat(req.messages)
        images = await self.images.load_all(chat.images)
        ensemble_request = EnsembleRequest(
            text_input=chat.text_input(), images=images,
            max_tokens=req.completion_limit or self.default_max_tokens,
            temperature=req.temperature, top_p=req.top_p,
            top_k=0 if req.top_k == -1 else req.top_k, seed=req.seed, logprobs=req.logprobs_wanted, n=req.n)
        return Prepared(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req, ensemble_request,
                        [ref.param for ref in chat.images])

    async def start(self, prepared: Prepared) -> Answer:
        generation = self.ensemble.generate(prepared.ensemble_request, prepared.id, prepared.image_params)
        answer = Answer(generation, prepared.request.stop_list, self.metrics, prepared.request.n or 1)
        await answer.start()
        return answer

    async def complete(self, prepared: Prepared) -> ChatCompletion:
        answer = await self.start(prepared)
        logprobs = prepared.request.logprobs
        async for piece in answer.pieces():
            choice = answer.choices[piece.index]
            choice.text.append(piece.text)
            choice.logprobs.extend(piece.logprobs or [])
        self._count(answer)
        return ChatCompletion(id=prepared.id, created=prepared.created, model=self.model_name, usage=answer.usage,
                              choices=[Choice(index=i, message=ResponseMessage(content="".join(c.text)),
                                              finish_reason=c.finish_reason,
                                              logprobs=ChoiceLogprobs(content=c.logprobs) if logprobs else None)
                                       for i, c in enumerate(answer.choices)])

    async def events(self, prepared: Prepared, answer: Answer, arrival: float) -> AsyncIterator[str]:
        """The server-sent events of a started answer; records the request's status when done."""
        def chunk(delta: Delta, finish_reason=None, index: int = 0, logprobs=None) -> str:
            choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                 logprobs=None if logprobs is None else ChoiceLogprobs(content=logprobs))
            return _sse(ChatCompletionChunk(id=prepared.id, created=prepared.created, model=self.model_name,
                                            choices=[choice]).model_dump_json())

        status, first = 499, True  # 499: the client closed the connection first
        try:
            for index in range(len(answer.choices)):
                yield chunk(Delta(role="assistant", content=""), index=index)
            async for piece in answer.pieces():
                if piece.text or piece.logprobs:
                    yield chunk(Delta(content=piece.text), index=piece.index, logprobs=piece.logprobs)
                    if first and piece.text:
                        self.metrics.ttft.observe(time.perf_counter() - arrival)
                        first = False
                if piece.finish_reason:
                    yield chunk(Delta(), piece.finish_reason, piece.index)
            if prepared.request.include_usage:
                yield _sse(ChatCompletionChunk(id=prepared.id, created=prepared.created, model=self.model_name,
                                               choices=[], usage=answer.usage).model_dump_json())
            self._count(answer)
            status = 200
        except APIError as e:
            log.warning("%s failed mid-stream: %s", prepared.id, e.message)
            status = e.status
            yield _sse_error(e)
        finally:
            answer.reported = True
            self.metrics.answered(status, True)
            self.metrics.latency.labels("true").observe(time.perf_counter() - arrival)
        yield "data: [DONE]\n\n"

    async def after_stream(self, answer: Answer, arrival: float) -> None:
        """Once a streamed response is over, however it ended: also when the client went away
        before its first event, so that the events never ran and could not cancel."""
        self.metrics.in_flight.dec()
        if await answer.generation.close():
            self.metrics.cancelled.labels("client_disconnected").inc()
        if not answer.reported:
            self.metrics.answered(499, True)
            self.metrics.latency.labels("true").observe(time.perf_counter() - arrival)

    def _count(self, answer: Answer) -> None:
        self.metrics.prompt_tokens.inc(answer.prompt_tokens)
        self.metrics.completion_tokens.inc(answer.completion_tokens)


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


def _sse_error(error: APIError) -> str:
    return _sse(json.dumps(error.body()))
