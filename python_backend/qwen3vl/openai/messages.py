"""OpenAI messages -> the JSON chat the model takes (`text_input`, docs/api.md "Multi-turn chat"):
each `image_url` part becomes a `{"type": "image"}` item and its URL joins `images`, in order,
so images keep their places in the conversation; each `video_url` part (vLLM's) a
`{"type": "video"}` item, its URL joining `videos`; `tool` messages and an assistant's
`tool_calls` ({"function": {"name", "arguments"}}) pass as the template takes them. The
checkpoint's chat template renders it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import invalid, unsupported
from .schemas import Message

# OpenAI roles -> the template's. `developer` is OpenAI's newer name for `system`.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass
class ImageRef:
    url: str
    param: str  # where the request holds it, for error messages: messages[1].content[0].image_url.url


@dataclass
class VideoRef:
    url: str
    param: str  # messages[1].content[0].video_url.url
    fps: float | None = None  # the part's sampling rate (its `fps` extension field)


@dataclass
class Chat:
    messages: list[dict] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    videos: list[VideoRef] = field(default_factory=list)

    def text_input(self) -> str:
        return json.dumps(self.messages, ensure_ascii=False)


def to_chat(messages: list[Message]) -> Chat:
    """Raises APIError (400) naming the field for what the model cannot take: function
    messages, malformed tool calls, images outside user messages, audio and other parts."""
    chat = Chat()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role == "function":
            raise unsupported(f"{where}.role", f"{where}.role: function messages (the legacy function calling) "
                                               "are not supported; use tool messages")
        role = ROLES.get(m.role)
        if role is None:
            raise invalid(f"{where}.role: unknown role {m.role!r}; use system, developer, user, assistant or tool",
                          f"{where}.role")
        if m.function_call is not None:
            raise unsupported(f"{where}.function_call", f"{where}.function_call: the legacy function calling is not "
                                                        "supported; use tool_calls")
        if m.tool_calls and role != "assistant":
            raise invalid(f"{where}.tool_calls: only assistant messages carry tool calls", f"{where}.tool_calls")
        if m.content is None:
            if role != "assistant":
                raise invalid(f"{where}.content: required for {m.role} messages", f"{where}.content")
            content: str | list = ""
        elif isinstance(m.content, str):
            content = _text(m.content, f"{where}.content")
        else:
            content = [_part(chat, role, f"{where}.content[{j}]", part) for j, part in enumerate(m.content)]
        message = {"role": role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [_tool_call(f"{where}.tool_calls[{j}]", call) for j, call in enumerate(m.tool_calls)]
        chat.messages.append(message)
    return chat


def _tool_call(where: str, call) -> dict:
    """An assistant's earlier call, as Qwen's template renders it: the arguments' JSON text as
    the client sends it (OpenAI's shape) goes in as it is."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid(f"{where}.function: required, with a name and arguments", f"{where}.function")
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise invalid(f"{where}.function.arguments: must be a string of JSON", f"{where}.function.arguments")
    return {"type": "function", "function": {"name": _text(function["name"], f"{where}.function.name"),
                                             "arguments": _text(arguments, f"{where}.function.arguments")}}


def _text(text: str, where: str) -> str:
    """`text`, if it is Unicode text at all: JSON's `\\ud800` escapes let a string hold half of
    a surrogate pair, which no UTF-8 text (what the model takes) can. Raises APIError (400)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid(f"{where}: not valid Unicode text: an unpaired surrogate ({text[e.start]!r}) at character "
                      f"{e.start}", where) from None
    return text


def _part(chat: Chat, role: str, where: str, part) -> dict:
    if part.type == "text":
        if part.text is None:
            raise invalid(f"{where}.text: required for a text part", f"{where}.text")
        return {"type": "text", "text": _text(part.text, f"{where}.text")}
    if part.type == "image_url":
        if role != "user":
            raise unsupported(where, f"{where}: images are only taken in user messages")
        if part.image_url is None:
            raise invalid(f"{where}.image_url: required for an image_url part", f"{where}.image_url")
        chat.images.append(ImageRef(part.image_url.url, f"{where}.image_url.url"))
        return {"type": "image"}
    if part.type == "video_url":
        if role != "user":
            raise unsupported(where, f"{where}: videos are only taken in user messages")
        if part.video_url is None:
            raise invalid(f"{where}.video_url: required for a video_url part", f"{where}.video_url")
        chat.videos.append(VideoRef(part.video_url.url, f"{where}.video_url.url", part.video_url.fps))
        return {"type": "video"}
    if part.type in ("input_audio", "audio"):
        raise unsupported(f"{where}.type", f"{where}: audio input is not supported; this model takes text, "
                                           "image_url and video_url parts")
    raise unsupported(f"{where}.type", f"{where}: content parts of type {part.type!r} are not supported; use "
                                       "text, image_url and video_url parts")
