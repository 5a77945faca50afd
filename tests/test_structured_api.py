"""Structured output and tool calls through a real server with the `openai` SDK (and the ensemble's
`structured_outputs` input with tritonclient), on the tiny random checkpoint: its free text is
nonsense, so only the grammar can make an answer valid. Requests run concurrently so that they
share the engine's batches."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from test_openai import MODEL, api, client  # noqa: F401 - the service in front of the session's server

from qwen3vl.client import infer

MAX_TOKENS = 200


def obj(properties: dict, required=None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required}


STR = {"type": "string", "maxLength": 6}
# Twenty schemas: nested objects, arrays, enums, required fields, numbers with bounds.
SCHEMAS = [
    obj({"name": STR}),
    obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 5}}),
    obj({"colour": {"enum": ["red", "green", "blue"]}}),
    obj({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"tags": {"type": "array", "items": STR, "maxItems": 3}}),
    obj({"point": obj({"x": {"type": "integer", "minimum": 0, "maximum": 9},
                       "y": {"type": "integer", "minimum": 0, "maximum": 9}})}),
    obj({"user": obj({"name": STR, "address": obj({"city": STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})}),
    obj({"items": {"type": "array", "minItems": 1, "maxItems": 2,
                   "items": obj({"id": {"type": "integer", "minimum": 1, "maximum": 99}, "label": STR})}}),
    obj({"status": {"enum": ["ok", "error"]}, "code": {"type": "integer", "minimum": 100, "maximum": 599}}),
    obj({"shape": {"enum": ["circle", "square"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9},
         "colour": {"enum": ["red", "blue"]}}),
    obj({"a": STR, "b": STR, "c": {"type": "boolean"}}, required=["a"]),
    obj({"matrix": {"type": "array", "maxItems": 2,
                    "items": {"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 3}}}}),
    obj({"temperature": {"type": "number", "minimum": -40, "maximum": 50}, "unit": {"const": "C"}}),
    obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}}),
    obj({"flags": {"type": "array", "maxItems": 3, "items": {"enum": ["x", "y", "z"]}}}),
    obj({"meta": obj({"version": {"type": "integer", "minimum": 1, "maximum": 3}, "draft": {"type": "boolean"}}),
         "title": STR}),
    obj({"nothing": {"type": "null"}, "word": STR}),
    obj({"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}, "currency": {"enum": ["EUR", "USD"]}}),
    obj({"answer": {"type": "string", "enum": ["yes", "no"]}, "why": STR}),
]


def schema_format(i: int, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}


def ask(client, content: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=MAX_TOKENS, **kw)


def streamed(client, content: str, **kw) -> tuple[str, list, str]:
    """(content, tool calls assembled from their deltas, finish reason) of a streamed answer."""
    text, calls, reason = "", {}, None
    for chunk in ask(client, content, stream=True, **kw):
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            if d.function is not None:
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
        reason = choice.finish_reason or reason
    return text, [calls[i] for i in sorted(calls)], reason


def test_twenty_json_schemas_each_answer_validates_streamed_and_not(client):
    with ThreadPoolExecutor(len(SCHEMAS) + 3) as pool:
        whole = [pool.submit(ask, client, f"Answer {i}", response_format=schema_format(i, s), temperature=1.0, seed=i)
                 for i, s in enumerate(SCHEMAS)]
        parts = [pool.submit(streamed, client, f"Stream {i}", response_format=schema_format(i, SCHEMAS[i]))
                 for i in (7, 8, 12)]
        for s, future in zip(SCHEMAS, whole):
            choice = future.result().choices[0]
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), s)
        for i, future in zip((7, 8, 12), parts):
            text, calls, reason = future.result()
            assert reason == "stop" and not calls
            jsonschema.validate(json.loads(text), SCHEMAS[i])


def test_json_object_mode_answers_a_json_object(client):
    answer = ask(client, "Anything", response_format={"type": "json_object"}, temperature=0).choices[0]
    if answer.finish_reason == "stop":  # an object with free keys may run past max_tokens
        assert isinstance(json.loads(answer.message.content), dict)
    else:
        assert answer.message.content.startswith("{")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": obj({"city": STR, "days": {"type": "integer", "minimum": 1, "maximum": 7},
                       "options": obj({"unit": {"enum": ["C", "F"]}, "hourly": {"type": "boolean"}})})}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": obj({"zone": {"enum": ["UTC", "CET"]}})}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def check_calls(calls: list, names: set[str]) -> None:
    assert calls
    for call in calls:
        name, arguments = (call.function.name, call.function.arguments) if hasattr(call, "function") else (
            call["name"], call["arguments"])
        assert name in names
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])  # nested objects intact


def test_tool_choice_required_and_named_give_calls_that_validate_streamed_and_not(client):
    tools = [WEATHER, TIME]
    named = {"type": "function", "function": {"name": "get_weather"}}
    with ThreadPoolExecutor(4) as pool:
        required = pool.submit(ask, client, "Weather?", tools=tools, tool_choice="required", parallel_tool_calls=False)
        forced = pool.submit(ask, client, "Weather?", tools=tools, tool_choice=named, temperature=1.0, seed=5)
        forced_stream = pool.submit(streamed, client, "Weather?", tools=tools, tool_choice=named)
        required_stream = pool.submit(streamed, client, "Time?", tools=tools, tool_choice="required",
                                      parallel_tool_calls=False)
        for future, names in ((required, {"get_weather", "get_time"}), (forced, {"get_weather"})):
            choice = future.result().choices[0]
            assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
            check_calls(choice.message.tool_calls, names)
            assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
        for future, names in ((forced_stream, {"get_weather"}), (required_stream, {"get_weather", "get_time"})):
            text, calls, reason = future.result()
            assert reason == "tool_calls" and not text.strip()
            check_calls(calls, names)
            assert all(c["id"].startswith("call_") for c in calls)


def test_tool_messages_and_earlier_calls_are_rendered_and_answered(client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1, "options": {"unit": "C"}}'}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    with_history = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=4)
    alone = client.chat.completions.create(model=MODEL, messages=messages[:1], tools=[WEATHER], max_tokens=4)
    no_tools = client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=4)
    # the call, the tool's answer and the tool definitions are all in the prompt
    assert with_history.usage.prompt_tokens > alone.usage.prompt_tokens + 20
    assert alone.usage.prompt_tokens > no_tools.usage.prompt_tokens + 50


def test_constrained_requests_leave_unconstrained_neighbours_greedy_tokens_unchanged(api, client):
    def free(i):
        return api.post({"model": MODEL, "messages": [{"role": "user", "content": f"Tell me story {i}"}],
                         "max_tokens": 24, "temperature": 0}).json()["choices"][0]["message"]["content"]

    alone = [free(i) for i in range(2)]
    with ThreadPoolExecutor(6) as pool:
        mixed = [pool.submit(free, 0),
                 *[pool.submit(ask, client, f"JSON {i}", response_format=schema_format(i, SCHEMAS[i])) for i in range(3)],
                 pool.submit(ask, client, "Tool", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False),
                 pool.submit(free, 1)]
        assert [mixed[0].result(), mixed[-1].result()] == alone
        for future in mixed[1:-1]:
            assert future.result().choices[0].finish_reason in ("stop", "tool_calls")


@pytest.mark.parametrize("body, param", [
    ({"response_format": schema_format(0, {"type": "frobnicate"})}, None),
    ({"response_format": schema_format(0, {"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}})}, None),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_a_bad_schema_or_tool_request_gets_a_400_and_the_server_carries_on(api, body, param):
    r = api.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param if param else "structured_outputs.json" in error["message"], error
    ok = api.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_the_ensembles_structured_outputs_input_over_grpc_and_http(server):
    schema = SCHEMAS[10]
    for protocol in ("grpc", "http"):
        answer = infer(server.grpc_url if protocol == "grpc" else server.http_url, protocol, prompt="Describe",
                       max_tokens=MAX_TOKENS, structured_outputs={"json": schema})
        assert answer.finish_reason == "stop"
        jsonschema.validate(json.loads(answer.text), schema)
    choice = infer(server.grpc_url, "grpc", prompt="Pick", max_tokens=8, structured_outputs={"choice": ["up", "down"]})
    assert choice.text in ("up", "down")
    with pytest.raises(Exception, match="structured_outputs"):
        infer(server.grpc_url, "grpc", prompt="Bad", max_tokens=8, structured_outputs={"json": {}, "regex": "a"})


def test_the_sdk_sees_a_400_for_a_schema_that_does_not_compile(client):
    with pytest.raises(openai.BadRequestError, match="structured_outputs.json"):
        ask(client, "hi", response_format=schema_format(0, {"type": "integer", "minimum": 5, "maximum": 1}))


def test_the_hermes_parser_whole_and_streamed_in_any_pieces_gives_the_same_calls():
    """`auto`: text before a call is content; nested arguments stay intact; a block that is not a
    call stays content; split at every character, the stream gives what the whole text gives."""
    from qwen3vl.openai.structured import ToolCallParser, parse_tool_calls

    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"options": {"unit": "C", "days": [1, 2]}}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
            '"arguments": {"zone": "UTC"}}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "options": {"unit": "C", "days": [1, 2]}}), ("get_time", {"zone": "UTC"})]
    for size in (1, 3, 7, len(text)):
        parser, events = ToolCallParser(), []
        for i in range(0, len(text), size):
            events += parser.feed(text[i:i + size])
        events += parser.finish()
        streamed = "".join(v for k, v in events if k == "content")
        assert streamed.strip() == content
        assert [(v.name, v.arguments) for k, v in events if k == "tool_call"] == [(c.name, c.arguments) for c in calls]
    broken = "x <tool_call>not json</tool_call> <tool_"
    assert parse_tool_calls(broken) == (broken, [])
    parser = ToolCallParser()
    assert "".join(v for k, v in parser.feed(broken) + parser.finish() if k == "content") == broken
