"""Logprobs and n choices (docs/logprobs-and-n.md). In the engine, on the tiny checkpoint: a
token's logprob is the log-softmax of the unbatched reference's logits for the same prefix, the
top alternatives are sorted and hold the greedy token; n choices run one prefill, share the
prompt's full KV blocks (given back when all are done), and choice i is the request alone with
seed + i. Through a real server and the `openai` SDK: the same, in OpenAI's shapes, streamed
and not, with an image every choice sees; bad values get a 400 naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import png, reference_generate, reference_inputs
from qwen3vl.encoder.encoder import VisionEncoder
from qwen3vl.engine.engine import Engine
from qwen3vl.errors import InvalidInput
from qwen3vl.model.config import ModelConfig
from qwen3vl.settings import ServingConfig

QUESTION = "What is in the picture? Answer in one sentence."
IMAGE, OTHER_IMAGE = png(120, 90, 11), png(120, 90, 12)


@pytest.fixture(scope="module")
def parts(checkpoint, reference):
    config = ModelConfig.load(checkpoint, device="cpu")
    return config, VisionEncoder(config, reference[1].image_processor)


def new_engine(config, **kw) -> Engine:
    return Engine.from_checkpoint(config, ServingConfig(**{"kv_cache_mb": 64, **kw}))


def chat(question: str, images: int) -> str:
    return json.dumps([{"role": "user", "content": [*({"type": "image"} for _ in range(images)),
                                                    {"type": "text", "text": question}]}])


def run(engine: Engine, text: str, features, **params) -> dict[int, list]:
    """Each choice's steps, by index."""
    out: dict[int, list] = {}
    for step in engine.generate(text, features, engine.params(**params)):
        out.setdefault(step.index, []).append(step)
    return out


def ids(steps) -> list[int]:
    return [t for s in steps for t in s.token_ids]


# ---- the engine ----------------------------------------------------------------------------


