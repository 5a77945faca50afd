"""Structured output and tool calls of the chat API, in Qwen3's (hermes) format.

- `response_format` `json_object` / `json_schema` and `tool_choice` `required` / a named function
  become the ensemble's `structured_outputs` input (vLLM's object; the engine's grammar,
  engine/structured.py): `json_object` / `json` for the former; for the latter an xgrammar
  structural tag of Qwen3's tool-call blocks, exactly as Qwen's chat template writes them
  (`<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`, ARGS held to the tool's
  `parameters` schema), one or more (one when `parallel_tool_calls` is false).
- `tools` go to the ensemble's `tools` input: the chat template renders them into the system
  prompt (`# Tools ... <tools></tools>`), as Qwen3-VL's template does.
- `ToolCallParser` turns the model's text into content and `tool_calls` (ids, the arguments as a
  JSON string, nested objects intact), whole or as it streams (vLLM's hermes parser's job; a
  call is sent once its block is complete, so a partial JSON is never guessed at).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .errors import invalid, unsupported

TOOL_CALL_BEGIN, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_CALL_PREFIX = '<tool_call>\n{"name": "'
_ARGUMENTS_PREFIX = '", "arguments": '
_CALL_SUFFIX = "}\n</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_BLOCK = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)
# Whitespace allowed between a tool call's JSON tokens where JSON allows any (a model must not be
# able to write whitespace forever).
MAX_ARGUMENT_WHITESPACE = 1
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict


def parse_tools(tools: list | None) -> list[Tool]:
    """OpenAI's `tools` (function tools only). Raises APIError (400) naming the bad field."""
    out = []
    for i, t in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise unsupported(f"{where}.type", f"{where}.type: only function tools are supported")
        function = t.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function: required, an object with name and parameters", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid(f"{where}.function.name: 1 to 64 letters, digits, underscores or dashes",
                          f"{where}.function.name")
        parameters = function.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise invalid(f"{where}.function.parameters: must be a JSON schema object", f"{where}.function.parameters")
        out.append(Tool(name, parameters))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise invalid("tools: function names must be unique", "tools")
    return out


def forced_tools(tools: list[Tool], tool_choice) -> list[Tool] | None:
    """The tools a grammar must force a call of (tool_choice `required`: all; a named function:
    that one), or None when the model chooses (`auto`, `none`, not given). Raises APIError (400)."""
    if tool_choice in (None, "auto", "none"):
        return None
    if not tools:
        raise invalid("tool_choice: only allowed when tools are given", "tool_choice")
    if tool_choice == "required":
        return tools
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t.name == name]
        if not chosen:
            raise invalid(f"tool_choice.function.name: no tool is named {name!r}", "tool_choice.function.name")
        return chosen
    raise invalid("tool_choice: use 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                  "tool_choice")


def tool_call_grammar(tools: list[Tool], parallel: bool = True) -> dict:
    """The structural tag (xgrammar) of Qwen3's tool-call blocks for `tools`: one or more blocks
    separated by a newline (exactly one when not `parallel`), each call's arguments held to its
    tool's `parameters`. A named tool_choice passes its one tool and parallel=False: one call."""
    tags = [{"type": "tag", "begin": _CALL_PREFIX + t.name + _ARGUMENTS_PREFIX,
             "content": {"type": "json_schema", "json_schema": t.parameters,
                         "max_whitespace_cnt": MAX_ARGUMENT_WHITESPACE},
             "end": _CALL_SUFFIX} for t in tools]
    return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                                                 "at_least_one": True, "stop_after_first": not parallel}}


def response_format_constraint(response_format: dict | None) -> dict | None:
    """OpenAI's `response_format` as vLLM's structured_outputs object, or None for text. Raises
    APIError (400) naming the field."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid("response_format.json_schema: required, an object with name and schema",
                          "response_format.json_schema")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise invalid("response_format.json_schema.name: required", "response_format.json_schema.name")
        schema = spec.get("schema")
        if schema is None:
            return {"json_object": True}
        if not isinstance(schema, dict):
            raise invalid("response_format.json_schema.schema: must be a JSON schema object",
                          "response_format.json_schema.schema")
        return {"json": schema}  # `strict` or not: the schema is always enforced
    raise unsupported("response_format.type", f"response_format.type: {kind!r} is not supported; use text, "
                                              "json_object or json_schema")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_call_of(block: str) -> ToolCall | None:
    """The call in a `<tool_call>` block's inside, or None when it is not `{"name", "arguments"}`."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(obj["name"], text)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole answer: (content outside the tool-call blocks, stripped, or None when empty; the
    calls). A block that is not a call stays in the content, as the model wrote it."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        call = tool_call_of(match.group(1))
        if call is None:
            continue
        kept.append(text[last:match.start()])
        calls.append(call)
        last = match.end()
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


class ToolCallParser:
    """A streamed answer: `feed(text)` and then `finish()` return events, ("content", text) or
    ("tool_call", ToolCall), in order. Text that may be the start of `<tool_call>` is held back
    until it is known; a block is parsed once its `</tool_call>` has come. Whitespace between
    and after calls is not content (as `parse_tool_calls` strips it)."""

    def __init__(self):
        self.buffer, self.inside, self.calls = "", False, 0

    def feed(self, text: str) -> list[tuple]:
        self.buffer += text
        events: list[tuple] = []
        while True:
            if self.inside:
                end = self.buffer.find(TOOL_CALL_END)
                if end < 0:
                    return events
                block, self.buffer = self.buffer[:end], self.buffer[end + len(TOOL_CALL_END):]
                self.inside = False
                call = tool_call_of(block)
                if call is None:
                    events += self._content(TOOL_CALL_BEGIN + block + TOOL_CALL_END)
                else:
                    self.calls += 1
                    events.append(("tool_call", call))
                continue
            start = self.buffer.find(TOOL_CALL_BEGIN)
            if start >= 0:
                events += self._content(self.buffer[:start])
                self.buffer, self.inside = self.buffer[start + len(TOOL_CALL_BEGIN):], True
                continue
            keep = _partial_suffix(self.buffer, TOOL_CALL_BEGIN)
            events += self._content(self.buffer[:len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return events

    def finish(self) -> list[tuple]:
        """The rest: an unfinished block is content, as the model wrote it."""
        rest = (TOOL_CALL_BEGIN if self.inside else "") + self.buffer
        self.buffer, self.inside = "", False
        return self._content(rest)

    def _content(self, text: str) -> list[tuple]:
        if not text or (self.calls and not text.strip()):
            return []
        return [("content", text)]


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
