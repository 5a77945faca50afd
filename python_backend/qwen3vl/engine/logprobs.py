"""Logprobs of the generated tokens (OpenAI's `logprobs` / `top_logprobs`, vLLM's `logprobs`).

What they are taken from: the log-softmax of the model's raw logits, fp32, of the row the token
was sampled from, *before* temperature, top-k, top-p and any logits mask (a grammar's) are
applied: vLLM's default (`logprobs_mode="raw_logprobs"`). So a token's logprob does not depend
on how it was sampled, and a greedy token's is the model's own log-probability.

Only the rows that ask for them cost anything: one log_softmax over [rows asking, V] and one
top-k, taken before sampling (a mask applied in place later does not change them), read once
the tokens are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch


@dataclass
class TokenLogprobs:
    """Per generated token, in order: its logprob, and its request's top-k alternatives (ids and
    logprobs, most likely first; k may be 0). Natural log, fp32 computed."""
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def __add__(self, other: "TokenLogprobs") -> "TokenLogprobs":
        return TokenLogprobs(self.logprobs + other.logprobs, self.top_ids + other.top_ids,
                             self.top_logprobs + other.top_logprobs)

    def __len__(self) -> int:
        return len(self.logprobs)


class StepLogprobs:
    """The logprobs of one step's sampled rows, for the rows that ask.

    logits: [B, V] fp32, the raw rows the step samples from; wanted: per row, None (no
    logprobs) or k (top alternatives, 0..MAX_LOGPROBS). Build it before any mask is applied
    to `logits`; `of(tokens)` once the tokens are sampled."""

    def __init__(self, logits: torch.Tensor, wanted: list[int | None]):
        self.slot = {row: j for j, row in enumerate(r for r, k in enumerate(wanted) if k is not None)}
        self.wanted = wanted
        self.chosen_from: torch.Tensor | None = None
        if not self.slot:
            return
        rows = torch.tensor(list(self.slot), dtype=torch.int64, device=logits.device)
        self.chosen_from = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)  # [Br, V]
        k = max(wanted[r] for r in self.slot)
        values, ids = self.chosen_from.topk(k, dim=-1) if k else (self.chosen_from[:, :0], rows[:, None][:, :0])
        self.top_values, self.top_ids = values.tolist(), ids.tolist()

    def of(self, tokens: list[int]) -> list[TokenLogprobs | None]:
        """Per row, the logprobs of the token sampled from it (`tokens`, one per row), or None
        for a row that did not ask. One gather and one copy to the host for all rows."""
        out: list[TokenLogprobs | None] = [None] * len(tokens)
        if not self.slot:
            return out
        rows = list(self.slot)
        index = torch.tensor([tokens[r] for r in rows], dtype=torch.int64, device=self.chosen_from.device)
        chosen = self.chosen_from.gather(1, index[:, None])[:, 0].tolist()
        for j, row in enumerate(rows):
            k = self.wanted[row]
            out[row] = TokenLogprobs([chosen[j]], [self.top_ids[j][:k]], [self.top_values[j][:k]])
        return out


class TokenBytes:
    """A token id's bytes, as OpenAI's `bytes` field gives them: the byte-level BPE's own bytes
    (a token may hold part of a UTF-8 character), the text's UTF-8 for tokens outside the
    byte alphabet (added tokens)."""

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self.of = lru_cache(maxsize=1 << 16)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)
        return piece.encode("utf-8")
