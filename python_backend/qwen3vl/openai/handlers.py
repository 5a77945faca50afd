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

from ..client.responses import Chunk
from .errors import APIError, invalid, unavailable
from .images import ImageLoader
from .messages import VideoRef, to_chat
from .metrics import Metrics
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    GenerationRequest,
    ResponseMessage,
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


class Answer:
    """One request's answer as it arrives: text deltas (stop strings applied by the model, which
    ends the answer at the token completing one), then `finish_reason` and the token counts:
    the tokens the answer holds, the same streamed or not. Leaving it unfinished cancels the
    Triton request."""

    def __init__(self, generation: Generation, metrics: Metrics):
        self.generation, self.metrics = generation, metrics
        self.finish_reason: str | None = None
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

    async def deltas(self) -> AsyncIterator[str]:
        piece, reason = self._first, "error"
        try:
            while True:
                self.completion_tokens += len(piece.token_ids)
                self.prompt_tokens = piece.num_input_tokens or self.prompt_tokens
                if piece.finish_reason:
                    if piece.finish_reason == "cancelled":
                        raise unavailable("the model cancelled the request (is the server shutting down?)")
                    self.finish_reason = piece.finish_reason
                    if piece.text:
                        yield piece.text
                    return
                if piece.text:
                    yield piece.text
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
            videos=videos, video_fps=video_fps, structured_outputs=constraint, tools=req.tools or None)
        # with tools the answer is parsed for tool calls (unless tool_choice is none)
        shape = ToolCallShape if tools and req.tool_choice != "none" else None
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
        answer = Answer(generation, self.metrics)
        await answer.start()
        return answer

    def shape(self, prepared: Prepared):
        return (prepared.shape or ChatShape)(prepared, self.model_name)

    async def complete(self, prepared: Prepared):
        """The whole answer's body (a ChatCompletion, or what the request's shape makes)."""
        answer = await self.start(prepared)
        text = "".join([delta async for delta in answer.deltas()])
        self._count(answer)
        return self.shape(prepared).whole(text, answer)

    async def events(self, prepared: Prepared, answer: Answer, arrival: float) -> AsyncIterator[str]:
        """The server-sent events of a started answer; records the request's status when done."""
        shape = self.shape(prepared)
        status, first = 499, True  # 499: the client closed the connection first
        try:
            opening = shape.opening()
            if opening is not None:
                yield _sse(opening.model_dump_json())
            async for text in answer.deltas():
                for body in _bodies(shape.delta(text)):
                    yield _sse(body.model_dump_json())
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - arrival)
                    first = False
            for body in _bodies(shape.finish(answer.finish_reason)):
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
    """A chat completion's bodies: `chat.completion`, and the `chat.completion.chunk` events (the
    role first, content deltas, the finish reason, the usage)."""

    def __init__(self, prepared: Prepared, model: str):
        self.head = {"id": prepared.id, "created": prepared.created, "model": model}

    def whole(self, text: str, answer: Answer) -> ChatCompletion:
        return ChatCompletion(**self.head, usage=answer.usage,
                              choices=[Choice(message=ResponseMessage(content=text), finish_reason=answer.finish_reason)])

    def chunk(self, delta: Delta, finish_reason=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head, choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)])

    def opening(self) -> ChatCompletionChunk:
        return self.chunk(Delta(role="assistant", content=""))

    def delta(self, text: str) -> ChatCompletionChunk:
        return self.chunk(Delta(content=text))

    def finish(self, finish_reason: str) -> ChatCompletionChunk:
        return self.chunk(Delta(), finish_reason)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head, choices=[], usage=usage)


def sampling_fields(req: GenerationRequest) -> dict:
    """The EnsembleRequest fields of a request's sampling and stop strings (chat and text
    completions alike)."""
    return {"temperature": req.temperature, "top_p": req.top_p, "top_k": 0 if req.top_k == -1 else req.top_k,
            "seed": req.seed, "stop": req.stop_list}


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

    def whole(self, text: str, answer: Answer) -> ChatCompletion:
        content, calls = parse_tool_calls(text)
        if not calls:
            return super().whole(text, answer)
        reason = "tool_calls" if answer.finish_reason == "stop" else answer.finish_reason
        message = ResponseMessage(content=content, tool_calls=[c.as_openai() for c in calls])
        return ChatCompletion(**self.head, usage=answer.usage, choices=[Choice(message=message, finish_reason=reason)])

    def delta(self, text: str) -> list[ChatCompletionChunk]:
        return self._chunks(self.parser.feed(text))

    def finish(self, finish_reason: str) -> list[ChatCompletionChunk]:
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
