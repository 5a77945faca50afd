"""The FastAPI application: routes (chat completions, text completions, models, health,
metrics), the error shape of every failure, the lifespan of the gRPC client. `create_app(ServiceConfig(...))`; `qwen3vl-openai` runs it under uvicorn."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from . import DEFAULT_MODEL_NAME
from .errors import APIError, invalid, unavailable
from .completions import COMPLETIONS_PATH, CompletionRequest, prepare_completion
from .handlers import ChatHandler
from .images import ImageLoader, ImagePolicy
from .metrics import Metrics
from .schemas import IGNORED_FIELDS, ChatCompletionRequest, GenerationRequest, ModelCard, ModelList
from .triton import Ensemble

log = logging.getLogger("qwen3vl.openai")

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class ServiceConfig:
    triton_url: str                      # Triton's gRPC HOST:PORT
    model_name: str = DEFAULT_MODEL_NAME  # the name clients use in `model`
    triton_model: str = "ensemble"
    triton_language_model: str = "qwen3_language"  # where a cancel request goes (contract.CANCEL)
    request_timeout_s: float = 600.0     # the whole request, first token to last: 504 past it
    default_max_tokens: int | None = None  # None: the model's default
    images: ImagePolicy = field(default_factory=ImagePolicy)


def create_app(config: ServiceConfig) -> FastAPI:
    metrics = Metrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # gRPC's aio channel belongs to the running loop: made here, not at import.
        ensemble = Ensemble(config.triton_url, config.triton_model, config.triton_language_model,
                            config.request_timeout_s)
        images = ImageLoader(config.images)
        app.state.chat = ChatHandler(ensemble, images, metrics, config.model_name, config.default_max_tokens)
        try:
            yield
        finally:
            await images.aclose()
            await ensemble.close()

    app = FastAPI(title="Qwen3-VL-MoE on Triton: OpenAI-compatible API", lifespan=lifespan)
    app.state.metrics = metrics

    @app.post(CHAT_PATH, response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        chat: ChatHandler = request.app.state.chat
        return await respond(request, req, lambda: chat.prepare(req))

    @app.post(COMPLETIONS_PATH, response_model=None)
    async def completions(req: CompletionRequest, request: Request):
        chat: ChatHandler = request.app.state.chat
        return await respond(request, req, lambda: prepare_completion(chat, req))

    async def respond(request: Request, req: GenerationRequest, prepare):
        """One chat or text completion, whole or streamed; `prepare()` checks and maps the
        request (or raises its APIError). Every answer is counted in the metrics."""
        arrival = time.perf_counter()
        chat: ChatHandler = request.app.state.chat
        unknown = sorted(set(req.model_extra or ()) - set(IGNORED_FIELDS))
        if unknown:
            log.info("ignoring fields this API does not know: %s", ", ".join(unknown))
        stream, streaming = bool(req.stream), False
        metrics.in_flight.inc()
        try:
            prepared = await prepare()
            if not stream:
                result = await _until_disconnect(request, chat.complete(prepared))
                metrics.answered(200 if result is not None else 499, False)
                metrics.latency.labels("false").observe(time.perf_counter() - arrival)
                return JSONResponse(result.model_dump(mode="json")) if result is not None else Response(status_code=499)
            answer = await _until_disconnect(request, chat.start(prepared))
            if answer is None:
                metrics.answered(499, True)
                return Response(status_code=499)
            streaming = True  # after_stream ends it, in_flight included
            return StreamingResponse(chat.events(prepared, answer, arrival), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(chat.after_stream, answer, arrival))
        except APIError as e:
            metrics.answered(e.status, stream)
            return _error_response(e)
        except Exception:  # a bug: the 500 below, counted like every other answer
            metrics.answered(500, stream)
            raise
        finally:
            if not streaming:
                metrics.in_flight.dec()

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_name, created=created)])

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> ModelCard:
        if model != config.model_name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")
        return ModelCard(id=config.model_name, created=created)

    @app.get("/health")
    async def health(request: Request):
        """200 when Triton is up and its ensemble ready, else 503."""
        ensemble: Ensemble = request.app.state.chat.ensemble
        if await ensemble.ready():
            return {"status": "ok"}
        return _error_response(unavailable(f"{ensemble.name} is not ready"))

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        error = _from_validation(e)
        if request.url.path in (CHAT_PATH, COMPLETIONS_PATH):
            metrics.answered(error.status, False)
        return _error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(APIError(e.status_code, str(e.detail), code=code), headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    return app


def _error_response(error: APIError, headers=None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# pydantic's names for the members of a union in an error's location (`str`, `list[ContentPart]`)
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def _from_validation(e: RequestValidationError) -> APIError:
    """The most specific of pydantic's errors, as a 400 naming the field (`messages[0].content`)."""
    errors = e.errors()
    if not errors:
        return invalid("invalid request body")
    first = max(errors, key=lambda err: len(err.get("loc", ())))
    if first.get("type") == "json_invalid":
        return invalid(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    loc = [p for p in first.get("loc", ()) if p != "body" and not (isinstance(p, str) and _UNION_TAG.match(p))]
    param = ""
    for p in loc:
        param += f"[{p}]" if isinstance(p, int) else (f".{p}" if param else str(p))
    if first.get("type") == "missing":
        return invalid(f"{param}: required", param or None, code="missing_required_parameter")
    return invalid(f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param or None)


async def _until_disconnect(request: Request, work):
    """`await work`, unless the client disconnects first: then `work` is cancelled (and with it
    the Triton request) and the result is None. The body has been read, so the next ASGI message
    is the disconnect."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # its cleanup (cancelling the Triton request) runs to the end
    return None
