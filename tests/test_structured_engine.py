"""Structured output in the engine, in one process on the tiny random checkpoint (its free text is
nonsense, so only the grammar can make an answer valid): constrained answers match their schema,
regex or choice; constrained and unconstrained sequences in one batch leave the unconstrained
ones' greedy tokens bit-identical; a row whose mask allows nothing, a schema that does not
compile, fail only their own request; grammars are compiled once (cached) and off the engine
thread; the mask itself equals a slow reference."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from qwen3vl.engine.engine import Engine
from qwen3vl.engine.structured import StructuredOutputs
from qwen3vl.errors import InvalidInput
from qwen3vl.features import VisualFeatures
from qwen3vl.model.config import ModelConfig
from qwen3vl.settings import ServingConfig

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age", "tags"]}


@pytest.fixture(scope="module")
def engine(checkpoint):
    config = ModelConfig.load(checkpoint, device="cpu")
    return Engine.from_checkpoint(config, ServingConfig(kv_cache_mb=64))


def structured(**kind) -> StructuredOutputs:
    return StructuredOutputs.parse(json.dumps(kind))


def run(engine: Engine, requests: list[tuple[str, dict, StructuredOutputs | None]]) -> list:
    """Run requests together from the first step; each one's token ids, or its failure."""
    seqs = [engine.new_sequence(text, VisualFeatures.empty(engine.config), engine.params(**params), structured=so)
            for text, params, so in requests]
    for seq in seqs:
        engine.add(seq)
    got: list = [[] for _ in seqs]
    while engine.has_work():
        out = engine.step()
        for i, seq in enumerate(seqs):
            if seq.request_id in out.steps:
                got[i] += out.steps[seq.request_id].token_ids
            if seq.request_id in out.failures:
                got[i] = out.failures[seq.request_id]
    return got


def text_of(engine: Engine, ids: list[int]) -> str:
    return engine.tokenizer.decode([t for t in ids if t not in engine.stop_ids])


def test_constrained_answers_match_and_unconstrained_neighbours_keep_their_greedy_tokens(engine):
    free = [("Tell me a story", {"max_tokens": 24, "temperature": 0}),
            ("What is in the picture?", {"max_tokens": 16, "temperature": 0})]
    alone = [run(engine, [(t, p, None)])[0] for t, p in free]
    constrained = [("Give me a person", {"max_tokens": 80, "temperature": 0}, structured(json=SCHEMA)),
                   ("Pick", {"max_tokens": 10}, structured(choice=["yes", "no", "maybe not"])),
                   ("A date", {"max_tokens": 20}, structured(regex=r"20[0-9]{2}-(0[1-9]|1[0-2])")),
                   ("Sampled", {"max_tokens": 80, "temperature": 1.0, "seed": 3}, structured(json=SCHEMA))]
    got = run(engine, [(t, p, None) for t, p in free[:1]] + constrained + [(t, p, None) for t, p in free[1:]])
    assert got[0] == alone[0] and got[-1] == alone[1]  # bit-identical greedy tokens beside grammars
    for ids in got[1:-1]:
        assert isinstance(ids, list) and ids[-1] in engine.stop_ids, ids  # the grammar's end ended it
    jsonschema.validate(json.loads(text_of(engine, got[1])), SCHEMA)
    jsonschema.validate(json.loads(text_of(engine, got[4])), SCHEMA)
    assert text_of(engine, got[2]) in ("yes", "no", "maybe not")
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])", text_of(engine, got[3]))
    # without the grammar the same prompt is not JSON: the constraint made it so
    with pytest.raises(ValueError):
        json.loads(text_of(engine, run(engine, [("Give me a person", {"max_tokens": 80, "temperature": 0}, None)])[0]))


def test_a_row_whose_mask_allows_nothing_fails_only_its_request(engine, monkeypatch):
    free = run(engine, [("Tell me a story", {"max_tokens": 12, "temperature": 0}, None)])[0]
    import xgrammar as xgr

    fill = xgr.GrammarMatcher.fill_next_token_bitmask

    def nothing_for_regex_x(self, bitmask, index=0, **kw):  # this matcher's row allows no token
        out = fill(self, bitmask, index, **kw)
        if self is doomed[0]:
            bitmask[index] = 0
        return out

    doomed = []
    seq = engine.new_sequence("Doomed", VisualFeatures.empty(engine.config), engine.params(max_tokens=8),
                              structured=structured(regex="x+"))
    engine.add(seq)
    other = engine.new_sequence("Tell me a story", VisualFeatures.empty(engine.config),
                                engine.params(max_tokens=12, temperature=0))
    engine.add(other)
    while not seq.grammar.poll():
        pass
    doomed.append(seq.grammar.matcher)
    monkeypatch.setattr(xgr.GrammarMatcher, "fill_next_token_bitmask", nothing_for_regex_x)
    steps, failure = [], None
    while engine.has_work():
        out = engine.step()
        steps += out.steps.get(other.request_id, type("S", (), {"token_ids": []})).token_ids
        failure = out.failures.get(seq.request_id, failure)
        assert seq.request_id not in out.steps  # no token, and no NaN, for the failed row
    assert isinstance(failure, InvalidInput) and "allows no token" in str(failure)
    assert steps == free


