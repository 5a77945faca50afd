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
from dataclasses import dataclass

from ..client.responses import Chunk
from .errors import APIError, invalid, unavailable
from .images import ImageLoader
from .messages import to_chat
from .metrics import Metrics
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ResponseMessage,
    Usage,
)
from .stop import StopStrings
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
    tool_calls: bool = False  # the answer is parsed for tool calls (tools given, tool_choice not none)


class Answer:
    """One request's answer as it arrives: text deltas with stop strings applied, then
    `finish_reason` and the token counts. Leaving it unfinished cancels the Triton request."""

    def __init__(self, generation: Generation, stops: list[str], metrics: Metrics):
        self.generation, self.stops, self.metrics = generation, StopStrings(stops), metrics
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
                text, stopped = self.stops.feed(piece.text)
                if stopped or piece.finish_reason:
                    if piece.finish_reason == "cancelled" and not stopped:
                        raise unavailable("the model cancelled the request (is the server shutting down?)")
                    if stopped:
                        reason = "stop_string"
                    self.finish_reason = "stop" if stopped else piece.finish_reason
                    text += "" if stopped else self.stops.flush()
                    if text:
                        yield text
                    return
                if text:
                    yield text
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
        tools = parse_tools(req.tools)
        constraint = self._constraint(req, tools)
        images = await self.images.load_all(chat.images)
        ensemble_request = EnsembleRequest(
            text_input=chat.text_input(), images=images,
            max_tokens=req.completion_limit or self.default_max_tokens,
            temperature=req.temperature, top_p=req.top_p,
            top_k=0 if req.top_k == -1 else req.top_k, seed=req.seed,
            structured_outputs=constraint, tools=req.tools or None)
        return Prepared(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req, ensemble_request,
                        [ref.param for ref in chat.images], tool_calls=bool(tools) and req.tool_choice != "none")

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
        generation = self.ensemble.generate(prepared.ensemble_request, prepared.id, prepared.image_params)
        answer = Answer(generation, prepared.request.stop_list, self.metrics)
        await answer.start()
        return answer

    async def complete(self, prepared: Prepared) -> ChatCompletion:
        answer = await self.start(prepared)
        text = "".join([delta async for delta in answer.deltas()])
        self._count(answer)
        message, reason = ResponseMessage(content=text), answer.finish_reason
        if prepared.tool_calls:
            content, calls = parse_tool_calls(text)
            if calls:
                message = ResponseMessage(content=content, tool_calls=[c.as_openai() for c in calls])
                reason = "tool_calls" if reason == "stop" else reason
        return ChatCompletion(id=prepared.id, created=prepared.created, model=self.model_name, usage=answer.usage,
                              choices=[Choice(message=message, finish_reason=reason)])

    async def events(self, prepared: Prepared, answer: Answer, arrival: float) -> AsyncIterator[str]:
        """The server-sent events of a started answer; records the request's status when done."""
        def chunk(delta: Delta, finish_reason=None) -> str:
            return _sse(ChatCompletionChunk(id=prepared.id, created=prepared.created, model=self.model_name,
                                            choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)])
                        .model_dump_json())

        status, first = 499, True  # 499: the client closed the connection first
        parser = ToolCallParser() if prepared.tool_calls else None
        try:
            yield chunk(Delta(role="assistant", content=""))
            async for text in answer.deltas():
                for delta in (_tool_deltas(parser.feed(text), parser) if parser else [Delta(content=text)]):
                    yield chunk(delta)
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - arrival)
                    first = False
            reason = answer.finish_reason
            if parser is not None:
                for delta in _tool_deltas(parser.finish(), parser):
                    yield chunk(delta)
                reason = "tool_calls" if parser.calls and reason == "stop" else reason
            yield chunk(Delta(), reason)
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


def _tool_deltas(events: list[tuple], parser: ToolCallParser) -> list[Delta]:
    """A parser's events as deltas: content as it is; a tool call as OpenAI streams one, its
    id, type and name first (arguments ""), then its arguments."""
    out, index = [], parser.calls - sum(1 for kind, _ in events if kind == "tool_call")
    for kind, value in events:
        if kind == "content":
            out.append(Delta(content=value))
            continue
        out.append(Delta(tool_calls=[{"index": index, "id": value.id, "type": "function",
                                      "function": {"name": value.name, "arguments": ""}}]))
        out.append(Delta(tool_calls=[{"index": index, "function": {"arguments": value.arguments}}]))
        index += 1
    return out


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


def _sse_error(error: APIError) -> str:
    return _sse(json.dumps(error.body()))
