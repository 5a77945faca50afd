"""Incremental detokenization: deltas add up to the full decode and never split a character."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qwen3vl.engine import IncrementalDetokenizer

TEXTS = [
    "plain ascii words, with punctuation!",
    "naïve café — déjà vu",
    "中文字符和日本語のテキスト",
    "emoji 🙂🚀 and a flag 🇫🇷 mid-sentence",
]


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_decoded_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)  # no half character ever went out


def test_multibyte_characters_span_several_tokens(tokenizer):
    """The byte-level vocabulary (trained on English) splits these characters across tokens:
    the case the hold-back exists for."""
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🙂"