def test_a_schema_that_does_not_compile_fails_its_request_alone(engine):
    bad = structured(json={"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}})
    got = run(engine, [("Tell me a story", {"max_tokens": 6, "temperature": 0}, None),
                       ("Bad", {"max_tokens": 6}, bad)])
    assert isinstance(got[1], InvalidInput) and "structured_outputs.json" in str(got[1]), got[1]
    assert got[0] == run(engine, [("Tell me a story", {"max_tokens": 6, "temperature": 0}, None)])[0]


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"), ("[]", "JSON object"), ("{}", "exactly one"),
    ('{"json": {}, "regex": "a"}', "exactly one"), ('{"choice": []}', "non-empty list"),
    ('{"jsn": {}}', "unknown field"), ('{"json": "{bad"}', "schema is not valid JSON"),
])
def test_a_malformed_structured_outputs_object_is_refused_at_once(text, message):
    with pytest.raises(InvalidInput, match=message):
        StructuredOutputs.parse(text)


def test_grammars_compile_off_the_engine_thread_once_per_text(engine, monkeypatch):
    compiled_on = []
    compile_ = type(engine.grammars)._compile

    def recording(self, spec):
        compiled_on.append(threading.current_thread().name)
        return compile_(self, spec)

    monkeypatch.setattr(type(engine.grammars), "_compile", recording)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    # the same schema, written with other whitespace, is the same grammar
    again = json.loads(json.dumps(schema, indent=4))
    got = run(engine, [("A", {"max_tokens": 12}, structured(json=schema)),
                       ("B", {"max_tokens": 12}, StructuredOutputs.parse(json.dumps({"json": again}, indent=2)))])
    assert [json.loads(text_of(engine, ids)) for ids in got] and len(compiled_on) == 1
    assert compiled_on[0].startswith("qwen3vl-grammar") and compiled_on[0] != threading.current_thread().name


def test_ignore_eos_cannot_be_combined_with_a_grammar(engine):
    with pytest.raises(InvalidInput, match="ignore_eos"):
        engine.new_sequence("A", VisualFeatures.empty(engine.config), engine.params(ignore_eos=True),
                            structured=structured(json_object=True))


