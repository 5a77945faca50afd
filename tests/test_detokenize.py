"""Incremental detokenization: deltas add up to the full decode and never split a character."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qwen3vl.engine.detokenize import IncrementalDetokenizer

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


def test_random_id_sequences_stream_the_full_decode(tokenizer):
    """Any ids at all (special tokens, stray byte tokens, broken UTF-8): the deltas add up to
    tokenizer.decode of the whole sequence (an incomplete character left at the end comes out of
    flush() as U+FFFD, as decode gives it)."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tokenizer)
        deltas = [detok.push(i) for i in ids]
        deltas.append(detok.flush())
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
