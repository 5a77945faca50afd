"""The ensemble's responses as the clients see them: `Chunk` (one response: new text, its token
ids, the finish reason on the last), parsed from a tritonclient InferResult or from the JSON of
Triton's HTTP generate endpoint; `ServerError`, an error answer; `NoServer`, no answer at all."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import contract


@dataclass
class Logprobs:
    """The logprobs of a chunk's tokens (contract.py), per token: its logprob and bytes, and its
    top alternatives' ids, logprobs and bytes, most likely first. Natural log, from the raw
    logits (before temperature and masks)."""
    logprobs: list[float]
    tokens: list[bytes]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    top_tokens: list[list[bytes]]


@dataclass
class Chunk:
    """One response of a generation: new text, its token ids, the finish reason on the last
    (of its choice, `index`, when the request asked for n choices)."""
    text: str
    token_ids: list[int]
    finish_reason: str
    num_input_tokens: int = 0  # the prompt's tokens (visual tokens included)
    index: int = 0             # the choice it belongs to
    logprobs: Logprobs | None = None  # when the request asked for them


class ServerError(RuntimeError):
    """The server answered the request with an error; `code` is the Triton status code where
    the server marked it (INVALID_ARG, NOT_FOUND, UNAVAILABLE, ...), else None."""

    def __init__(self, message: str, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        self.code, self.http_status = code, http_status


class NoServer(ConnectionError):
    """Nothing answers at the address: no server runs there (or not on that port)."""

    PORT_FLAGS = {"gRPC": "--grpc-port", "HTTP": "--http-port"}

    def __init__(self, url: str, protocol: str, detail: str):
        super().__init__(f"no server answers at {url} over {protocol} ({detail}): is a server running there, "
                         f"and is {url.rpartition(':')[2]} its {protocol} port (qwen3vl-serve {self.PORT_FLAGS[protocol]})?")


# How grpc words a connection that could not be made (tritonclient passes its text on).
_NO_CONNECTION = re.compile(r"failed to connect to all addresses|DNS resolution failed|errors resolving")


def no_server(error: BaseException) -> str | None:
    """What a gRPC error says went wrong, when it is a connection that could not be made."""
    text = str(error)
    if not _NO_CONNECTION.search(text):
        return None
    return text.rsplit(": ", 1)[-1].strip().rstrip(".]") or "no connection"


def chunk_of(result) -> Chunk:
    """A tritonclient InferResult of the ensemble (or `qwen3_language`) as a Chunk; an output
    that is missing or empty reads as nothing (no text, no ids, no finish reason yet)."""
    def first(name):
        array = result.as_numpy(name)
        return None if array is None or array.size == 0 else array.reshape(-1)[0]

    ids = result.as_numpy(contract.OUTPUT_IDS)
    text, reason, prompt = first(contract.TEXT_OUTPUT), first(contract.FINISH_REASON), first(contract.NUM_INPUT_TOKENS)
    index = first(contract.INDEX)
    return Chunk(text.decode("utf-8") if text is not None else "",
                 ids.reshape(-1).tolist() if ids is not None else [],
                 reason.decode() if reason is not None else "",
                 int(prompt) if prompt is not None else 0,
                 int(index) if index is not None else 0,
                 logprobs_of(result))


def logprobs_of(result) -> Logprobs | None:
    """A response's logprob outputs, or None when the request did not ask for them (their
    tokens' tensor is [0, 0]: one column per token and alternative when asked)."""
    tokens = result.as_numpy(contract.LOGPROB_TOKENS)
    if tokens is None or tokens.ndim != 2 or tokens.shape[1] == 0:
        return None
    n, k = tokens.shape[0], tokens.shape[1] - 1
    return Logprobs(result.as_numpy(contract.OUTPUT_LOGPROBS).reshape(n).tolist(), tokens[:, 0].tolist(),
                    result.as_numpy(contract.TOP_LOGPROB_IDS).reshape(n, k).tolist(),
                    result.as_numpy(contract.TOP_LOGPROBS).reshape(n, k).tolist(), tokens[:, 1:].tolist())


def chunk_of_json(out: dict) -> Chunk:
    """The JSON answer of Triton's generate endpoint as a Chunk (one id comes as a number)."""
    ids = out.get(contract.OUTPUT_IDS, [])
    return Chunk(out.get(contract.TEXT_OUTPUT, ""), [ids] if isinstance(ids, int) else list(ids),
                 out.get(contract.FINISH_REASON, ""), int(out.get(contract.NUM_INPUT_TOKENS, 0)),
                 int(out.get(contract.INDEX, 0)))
