"""`/v1/completions`: OpenAI's text completions, for text prompts, on the chat completion's
machinery (handlers.py: the same Answer, streaming, cancelling and metrics; only the request and
the bodies differ). The prompt is the whole prompt: the model tokenizes it as it is, with no chat
template (the request parameter `raw_prompt`), as vLLM's completions do. Bodies after
`openai-python`'s `completion_create_params.py` and `completion.py`.

Fields: `model`, `prompt` (a string, or a list of one string), `max_tokens` (default 16, OpenAI's
and vLLM's), `temperature`, `top_p`, `top_k` (extension), `seed`, `stop`, `stream`,
`stream_options.include_usage`; `user` accepted and ignored. Refused with a 400 naming the field:
`n` > 1, `best_of` > 1, `echo`, `logprobs`, `suffix`, `logit_bias`, non-zero penalties, a prompt of
token ids or of several prompts.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from .errors import invalid, unsupported
from .handlers import Answer, ChatHandler, Prepared, sampling_fields
from .schemas import GenerationRequest, Usage
from .triton import EnsembleRequest

COMPLETIONS_PATH = "/v1/completions"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for text completions, and vLLM's


class CompletionRequest(GenerationRequest):
    prompt: str | list[Any]
    # Refused unless left at their defaults (`refused`).
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def check(self) -> None:
        """Raises the 400 for the stop list, stream_options without stream, a prompt that is not
        one text, and the first field asking for what this server does not do."""
        self.check_generation()
        self.prompt_text  # noqa: B018 - checks the prompt
        checks = [
            ("n", self.n not in (None, 1), "only n=1 is supported (one choice per request)"),
            ("best_of", self.best_of not in (None, 1), "best_of is not supported (one choice per request)"),
            ("echo", bool(self.echo), "echo is not supported (the answer holds the completion only)"),
            ("logprobs", self.logprobs is not None, "logprobs are not supported"),
            ("suffix", bool(self.suffix), "suffix (insertion) is not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0), "frequency_penalty is not supported"),
            ("presence_penalty", self.presence_penalty not in (None, 0), "presence_penalty is not supported"),
        ]
        for name, refused, message in checks:
            if refused:
                raise unsupported(name, f"{name}: {message}")

    @property
    def prompt_text(self) -> str:
        """The one text prompt. Raises the 400 for token ids, several prompts, or text that is
        not Unicode (an unpaired surrogate)."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise unsupported("prompt", f"prompt: one prompt per request (a string, or a list of one string), "
                                            f"got a list of {len(prompt)}")
            prompt = prompt[0]
            if not isinstance(prompt, str):
                raise unsupported("prompt", "prompt: token ids are not supported; send the prompt as text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise invalid(f"prompt: not valid Unicode text: an unpaired surrogate ({prompt[e.start]!r}) at "
                          f"character {e.start}", "prompt") from None
        return prompt


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    """A whole answer, and each streamed event: OpenAI streams text completions as objects of
    this same shape."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None


class CompletionShape:
    """A text completion's bodies (handlers.ChatShape's counterpart): `text_completion`, and the
    events: text deltas, then the finish reason, then the usage (no role event)."""

    def __init__(self, prepared: Prepared, model: str):
        self.head = {"id": prepared.id, "created": prepared.created, "model": model}

    def whole(self, text: str, answer: Answer) -> Completion:
        return Completion(**self.head, choices=[CompletionChoice(text=text, finish_reason=answer.finish_reason)],
                          usage=answer.usage)

    def opening(self) -> None:
        return None

    def delta(self, text: str) -> Completion:
        return Completion(**self.head, choices=[CompletionChoice(text=text)])

    def finish(self, finish_reason: str) -> Completion:
        return Completion(**self.head, choices=[CompletionChoice(text="", finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> Completion:
        return Completion(**self.head, usage=usage)


async def prepare_completion(chat: ChatHandler, req: CompletionRequest) -> Prepared:
    """The request for the ensemble: the prompt as the whole prompt (`raw_prompt`), the chat's
    sampling fields. Raises APIError: 400 for the request's faults, 404 for another model's name."""
    req.check()
    chat.check_model(req.model)
    ensemble_request = EnsembleRequest(
        text_input=req.prompt_text, images=[], raw_prompt=True,
        max_tokens=req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS, **sampling_fields(req))
    return Prepared(f"cmpl-{uuid.uuid4().hex}", int(time.time()), req, ensemble_request, [], shape=CompletionShape)