def reference_logprobs(reference, question: str, images: list[bytes], tokens: list[int]) -> torch.Tensor:
    """transformers' log-softmax over the vocabulary for each of `tokens`' prefixes: [len, V]
    (one forward over the prompt and the tokens but the last)."""
    model, processor = reference
    inputs = reference_inputs(processor, question, images)
    prompt_len = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([tokens[:-1]])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:  # the appended tokens are text
        types = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, len(tokens) - 1)], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits[0, prompt_len - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def test_logprobs_are_transformers_log_softmax_of_each_prefix(parts, reference):
    config, encoder = parts
    engine = new_engine(config)
    (steps,) = run(engine, QUESTION, encoder.encode([[IMAGE]])[0], max_tokens=6, temperature=0.0,
                   logprobs=5).values()
    tokens = ids(steps)
    got = [x for s in steps for x in zip(s.logprobs.logprobs, s.logprobs.top_ids, s.logprobs.top_logprobs)]
    assert len(got) == len(tokens) == 6
    assert tokens == reference_generate(reference, QUESTION, [IMAGE], 6)
    want = reference_logprobs(reference, QUESTION, [IMAGE], tokens)
    for i, (token, (chosen, top_ids, top_values)) in enumerate(zip(tokens, got)):
        assert abs(chosen - float(want[i, token])) < 1e-4
        assert top_ids[0] == token  # greedy: the most likely token is the one chosen
        assert top_values == sorted(top_values, reverse=True) and len(top_ids) == 5
        assert top_values[0] == pytest.approx(chosen, abs=1e-6)
        assert top_ids == want[i].topk(5).indices.tolist()
        torch.testing.assert_close(torch.tensor(top_values), want[i, top_ids], rtol=0, atol=1e-4)


def test_only_rows_that_ask_get_logprobs_and_they_leave_tokens_alone(parts):
    config, _ = parts
    engine = new_engine(config)
    text = chat("Tell me a story.", 0)
    features = engine_features(engine)
    plain = run(engine, text, features, max_tokens=5, temperature=0.8, seed=3)[0]
    asked = run(engine, text, features, max_tokens=5, temperature=0.8, seed=3, logprobs=0)[0]
    assert ids(plain) == ids(asked)
    assert all(s.logprobs is None for s in plain)
    assert all(len(s.logprobs) == len(s.token_ids) and s.logprobs.top_ids == [[]] for s in asked)
    # sampled at temperature 0.8, the logprob is still the raw one (temperature-free): <= 0, finite
    assert all(x <= 0 and x > -1e9 for s in asked for x in s.logprobs.logprobs)


def engine_features(engine: Engine):
    from qwen3vl.features import VisualFeatures

    return VisualFeatures.empty(engine.config)


def test_n_choices_share_one_prefill_and_each_equals_its_seed_alone(parts):
    config, encoder = parts
    engine = new_engine(config, block_size=16)
    features = encoder.encode([[IMAGE]])[0]
    text = QUESTION
    free = engine.blocks.num_free
    counted = []
    step = engine.step

    def counting():
        out = step()
        counted.extend(out.prefills)
        return out

    engine.step = counting
    choices = run(engine, text, features, max_tokens=8, temperature=1.0, seed=40, n=4, logprobs=2)
    assert sorted(choices) == [0, 1, 2, 3]
    assert len(counted) == 1  # one prefill for the four choices
    assert engine.blocks.num_free == free  # every block back (the shared ones too)
    answers = [ids(choices[i]) for i in range(4)]
    assert len({tuple(a) for a in answers}) == 4, answers
    for i, answer in enumerate(answers):
        alone = run(engine, text, features, max_tokens=8, temperature=1.0, seed=40 + i, logprobs=2)[0]
        assert ids(alone) == answer
        got = [x for s in choices[i] for x in s.logprobs.logprobs]
        assert got == pytest.approx([x for s in alone for x in s.logprobs.logprobs], abs=1e-5)
    # The image is in every choice's context: with another image every choice's logprobs move
    # (the tiny model's sampled tokens may not), so a choice that lost its visual rows shows.
    others = run(engine, text, encoder.encode([[OTHER_IMAGE]])[0], max_tokens=8, temperature=1.0, seed=40, n=4,
                 logprobs=0)
    for i in range(4):
        mine = [x for s in choices[i] for x in s.logprobs.logprobs]
        theirs = [x for s in others[i] for x in s.logprobs.logprobs]
        assert max(abs(a - b) for a, b in zip(mine, theirs)) > 1e-3


@pytest.mark.parametrize("partial", [True, False], ids=["prompt-ends-inside-a-block", "prompt-fills-its-blocks"])
def test_forked_blocks_are_shared_then_freed(parts, partial):
    """The prompt's full blocks are held once (reference counted by every choice), each choice
    has its own partial block (its prompt KV copied) and generation blocks, and all come back at
    the end."""
    config, _ = parts
    text = chat("Tell me a story.", 0)
    prompt_len = len(new_engine(config).prepare(text, engine_features(new_engine(config))).input_ids)
    bs = next(b for b in range(3, 64) if bool(prompt_len % b) == partial)
    engine = new_engine(config, block_size=bs, enable_prefix_caching=False)
    free = engine.blocks.num_free
    seq = engine.new_sequence(text, engine_features(engine),
                              engine.params(max_tokens=6, temperature=1.0, seed=1, n=3, ignore_eos=True))
    choices = seq.choices
    engine.add(seq)
    engine.step()  # the whole prompt in one step, then the fork
    full, tail = divmod(seq.prompt_len, bs)
    tables = [c.block_table for c in choices]
    assert all(t[:full] == tables[0][:full] for t in tables)  # shared
    assert all(engine.blocks.blocks[b].ref_count == 3 for b in tables[0][:full])
    private = [b for t in tables for b in t[full:]]
    assert len(set(private)) == len(private)  # the rest is each one's own
    per_choice = engine.blocks.blocks_for(seq.prompt_len + 6)
    assert engine.blocks.num_free == free - per_choice - 2 * (per_choice - full)
    engine.step()  # the copy is made at the start of the next step's forward (on every rank)
    for layer in (0, len(engine.kv.k) - 1):  # the partial block's prompt KV copied into each choice's
        a, b = tables[0][full] * bs, tables[2][full] * bs
        assert torch.equal(engine.kv.v[layer][a:a + tail], engine.kv.v[layer][b:b + tail])
    while engine.has_work():
        engine.step()
    assert all(len(c.output_ids) == 6 for c in choices)
    assert engine.blocks.num_free == free


def test_choices_beside_other_requests_give_what_each_gives_alone(parts):
    """A request's choices join a batch that holds other requests (one prefilling beside the
    fork, one decoding), and nobody's tokens change."""
    config, encoder = parts
    engine = new_engine(config, block_size=8)
    features = encoder.encode([[IMAGE]])[0]
    requests = [("Tell me a story.", engine_features(engine), dict(max_tokens=10, temperature=0.0)),
                (QUESTION, features, dict(max_tokens=6, temperature=1.0, seed=5, n=3)),
                ("Count to ten.", engine_features(engine), dict(max_tokens=6, temperature=0.9, seed=8))]
    seqs, got = [], {}

    def step():
        for request_id, out in engine.step().steps.items():
            got.setdefault(request_id, []).extend(out.token_ids)

    for i, (text, f, params) in enumerate(requests):
        seq = engine.new_sequence(text, f, engine.params(**params))
        engine.add(seq)
        seqs += seq.choices
        if i == 0:
            step()  # the first one is decoding when the others arrive
    while engine.has_work():
        step()
    together = [got[seq.request_id] for seq in seqs]
    alone = [ids(run(engine, text, f, **params)[0]) for text, f, params in requests[:1]]
    alone += [ids(run(engine, QUESTION, features, **{**requests[1][2], "n": 1, "seed": 5 + i})[0]) for i in range(3)]
    alone += [ids(run(engine, *requests[2][:2], **requests[2][2])[0])]
    assert together == alone


def test_steps_of_a_choice_merge_with_their_logprobs():
    from qwen3vl.engine.logprobs import TokenLogprobs
    from qwen3vl.engine.sequence import Step

    a = Step([1], "a", "", 2, TokenLogprobs([-0.5], [[1, 3]], [[-0.5, -1.0]]))
    b = Step([4], "b", "stop", 2, TokenLogprobs([-2.0], [[3, 4]], [[-1.0, -2.0]]))
    merged = a.then(b)
    assert (merged.token_ids, merged.text, merged.finish_reason, merged.index) == ([1, 4], "ab", "stop", 2)
    assert merged.logprobs == TokenLogprobs([-0.5, -2.0], [[1, 3], [3, 4]], [[-0.5, -1.0], [-1.0, -2.0]])
    assert Step([1], "a").then(Step([2], "b")).logprobs is None
    assert a.then(Step([], "", "cancelled", 2)).logprobs == a.logprobs


def test_cancelling_a_request_ends_all_its_choices_and_frees_their_blocks(parts):
    config, _ = parts
    engine = new_engine(config, block_size=4)
    free = engine.blocks.num_free
    seq = engine.new_sequence(chat("Tell me a story.", 0), engine_features(engine),
                              engine.params(max_tokens=50, temperature=1.0, n=3, ignore_eos=True))
    choices = seq.choices
    engine.add(seq)
    engine.step()
    engine.step()
    seq.cancel_requested = True
    out = engine.step()
    assert {out.steps[c.request_id].finish_reason for c in choices} == {"cancelled"}
    assert {out.steps[c.request_id].index for c in choices} == {0, 1, 2}
    assert not engine.has_work() and engine.blocks.num_free == free


def test_a_failed_leader_fails_its_waiting_choices(parts):
    config, _ = parts
    engine = new_engine(config)
    seq = engine.new_sequence(chat("hi", 0), engine_features(engine), engine.params(max_tokens=4, n=2))
    choices = seq.choices
    engine.add(seq)
    out = engine.fail_waiting(seq, RuntimeError("gone"))
    assert set(out.failures) == {c.request_id for c in choices} and len(choices) == 2
    assert not engine.has_work()


@pytest.mark.parametrize("params, message", [
    ({"logprobs": 21}, "logprobs must be in [0, 20]"),
    ({"logprobs": -1}, "logprobs must be in [0, 20]"),
    ({"n": 0}, "n must be in [1, 8]"),
    ({"n": 9}, "n must be in [1, 8]"),
])
def test_out_of_range_logprobs_and_n_are_refused(parts, params, message):
    engine = new_engine(parts[0])
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine.params(**params)


def test_choices_with_structured_output_each_follow_the_grammar_with_their_own_matcher(parts):
    """n = 3 under a JSON schema, sampled: every choice is valid JSON of the schema and equals the
    same request alone with that choice's seed (so each choice's matcher followed its own
    tokens, not the leader's); the choices differ; blocks all come back."""
    import jsonschema

    from qwen3vl.engine.structured import StructuredOutputs

    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["word", "n"]}
    config, encoder = parts
    engine = new_engine(config)
    features = encoder.encode([[IMAGE]])[0]
    free = engine.blocks.num_free

    def answers(n: int, seed: int) -> list[list[int]]:
        seq = engine.new_sequence(QUESTION, features, engine.params(max_tokens=60, temperature=1.0, seed=seed, n=n),
                                  structured=StructuredOutputs.parse(json.dumps({"json": schema})))
        choices, got = seq.choices, {}
        engine.add(seq)
        while not all(c.finished for c in choices):
            out = engine.step()
            for i, c in enumerate(choices):
                assert c.request_id not in out.failures, out.failures[c.request_id]
                if c.request_id in out.steps:
                    got.setdefault(i, []).extend(out.steps[c.request_id].token_ids)
        return [got[i] for i in range(n)]

    together = answers(3, 70)
    texts = [engine.tokenizer.decode([t for t in a if t not in engine.stop_ids]) for a in together]
    for a, text in zip(together, texts):
        assert a[-1] in engine.stop_ids, text          # the grammar's end ended each choice
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > 1, texts
    for i, a in enumerate(together):
        assert answers(1, 70 + i)[0] == a
    assert engine.blocks.num_free == free


