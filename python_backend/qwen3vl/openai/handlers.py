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
from .errors import APIError, invalid, unavailable
from .images import ImageLoader
from .messages import VideoRef, to_chat
from .metrics import Metrics
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    GenerationRequest,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .structured import (
    ToolCallParser,
    forced_tools,
    parse_tool_calls,
    parse_tools,
    response_format_constraint,
    tool_call_grammar,
)
from .triton import Ensemble, EnsembleRequest, Generation

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    id: str
    created: int
    request: ChatCompletionRequest
    ensemble_request: EnsembleRequest
    image_params: list[str]
    video_params: list[str] = field(default_factory=list)
    shape: type | None = None  # the response bodies' maker (ChatShape, ToolCallShape; completions.CompletionShape)


@dataclass
class Piece:
    """What one response of the model adds to a choice: text, the logprobs of its tokens (when
    asked for), and on the choice's last its finish reason."""
    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class ChoiceState:
    """One choice of an answer: its finish reason once ended; its text and logprobs as a whole
    answer collects them."""
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
    """One request's answer as it arrives: each choice's pieces (stop strings applied by the
    model, which ends a choice at the token completing one), each choice's `finish_reason`,
    and the token counts: the tokens the answer holds (every choice's), the same streamed or
    not. Leaving it unfinished cancels the Triton request."""

    def __init__(self, generation: Generation, metrics: Metrics, choices: int = 1):
        self.generation, self.metrics = generation, metrics
        self.choices = [ChoiceState() for _ in range(choices)]
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

    @property
    def finish_reason(self) -> str | None:
        """Choice 0's (the only one unless n > 1)."""
        return self.choices[0].finish_reason

    async def pieces(self) -> AsyncIterator[Piece]:
        """Each choice's pieces as they arrive, its last with its finish reason (no piece is
        empty: it has text, logprobs or the end)."""
        piece, reason, left = self._first, "error", len(self.choices)
        try:
            while True:
                self.completion_tokens += len(piece.token_ids)
                self.prompt_tokens = piece.num_input_tokens or self.prompt_tokens
                logprobs = token_logprobs(piece.logprobs) if piece.logprobs is not None else None
                if piece.finish_reason:
                    if piece.finish_reason == "cancelled":
                        raise unavailable("the model cancelled the request (is the server shutting down?)")
                    self.choices[piece.index].finish_reason = piece.finish_reason
                    left -= 1
                if piece.text or logprobs or piece.finish_reason:
                    yield Piece(piece.index, piece.text, logprobs, piece.finish_reason or None)
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

    def check_model(self, model: str) -> None:
        """Raises the 404 for a model name this service does not serve."""
        if model != self.model_name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def prepare(self, req: ChatCompletionRequest) -> Prepared:
        """Raises APIError: 400 for the request's faults, 404 for another model's name."""
        req.check()
        self.check_model(req.model)
        chat = to_chat(req.messages)
        video_fps = sampling_rate(chat.videos, req.processor_fps)
        tools = parse_tools(req.tools)
        constraint = self._constraint(req, tools)
        images = await self.images.load_all(chat.images)
        videos = await self.images.load_all(chat.videos, "video")
        ensemble_request = EnsembleRequest(
            text_input=chat.text_input(), images=images,
            max_tokens=req.completion_limit or self.default_max_tokens, **sampling_fields(req),
            videos=videos, video_fps=video_fps, structured_outputs=constraint, tools=req.tools or None,
            **choice_fields(req))
        # with tools the answer is parsed for tool calls (unless tool_choice is none)
        shape = ToolCallShape if tools and req.tool_choice != "none" else None
        if (req.n or 1) > 1 and shape is not None:
            raise invalid("n: more than one choice cannot be combined with tools (a tool-call parser per "
                          "choice is not built); response_format and structured_outputs can", "n")
        if req.logprobs and shape is not None:
            raise invalid("logprobs: not available with tools (tool calls are parsed out of the text)", "logprobs")
        return Prepared(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req, ensemble_request,
                        [ref.param for ref in chat.images], [ref.param for ref in chat.videos], shape=shape)

    @staticmethod
    def _constraint(req: ChatCompletionRequest, tools) -> dict | None:
        """The grammar the answer must follow (structured_outputs), from tool_choice required or
        named, response_format, or the structured_outputs extension: one of them at most."""
        given = []
        forced = forced_tools(tools, req.tool_choice)
        if forced is not None:
            parallel = req.tool_choice == "required" and req.parallel_tool_calls is not False
            given.append(("tool_choice", {"structural_tag": tool_call_grammar(forced, parallel)}))
        fmt = response_format_constraint(req.response_format)
        if fmt is not None:
            given.append(("response_format", fmt))
        if req.structured_outputs is not None:
            given.append(("structured_outputs", req.structured_outputs))
        if len(given) > 1:
            names = " and ".join(name for name, _ in given)
            raise invalid(f"{names}: each constrains the whole answer; give one of them", given[1][0])
        return given[0][1] if given else None

    async def start(self, prepared: Prepared) -> Answer:
        generation = self.ensemble.generate(prepared.ensemble_request, prepared.id, prepared.image_params,
                                            prepared.video_params)
        answer = Answer(generation, self.metrics, prepared.request.n or 1)
        await answer.start()
        return answer

    def shape(self, prepared: Prepared):
        return (prepared.shape or ChatShape)(prepared, self.model_name)

    async def complete(self, prepared: Prepared):
        """The whole answer's body (a ChatCompletion, or what the request's shape makes)."""
        answer = await self.start(prepared)
        async for piece in answer.pieces():
            choice = answer.choices[piece.index]
            choice.text.append(piece.text)
            choice.logprobs.extend(piece.logprobs or [])
        self._count(answer)
        return self.shape(prepared).whole(answer)

    async def events(self, prepared: Prepared, answer: Answer, arrival: float) -> AsyncIterator[str]:
        """The server-sent events of a started answer; records the request's status when done."""
        shape = self.shape(prepared)
        status, first = 499, True  # 499: the client closed the connection first
        try:
            for index in range(len(answer.choices)):
                opening = shape.opening(index)
                if opening is not None:
                    yield _sse(opening.model_dump_json())
            async for piece in answer.pieces():
                if piece.text or piece.logprobs:
                    for body in _bodies(shape.delta(piece.text, piece.index, piece.logprobs)):
                        yield _sse(body.model_dump_json())
                    if first and piece.text:
                        self.metrics.ttft.observe(time.perf_counter() - arrival)
                        first = False
                if piece.finish_reason:
                    for body in _bodies(shape.finish(piece.finish_reason, piece.index)):
                        yield _sse(body.model_dump_json())
            if prepared.request.include_usage:
                yield _sse(shape.usage(answer.usage).model_dump_json())
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