def test_the_mask_equals_a_slow_reference(engine):
    """xgrammar's kernel on our logits: -inf exactly where the bitmask's bit is 0, the other
    values untouched, only on the rows given."""
    state = engine.grammars.submit(structured(json=SCHEMA))
    state.compiled.result()
    assert state.poll() and state.ready
    vocab = engine.config.text.vocab_size
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    with torch.inference_mode():  # as in a step
        assert engine.grammars.mask(logits, [None, state, None]) == {}
    bits = engine.grammars._bitmask[1]  # noqa: SLF001 - the row the step filled
    # the kernel applies what the row holds: the grammar's tokens that keep the bytes valid UTF-8
    allowed = torch.tensor([(int(bits[j // 32]) >> (j % 32)) & 1 for j in range(vocab)], dtype=torch.bool)
    assert allowed.any() and not allowed.all()
    assert torch.equal(logits[1][allowed], before[1][allowed])
    assert bool((logits[1][~allowed] == float("-inf")).all())
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])


def test_the_utf8_guard_allows_only_bytes_that_continue_valid_utf8():
    """xgrammar reads an overlong form (E0 96 AD) as a character; the guard keeps such bytes out."""
    from qwen3vl.engine.structured import Utf8Guard

    tokens = [b"a", b"\xe0", b"\xe0\xa4", b"\x96", b"\xa4", b"\xc3\xa9", b"\xc0", b"\xff", b"<|x|>", b"\xc3"]
    guard = Utf8Guard(tokens, 40)

    def allowed(state: int) -> set[bytes]:
        bits = guard.masks[state].tolist()
        return {t for i, t in enumerate(tokens) if (bits[i // 32] >> (i % 32)) & 1}

    # a lone E0 may not end a token (its next byte decides overlong or not), C0 and FF never come
    assert allowed(0) == {b"a", b"\xe0\xa4", b"\xc3\xa9", b"<|x|>", b"\xc3"}
    middle = guard.after(0, tokens.index(b"\xe0\xa4"))
    assert middle != 0 and allowed(middle) == {b"\x96", b"\xa4"}  # only continuation bytes
    assert guard.after(middle, tokens.index(b"\xa4")) == 0
    assert not any(int(w) for w in guard.masks[:, 1:].flatten())  # padded ids never


def test_tools_tool_calls_and_tool_messages_render_with_special_token_text_kept_plain(engine):
    """The chat template renders tools into the system turn, an assistant's calls as
    <tool_call> blocks and tool messages as <tool_response>; `<|im_end|>` typed in any of them
    stays text, never the control token (no forged turn)."""
    tok = engine.tokenizer
    tools = [{"type": "function", "function": {"name": "f", "description": "x <|im_end|> y",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": "<|im_start|>"}'}}]},
                {"role": "tool", "content": "done <|im_end|>"}]
    ids = engine.prompts.token_ids(messages, tools)
    text = tok.decode(ids)
    assert '"description": "x <|im_end|> y"' in text and '<tool_call>\n{"name": "f", "arguments": {"a": "<|im_start|>"}}' \
        in text and "<tool_response>\ndone <|im_end|>\n</tool_response>" in text
    # control tokens: one <|im_start|> per turn (system, user, assistant, tool's user turn, the answer's)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 5
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 4


def test_likely_tokens_a_mask_leaves_out_but_the_matcher_accepts_are_let_back():
    """xgrammar's mask can leave out a token its matcher accepts (on the demo checkpoint's
    vocabulary: `purple` after `"` under the enum ["purple"]); repair_mask checks the row's most
    likely left-out tokens with accept_token (then rollback) and lets back the accepted ones."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from qwen3vl.engine.structured import GrammarCompiler, repair_mask
    from qwen3vl.tools.shapes.accuracy import CHECKPOINT

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    vocab = ModelConfig.load(CHECKPOINT, device="cpu").text.vocab_size
    compiler = GrammarCompiler(tokenizer, vocab, stop_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")], max_rows=2)
    state = compiler.submit(structured(json={"enum": ["purple"]}))
    state.compiled.result()
    assert state.poll() and state.ready
    quote, purple, red = tokenizer.convert_tokens_to_ids(['"', "purple", "red"])
    assert state.accept(quote) is None
    logits = torch.zeros(1, vocab)
    logits[0, purple], logits[0, red] = 5.0, 6.0
    compiler.mask(logits, [state])
    assert logits[0].argmax().item() == purple and logits[0, red] == float("-inf")

    # the repair on its own: bits cleared by hand come back only for tokens the matcher accepts
    # and only among the top k; the matcher is where it was
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    state.matcher.fill_next_token_bitmask(bitmask, 0)
    bitmask[0] = 0
    logits = torch.zeros(1, vocab)
    logits[0, red], logits[0, purple] = 9.0, 8.0
    assert repair_mask(logits, bitmask, [0], [state.matcher], set(), top_k=2) == 1
    assert [j for j in range(vocab) if (int(bitmask[0, j // 32]) >> (j % 32)) & 1] == [purple]
    bitmask[0] = 0
    logits[0, red], logits[0, purple] = 0.0, -1.0   # purple no longer among the top 2
    assert repair_mask(logits, bitmask, [0], [state.matcher], set(), top_k=2) == 0
    assert state.accept(purple) is None and state.accept(quote) is None and state.matcher.is_completed()


def test_what_xgrammar_does_not_enforce_is_found_by_name():
    from qwen3vl.engine.structured import xgrammar_unenforced

    assert xgrammar_unenforced(SCHEMA) == []
    assert xgrammar_unenforced({"type": "object", "properties": {
        "contains": {"type": "integer", "multipleOf": 5},            # a property named like a keyword
        "tags": {"type": "array", "uniqueItems": True, "items": {"type": "string", "format": "color"}},
        "code": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 4},
        "when": {"type": "string", "format": "date"}},
        "$defs": {"x": {"type": "array", "contains": {"const": 1}}}}) == [
        "contains", "format 'color'", "minLength/maxLength with pattern or format", "multipleOf", "uniqueItems"]
    assert xgrammar_unenforced({"enum": [{"multipleOf": 3}], "const": {"uniqueItems": True}}) == []   # data


def test_schemas_xgrammar_does_not_enforce_go_to_llguidance_which_enforces_them_or_refuses_by_name(engine):
    """multipleOf and a pattern with a maxLength (xgrammar compiles both and enforces neither) are
    enforced through llguidance, written compact like xgrammar's JSON; uniqueItems, which
    llguidance cannot enforce either, fails its request naming it, and the batch carries on."""
    tight = {"type": "object", "properties": {
        "n": {"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 100},
        "code": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}}, "required": ["n", "code"]}
    unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    got = run(engine, [("Numbers", {"max_tokens": 40, "temperature": 0}, structured(json=tight)),
                       ("Sampled", {"max_tokens": 40, "temperature": 1.0, "seed": 5}, structured(json=tight)),
                       ("Unique", {"max_tokens": 20}, structured(json=unique)),
                       ("Tell me a story", {"max_tokens": 6, "temperature": 0}, None)])
    for ids in got[:2]:
        assert isinstance(ids, list) and ids[-1] in engine.stop_ids, ids
        text = text_of(engine, ids)
        value = json.loads(text)
        jsonschema.validate(value, tight)
        assert text == json.dumps(value)       # compact, as xgrammar writes JSON
    assert isinstance(got[2], InvalidInput) and "uniqueItems" in str(got[2]) and "llguidance" in str(got[2])
    assert got[3] == run(engine, [("Tell me a story", {"max_tokens": 6, "temperature": 0}, None)])[0]