def test_more_choices_than_slots_is_refused(parts):
    engine = new_engine(parts[0], max_num_seqs=2)
    seq = engine.new_sequence(chat("hi", 0), engine_features(engine), engine.params(max_tokens=4, n=3))
    with pytest.raises(InvalidInput, match="max_num_seqs"):
        engine.add(seq)


# ---- through a real server -------------------------------------------------------------------
# The session's tritonserver and an OpenAI service in front of it (test_openai's fixtures).

from test_openai import MODEL, api, assert_openai_error, client, data_url  # noqa: E402,F401

from qwen3vl.client import stream_grpc  # noqa: E402
from qwen3vl.client.responses import ServerError  # noqa: E402
from qwen3vl.engine.logprobs import TokenBytes  # noqa: E402


def image_chat(question: str, image: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": question}]}]


def openai_logprobs(choice) -> list[tuple[float, list[int], list[tuple[float, list[int]]]]]:
    """A choice's (logprob, bytes, [(top logprob, top bytes)]) per token."""
    return [(t.logprob, t.bytes, [(a.logprob, a.bytes) for a in t.top_logprobs]) for t in choice.logprobs.content]


def streamed(client, **body) -> tuple[dict[int, str], dict[int, list], dict[int, str], object]:
    """A streamed completion's text, logprobs entries and finish reason per choice, and its usage."""
    text, logprobs, reasons, usage = {}, {}, {}, None
    for event in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body):
        usage = event.usage or usage
        for c in event.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            if c.logprobs is not None:
                logprobs.setdefault(c.index, []).extend(c.logprobs.content)
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return text, logprobs, reasons, usage