class ChatShape:
    """A chat completion's bodies: `chat.completion`, and the `chat.completion.chunk` events (per
    choice: the role first, content deltas with their logprobs, the finish reason; then the
    usage)."""

    def __init__(self, prepared: Prepared, model: str):
        self.head = {"id": prepared.id, "created": prepared.created, "model": model}
        self.logprobs = bool(prepared.request.logprobs)

    def whole(self, answer: Answer) -> ChatCompletion:
        return ChatCompletion(**self.head, usage=answer.usage, choices=[
            Choice(index=i, message=ResponseMessage(content="".join(c.text)), finish_reason=c.finish_reason,
                   logprobs=ChoiceLogprobs(content=c.logprobs) if self.logprobs else None)
            for i, c in enumerate(answer.choices)])

    def chunk(self, delta: Delta, finish_reason=None, index: int = 0, logprobs=None) -> ChatCompletionChunk:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                             logprobs=None if logprobs is None else ChoiceLogprobs(content=logprobs))
        return ChatCompletionChunk(**self.head, choices=[choice])

    def opening(self, index: int = 0) -> ChatCompletionChunk:
        return self.chunk(Delta(role="assistant", content=""), index=index)

    def delta(self, text: str, index: int = 0, logprobs: list[TokenLogprob] | None = None) -> ChatCompletionChunk:
        return self.chunk(Delta(content=text), index=index, logprobs=logprobs)

    def finish(self, finish_reason: str, index: int = 0) -> ChatCompletionChunk:
        return self.chunk(Delta(), finish_reason, index)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head, choices=[], usage=usage)


