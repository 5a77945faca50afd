"""Request and response bodies of the OpenAI chat completions API (pydantic v2), after
`openai-python`'s `completion_create_params.py` and `chat_completion_chunk.py`.

Fields fall in three groups (docs/openai.md's table):
- supported: messages, model, max_tokens / max_completion_tokens, temperature, top_p, seed,
  stop, stream, stream_options.include_usage, response_format (text, json_object, json_schema),
  tools / tool_choice / parallel_tool_calls (function tools), tool messages and assistant
  tool_calls, and the extensions top_k and structured_outputs (vLLM's; openai/structured.py);
- accepted and ignored: fields that cannot change the answer here (`user`, `metadata`,
  `store`, ...), `image_url.detail`, a message's `name`, and any field this API does not know;
- refused with a 400 naming the field: features this server cannot honour (`n` > 1,
  `logprobs`, `functions`, `logit_bias`, `audio`, ...). Silently ignoring them would return an
  answer the client did not ask for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from .errors import invalid, unsupported

MAX_STOP_SEQUENCES = 4
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1


class _Lenient(BaseModel):
    """Unknown fields are kept (and ignored), as OpenAI's newer fields keep coming; types are
    strict: a number given as a string is an error, not a guess."""

    model_config = ConfigDict(extra="allow", strict=True)


class ImageURL(_Lenient):
    url: str
    detail: str | None = None  # accepted and ignored: the processor's own resizing decides


class VideoURL(_Lenient):
    """A video part's file (not in OpenAI's API; vLLM's `video_url` part). `fps`, an extension:
    frames sampled per second of this video (the name vLLM and transformers give the rate,
    vLLM's request-wide `mm_processor_kwargs.fps`); default: the server's video_fps."""
    url: str
    fps: float | None = Field(None, gt=0, allow_inf_nan=False)


class ContentPart(_Lenient):
    """A content part; which types are served is decided in `messages` (so that an audio part
    gets a message that says so, not a schema mismatch)."""

    type: str
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None


class Message(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted and ignored
    tool_calls: list[Any] | None = None
    function_call: Any = None
    tool_call_id: str | None = None  # a tool message's: accepted (the template does not show it)


class StreamOptions(_Lenient):
    include_usage: bool | None = False


# Fields accepted and ignored (documented): none of them changes the answer of this server.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                  "prompt_cache_retention", "prompt_cache_options", "reasoning_effort",
                  "verbosity", "moderation")


class GenerationRequest(_Lenient):
    """The fields a chat completion and a text completion share: the model, sampling, stop
    strings and streaming."""

    model: str
    max_tokens: int | None = Field(None, ge=1)  # chat: deprecated by OpenAI for max_completion_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension (vLLM's): 0 or -1 = off
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def check_generation(self) -> None:
        """Raises the 400 for what the schema cannot say: the stop list, stream_options without
        stream."""
        stops = self.stop_list
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise invalid("stop: a stop sequence must not be empty", "stop")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options: only allowed when stream is true", "stream_options")

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None        # function tools (openai/structured.py)
    tool_choice: Any = None               # none, auto, required, {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # extension (vLLM's): json, regex, choice, grammar, ...
    # Refused unless left at their defaults (`refused_fields`).
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    logit_bias: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    prediction: Any = None
    web_search_options: Any = None
    # vLLM's extension: keyword arguments for the processor; only `fps` (the video sampling rate)
    mm_processor_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        """Raises the 400 for what the schema cannot say: the stop list, stream_options without
        stream, and the first field asking for a feature this server does not have."""
        self.check_generation()
        refusal = refused_field(self)
        if refusal is not None:
            raise refusal
        self.processor_fps  # noqa: B018 - checks mm_processor_kwargs

    @property
    def processor_fps(self) -> float | None:
        """mm_processor_kwargs.fps (vLLM's request-wide video sampling rate), or None. Raises the
        400 for another key or a rate that is not a positive number."""
        kwargs = self.mm_processor_kwargs or {}
        other = sorted(set(kwargs) - {"fps"})
        if other:
            raise unsupported(f"mm_processor_kwargs.{other[0]}",
                              f"mm_processor_kwargs.{other[0]}: only fps (the video sampling rate) is taken")
        fps = kwargs.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps < float("inf")):
            raise invalid(f"mm_processor_kwargs.fps: a positive number of frames per second, got {fps!r}",
                          "mm_processor_kwargs.fps")
        return None if fps is None else float(fps)

    @property
    def completion_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens, else None (the model's default)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def refused_field(req: ChatCompletionRequest):
    """The 400 for the first field asking for a feature this server does not have, or None."""
    checks = [
        ("n", req.n not in (None, 1), "only n=1 is supported (one choice per request)"),
        ("logprobs", bool(req.logprobs), "logprobs are not supported"),
        ("top_logprobs", req.top_logprobs is not None, "top_logprobs are not supported (no logprobs)"),
        ("functions", bool(req.functions), "functions (the legacy function calling) are not supported; use tools"),
        ("function_call", req.function_call not in (None, "none"),
         "function_call (the legacy function calling) is not supported; use tool_choice"),
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
        ("audio", req.audio is not None, "audio output is not supported"),
        ("modalities", req.modalities not in (None, ["text"]), "only the text modality is supported"),
        ("frequency_penalty", req.frequency_penalty not in (None, 0), "frequency_penalty is not supported"),
        ("presence_penalty", req.presence_penalty not in (None, 0), "presence_penalty is not supported"),
        ("prediction", req.prediction is not None, "prediction (predicted outputs) is not supported"),
        ("web_search_options", req.web_search_options is not None, "web search is not supported"),
    ]
    for field, refused, message in checks:
        if refused:
            return unsupported(field, f"{field}: {message}")
    return None


# ---- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict] | None = None  # {"id", "type": "function", "function": {"name", "arguments"}}

    @model_serializer(mode="wrap")
    def _without_no_tool_calls(self, handler):
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v is not None}


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None  # {"index", and "id", "type", "function": {"name", "arguments"}}

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen3vl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