def test_openai_logprobs_equal_transformers_log_softmax(client, reference, checkpoint):
    from transformers import AutoTokenizer

    token_bytes = TokenBytes(AutoTokenizer.from_pretrained(checkpoint))
    body = dict(model=MODEL, messages=image_chat(QUESTION, IMAGE), max_tokens=6, temperature=0.0, logprobs=True,
                top_logprobs=4)
    whole = client.chat.completions.create(**body).choices[0]
    got = openai_logprobs(whole)
    assert len(got) == 6
    # the same conversation as transformers sees it (conftest.reference_inputs: the image first)
    greedy = reference_generate(reference, QUESTION, [IMAGE], 6)
    want = reference_logprobs(reference, QUESTION, [IMAGE], greedy)
    for i, (token, (logprob, raw, top)) in enumerate(zip(greedy, got)):
        assert raw == list(token_bytes.of(token))
        assert abs(logprob - float(want[i, token])) < 1e-4
        values = [v for v, _ in top]
        assert len(top) == 4 and values == sorted(values, reverse=True)
        assert top[0] == (logprob, raw)  # greedy: the chosen token is the most likely
        assert [b for _, b in top] == [list(token_bytes.of(t)) for t in want[i].topk(4).indices.tolist()]
    # streamed: the same entries, in order, over the chunks (within float rounding: this time the
    # prompt's blocks come from the prefix cache, a different batch shape)
    _, streamed_logprobs, _, _ = streamed(client, **body)
    again = [(t.logprob, t.bytes, [(a.logprob, a.bytes) for a in t.top_logprobs]) for t in streamed_logprobs[0]]
    assert [(b, [tb for _, tb in top]) for _, b, top in again] == [(b, [tb for _, tb in top]) for _, b, top in got]
    assert [v for lp, _, top in again for v in (lp, *(v for v, _ in top))] == pytest.approx(
        [v for lp, _, top in got for v in (lp, *(v for v, _ in top))], abs=1e-5)
    # without top_logprobs: the chosen tokens only
    plain = client.chat.completions.create(**{**body, "top_logprobs": None}).choices[0]
    assert [b for _, b, _ in openai_logprobs(plain)] == [b for _, b, _ in got]
    assert [lp for lp, _, _ in openai_logprobs(plain)] == pytest.approx([lp for lp, _, _ in got], abs=1e-5)
    assert all(t.top_logprobs == [] for t in plain.logprobs.content)
    assert client.chat.completions.create(**{**body, "logprobs": None, "top_logprobs": None}).choices[0].logprobs is None