def sampling_fields(req: GenerationRequest) -> dict:
    """The EnsembleRequest fields of a request's sampling and stop strings (chat and text
    completions alike)."""
    return {"temperature": req.temperature, "top_p": req.top_p, "top_k": 0 if req.top_k == -1 else req.top_k,
            "seed": req.seed, "stop": req.stop_list}


def choice_fields(req: ChatCompletionRequest) -> dict:
    """The EnsembleRequest fields of a chat request's choices and logprobs."""
    return {"logprobs": req.logprobs_wanted, "n": req.n}


def sampling_rate(videos: list[VideoRef], request_fps: float | None) -> float | None:
    """The one video sampling rate of a request (the ensemble's video_fps is per request): the
    parts' `fps` and `mm_processor_kwargs.fps` must agree. None: the server's. Raises APIError
    (400) naming the part that disagrees."""
    rate, source = request_fps, "mm_processor_kwargs.fps"
    for ref in videos:
        if ref.fps is None:
            continue
        param = ref.param.removesuffix(".url") + ".fps"
        if rate is not None and ref.fps != rate:
            raise invalid(f"{param}: {ref.fps:g} frames per second, but {source} is {rate:g}: the videos of one "
                          "request are sampled at one rate", param)
        rate, source = ref.fps, param
    return rate


class ToolCallShape(ChatShape):
    """A chat completion with tools (tool_choice not none): the answer's Qwen3 (hermes)
    `<tool_call>` blocks become `tool_calls` and `finish_reason` `tool_calls`; streamed, each call
    goes out once its block is complete, as OpenAI streams one: its index, id, type and name
    (arguments ""), then its arguments (openai/structured.py)."""

    def __init__(self, prepared: Prepared, model: str):
        super().__init__(prepared, model)
        self.parser = ToolCallParser()

    def whole(self, answer: Answer) -> ChatCompletion:
        content, calls = parse_tool_calls("".join(answer.choices[0].text))  # one choice, no logprobs (prepare)
        if not calls:
            return super().whole(answer)
        reason = "tool_calls" if answer.finish_reason == "stop" else answer.finish_reason
        message = ResponseMessage(content=content, tool_calls=[c.as_openai() for c in calls])
        return ChatCompletion(**self.head, usage=answer.usage, choices=[Choice(message=message, finish_reason=reason)])

    def delta(self, text: str, index: int = 0, logprobs=None) -> list[ChatCompletionChunk]:
        return self._chunks(self.parser.feed(text))

    def finish(self, finish_reason: str, index: int = 0) -> list[ChatCompletionChunk]:
        rest = self._chunks(self.parser.finish())
        reason = "tool_calls" if self.parser.calls and finish_reason == "stop" else finish_reason
        return [*rest, self.chunk(Delta(), reason)]

    def _chunks(self, events: list[tuple]) -> list[ChatCompletionChunk]:
        out, index = [], self.parser.calls - sum(1 for kind, _ in events if kind == "tool_call")
        for kind, value in events:
            if kind == "content":
                out.append(self.chunk(Delta(content=value)))
                continue
            out.append(self.chunk(Delta(tool_calls=[{"index": index, "id": value.id, "type": "function",
                                                     "function": {"name": value.name, "arguments": ""}}])))
            out.append(self.chunk(Delta(tool_calls=[{"index": index, "function": {"arguments": value.arguments}}])))
            index += 1
        return out


def _bodies(made) -> list:
    """A shape's delta or finish: one body, or (ToolCallShape) a list of them."""
    return made if isinstance(made, list) else [made]


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


def _sse_error(error: APIError) -> str:
    return _sse(json.dumps(error.body()))
