"""Streamed text from a growing list of token ids: tokenizers' own `DecodeStream`, which holds
a piece back while it ends in an incomplete UTF-8 sequence, so a character is never split
between responses, and decodes a sliding window so byte-level BPE merges come out right."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """`push(id)` -> the new text it completes ("" while a character is incomplete); `flush()`
    -> what is still held back at the end (an incomplete character decodes as U+FFFD, as
    `tokenizer.decode` would). The deltas add up to `tokenizer.decode(ids,
    skip_special_tokens=True)` (tested)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a transformers fast tokenizer; DecodeStream takes its backend
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.emitted = 0  # characters sent so far

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        piece = self.stream.step(self.tokenizer.backend_tokenizer, token_id) or ""
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        rest, self.emitted = text[self.emitted:], len(text)
        return rest