def test_openai_n_choices_each_equal_their_seed_alone_and_all_see_the_image(client):
    body = dict(model=MODEL, messages=image_chat(QUESTION, IMAGE), max_tokens=8, temperature=1.0, seed=1234,
                logprobs=True)
    whole = client.chat.completions.create(n=4, **body)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) == 4, texts
    assert whole.usage.completion_tokens == sum(len(c.logprobs.content) for c in whole.choices)
    for i, choice in enumerate(whole.choices):
        alone = client.chat.completions.create(**{**body, "seed": 1234 + i}).choices[0]
        assert alone.message.content == choice.message.content and alone.finish_reason == choice.finish_reason
        mine = [t.logprob for t in choice.logprobs.content]
        assert mine == pytest.approx([t.logprob for t in alone.logprobs.content], abs=1e-4)
    # Every choice sees the image: another image moves every choice's logprobs.
    other = client.chat.completions.create(n=4, **{**body, "messages": image_chat(QUESTION, OTHER_IMAGE)})
    for mine, theirs in zip(whole.choices, other.choices):
        assert max(abs(a.logprob - b.logprob) for a, b in zip(mine.logprobs.content, theirs.logprobs.content)) > 1e-3
    # Streamed: every choice's chunks carry its index; the same texts; usage counts all choices.
    text, logprobs, reasons, usage = streamed(client, n=4, **body)
    assert [text[i] for i in range(4)] == texts
    assert [reasons[i] for i in range(4)] == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens == sum(len(v) for v in logprobs.values())


def test_openai_n_choices_under_a_json_schema_are_each_valid_and_each_their_seed_alone(client):
    import jsonschema

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["colour", "count"]}
    body = dict(model=MODEL, messages=image_chat(QUESTION, IMAGE), max_tokens=40, temperature=1.0, seed=77,
                response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    whole = client.chat.completions.create(n=3, **body)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    for i, choice in enumerate(whole.choices):
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason == "stop"
        alone = client.chat.completions.create(**{**body, "seed": 77 + i}).choices[0]
        assert alone.message.content == choice.message.content
    text, _, reasons, _ = streamed(client, n=3, **body)
    assert [text[i] for i in range(3)] == [c.message.content for c in whole.choices]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_ends_each_choice_at_its_own_place(client, stream):
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16,
                temperature=1.0, seed=77, n=3)
    free = [c.message.content for c in client.chat.completions.create(**body).choices]
    stop = free[0][len(free[0]) // 2:][:2]  # from the middle of choice 0: it ends there, the others maybe
    assert stop.strip(), free
    want = [(text[:text.find(stop)], "stop") if stop in text else (text, None) for text in free]
    if stream:
        text, _, reasons, _ = streamed(client, stop=stop, **body)
        got = [(text[i], reasons[i]) for i in range(3)]
    else:
        got = [(c.message.content, c.finish_reason) for c in client.chat.completions.create(stop=stop, **body).choices]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [r for _, r in got][0] == "stop" and all(r == (w or r) for (_, r), (_, w) in zip(got, want))


def test_n_choices_over_grpc_name_their_index(server):
    chunks = list(stream_grpc(server.grpc_url, prompt="Tell me a story.", max_tokens=5, temperature=1.0, seed=9,
                              n=3, logprobs=2))
    by_index: dict[int, list] = {}
    for c in chunks:
        by_index.setdefault(c.index, []).append(c)
    assert sorted(by_index) == [0, 1, 2]
    for i, pieces in by_index.items():
        assert pieces[-1].finish_reason and not any(p.finish_reason for p in pieces[:-1])
        ids = [t for p in pieces for t in p.token_ids]
        assert sum(len(p.logprobs.logprobs) for p in pieces) == len(ids)
        assert all(len(row) == 2 for p in pieces for row in p.logprobs.top_ids)
        alone = list(stream_grpc(server.grpc_url, prompt="Tell me a story.", max_tokens=5, temperature=1.0,
                                 seed=9 + i, stream=False))
        assert [t for c in alone for t in c.token_ids] == ids and alone[0].logprobs is None
    # not streamed: one whole response per choice, the same tokens
    whole = list(stream_grpc(server.grpc_url, prompt="Tell me a story.", max_tokens=5, temperature=1.0, seed=9,
                             n=3, logprobs=2, stream=False))
    assert sorted(c.index for c in whole) == [0, 1, 2] and all(c.finish_reason for c in whole)
    for c in whole:
        assert c.token_ids == [t for p in by_index[c.index] for t in p.token_ids]
        assert len(c.logprobs.logprobs) == len(c.token_ids)
    with pytest.raises(ServerError, match=r"logprobs must be in \[0, 20\]"):
        list(stream_grpc(server.grpc_url, prompt="hi", max_tokens=2, logprobs=21))


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


@pytest.mark.parametrize("body, param, words", [
    (chat_body(n=0), "n", "[1, 8]"),
    (chat_body(n=9), "n", "[1, 8]"),
    (chat_body(logprobs=True, top_logprobs=21), "top_logprobs", "[0, 20]"),
    (chat_body(logprobs=True, top_logprobs=-1), "top_logprobs", "[0, 20]"),
    (chat_body(top_logprobs=3), "top_logprobs", "logprobs is true"),
    (chat_body(logprobs=False, top_logprobs=3), "top_logprobs", "logprobs is true"),
    (chat_body(n=2, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "n", "tools"),
    (chat_body(logprobs=True, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
     "logprobs", "tools"),
], ids=["n-0", "n-9", "top-21", "top-negative", "top-without-logprobs", "top-with-logprobs-false",
        "n-with-tools", "logprobs-with-tools"])
def test_bad_n_and_top_logprobs_get_400_naming_the_field(api, body, param, words):
    assert_openai_error(api.post(body), 400, param, param, words)


def test_choices_on_two_tensor_parallel_ranks_equal_one_process(parts):
    """The partial prompt block each choice copies is copied on every rank (rank 1 holds its own
    share of the KV pool): two ranks give one process's choices and logprobs."""
    from qwen3vl.parallel.engine import parallel_engine

    config, encoder = parts
    features = encoder.encode([[IMAGE]])[0]
    prompt_len = len(new_engine(config).prepare(QUESTION, features).input_ids)
    bs = next(b for b in range(5, 64) if prompt_len % b)
    settings = dict(kv_cache_mb=16, block_size=bs)
    params = dict(max_tokens=6, temperature=1.0, seed=21, n=3, logprobs=0)
    one = run(Engine.from_checkpoint(config, ServingConfig(**settings)), QUESTION, features, **params)
    engine, group = parallel_engine(config, ServingConfig(**settings, tensor_parallel_size=2))
    try:
        two = run(engine, QUESTION, features, **params)
    finally:
        group.stop()
    assert sorted(two) == [0, 1, 2]
    for i in range(3):
        assert ids(two[i]) == ids(one[i])
        assert [x for s in two[i] for x in s.logprobs.logprobs] == pytest.approx(
            [x for s in one[i] for x in s.logprobs.logprobs], abs=1e-4)


def test_choices_through_the_static_decode_step_equal_the_eager_engine(parts):
    """After the fork the next step is often a pure decode, which the static-buffer (graph)
    decode step runs without the usual inputs: it makes the fork's partial-block copies too."""
    from qwen3vl.engine.graph_runner import DecodeGraphRunner

    config, encoder = parts
    features = encoder.encode([[IMAGE]])[0]
    prompt_len = len(new_engine(config).prepare(QUESTION, features).input_ids)
    bs = next(b for b in range(5, 64) if prompt_len % b)
    params = dict(max_tokens=6, temperature=1.0, seed=33, n=3, logprobs=0)
    eager = run(new_engine(config, block_size=bs), QUESTION, features, **params)
    engine = new_engine(config, block_size=bs, max_num_seqs=4)
    engine.runner.decode = DecodeGraphRunner(engine.runner, 4, engine.max_model_len, capture=False)
    static = run(engine, QUESTION, features, **params)
    for i in range(3):
        assert ids(static[i]) == ids(eager[i])
        assert [x for s in static[i] for x in s.logprobs.logprobs] == pytest.approx(
            [x for s in eager[i] for x in s.logprobs.logprobs], abs=1e-4)
