"""Turn a request's text into token ids and 3-stream MRoPE positions.

The chat template and tokenizer come from the checkpoint (transformers' AutoProcessor), so a
checkpoint's own template is what runs. The language side never sees pixels: each image's
`<|image_pad|>` is expanded to the token count its grid implies, `t*h*w / merge**2`, exactly
what the processor does when it has the pixels.

How a prompt places its images and videos (documented in docs/api.md):
- a plain prompt: images go first in one user turn, then videos, then the text; or, if the text
  holds one `<image>` marker per image and one `<video>` marker per video, each goes where its
  marker is;
- a raw prompt (the request parameter `raw_prompt`, what `/v1/completions` sends): the text
  tokenized as it is, no chat template, as vLLM's completions do (special-token text in it is the
  token: the client writes the whole prompt); text only;
- a chat: `text_input` is a JSON list of messages (`[{"role": "system", "content": "..."},
  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, ...]`);
  the `{"type": "image"}` items take the request's images in order, `{"type": "video"}` its videos.

A video's `<|video_pad|>` is expanded as transformers 5.24's processor does: per frame group
(2 frames), `<t seconds>` (the float64 time, one decimal) + `<|vision_start|>` + its tokens +
`<|vision_end|>`, inside the template's own `<|vision_start|>`...`<|vision_end|>`. MRoPE takes
each frame group as an image of one frame. The E->L rows come images' first, then videos';
`Prompt.row_order` puts them in the prompt's order.

Special tokens typed by a user (documented in docs/reliability.md): text inside messages is plain text by
default, so `<|im_end|>` typed in a message is the characters `<`, `|`, `im`, ... and never the
control token (no forged system turn, no stray `<|image_pad|>`). Only the chat template makes
control tokens. `allow_special_tokens=True` (the `allow_special_tokens_in_prompt` setting)
restores what a plain `tokenizer(rendered_text)` does: special-token text anywhere is the token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from ..errors import InvalidInput

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_MARKER_RE = re.compile("(" + re.escape(IMAGE_MARKER) + "|" + re.escape(VIDEO_MARKER) + ")")


class PromptError(InvalidInput):
    """A request whose text and images don't fit together; the message says how."""


def build_messages(text: str, num_images: int, num_videos: int = 0) -> list[dict]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            messages = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise PromptError(f"text_input starts with '[' but is not a JSON message list: {e}") from None
        except RecursionError:
            raise PromptError("text_input is a JSON message list nested too deeply") from None
        _check_messages(messages, num_images, num_videos)
        return messages
    parts = _MARKER_RE.split(text)
    markers = parts[1::2]
    images, videos = markers.count(IMAGE_MARKER), markers.count(VIDEO_MARKER)
    if not markers:
        content = ([{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)]
                   + [{"type": "text", "text": text}])
    elif images == num_images and videos == num_videos:
        content = []
        for i, part in enumerate(parts):
            if i % 2:
                content.append({"type": "image" if part == IMAGE_MARKER else "video"})
            elif part:
                content.append({"type": "text", "text": part})
    elif not videos and not num_videos:
        raise PromptError(f"the prompt has {images} '{IMAGE_MARKER}' markers but the request "
                          f"has {num_images} images; use one marker per image or none")
    else:
        raise PromptError(f"the prompt has {images} '{IMAGE_MARKER}' and {videos} '{VIDEO_MARKER}' markers but the "
                          f"request has {num_images} images and {num_videos} videos; use one marker per image and "
                          "video, or none")
    return [{"role": "user", "content": content}]


def _check_messages(messages, num_images: int, num_videos: int = 0) -> None:
    if not isinstance(messages, list) or not messages:
        raise PromptError("a chat text_input must be a non-empty JSON list of messages")
    slots = videos = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise PromptError(f"message {i}: needs a role of system, user, assistant or tool")
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function", c), dict)
                and isinstance(c.get("function", c).get("name"), str) for c in calls)):
            raise PromptError(f"message {i}: tool_calls are a list of {{'function': {{'name': ..., 'arguments': ...}}}} "
                              "in assistant messages")
        content = m.get("content")
        if isinstance(content, list):
            for item in content:
                if not isinstance(item, dict) or item.get("type") not in ("text", "image", "video"):
                    raise PromptError(f"message {i}: content items must be {{'type': 'text'|'image'|'video'}}")
                slots += item["type"] == "image"
                videos += item["type"] == "video"
        elif not isinstance(content, str):
            raise PromptError(f"message {i}: content must be a string or a list of items")
    if slots != num_images:
        raise PromptError(f"the messages have {slots} image items but the request has {num_images} images")
    if videos != num_videos:
        raise PromptError(f"the messages have {videos} video items but the request has {num_videos} videos")


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T] int64, t/h/w streams
    rope_delta: int          # decode position of token at cache index i is i + rope_delta
    visual_mask: torch.Tensor  # [T] bool, True at image and video tokens
    num_visual_tokens: int
    # The E->L rows (images', then videos') in the order the prompt consumes them: [N] int64,
    # None when that is their order already (no video).
    row_order: torch.Tensor | None = None
    # Each run of visual tokens (an image, or one frame group of a video) in prompt order:
    # (first token, token count, (t, h, w) grid of the run)
    runs: list[tuple[int, int, tuple[int, int, int]]] = field(default_factory=list)


@dataclass(frozen=True)
class VideoLayout:
    """What the prompt needs of one video: tokens per frame group, and each group's time."""
    group_tokens: int
    timestamps: tuple[float, ...]  # float64 seconds, one per frame group


def check_context_window(prompt_tokens: int, max_tokens: int, max_model_len: int,
                         visual_tokens: int | None = None) -> None:
    """Raises PromptError (InvalidInput) when the prompt plus the tokens it may generate exceed
    the context window; `visual_tokens`, when known, is named in the message. The one check
    both the encoder's admission (before vision work) and the engine (at admission) run."""
    total = prompt_tokens + max_tokens
    if total > max_model_len:
        of_them = f", {visual_tokens} of them visual" if visual_tokens is not None else ""
        raise PromptError(f"prompt ({prompt_tokens} tokens{of_them}) + max_tokens ({max_tokens}) = {total} "
                          f"exceeds the context window of {max_model_len} tokens (max_model_len)")


class PromptBuilder:
    def __init__(self, processor, image_token_id: int, spatial_merge_size: int, allow_special_tokens: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
        self.video_token_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.vision_start_id = self.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = self.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.merge = spatial_merge_size
        self.allow_special_tokens = allow_special_tokens
        # The tokenizer's special tokens, longest first (a regex alternation takes the first match).
        self.specials = sorted((t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special),
                               key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")
        # The most UTF-8 bytes one token can stand for (byte-level BPE: one character of a
        # vocabulary entry is one byte): a text longer than max_model_len of these cannot fit.
        self.max_token_bytes = max(len(t) for t in self.tokenizer.get_vocab())

    def check_size(self, text: str, max_model_len: int) -> None:
        """Raises PromptError, before tokenizing, for a text too long to fit the context window
        whatever its tokens."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > max_model_len * self.max_token_bytes:
            raise PromptError(f"text_input is {size} bytes: more than the context window of {max_model_len} "
                              f"tokens (max_model_len) could hold at {self.max_token_bytes} bytes a token")

    def video_layouts(self, video_grid_thw: torch.Tensor | None, video_timestamps: torch.Tensor | None) -> list[VideoLayout]:
        """Each video's layout from its grid row and its groups' timestamps (in order)."""
        if video_grid_thw is None or video_grid_thw.shape[0] == 0:
            return []
        times = [] if video_timestamps is None else video_timestamps.to(torch.float64).tolist()
        groups = int(video_grid_thw[:, 0].sum())
        if len(times) != groups:
            raise PromptError(f"video_timestamps has {len(times)} entries; video_grid_thw has {groups} frame groups")
        layouts, start = [], 0
        for t, h, w in video_grid_thw.tolist():
            layouts.append(VideoLayout(h * w // self.merge**2, tuple(times[start:start + t])))
            start += t
        return layouts

    def __call__(self, text: str, image_grid_thw: torch.Tensor, video_grid_thw: torch.Tensor | None = None,
                 video_timestamps: torch.Tensor | None = None, raw: bool = False, tools: list | None = None) -> Prompt:
        """image_grid_thw [k, 3]: one row per image, in prompt order; video_grid_thw [v, 3] and
        video_timestamps [sum of t] (float64) the same for videos. `raw`: the text is the whole
        prompt, tokenized as it is (no chat template, no images or videos); `tools`: function
        definitions (OpenAI's `tools`) the chat template renders. Raises PromptError when the text
        and the images and videos do not fit together."""
        counts = (image_grid_thw.prod(-1) // self.merge**2).tolist()
        videos = self.video_layouts(video_grid_thw, video_timestamps)
        if raw:
            if counts or videos:
                raise PromptError("a raw prompt (raw_prompt) takes no images or videos")
            ids = torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)
            if len(ids) == 0:
                raise PromptError("a raw prompt (raw_prompt) must hold at least one token")
            if bool(((ids == self.image_token_id) | (ids == self.video_token_id)).any()):
                raise PromptError("a raw prompt (raw_prompt) holds an image or video placeholder token; it takes "
                                  "no images or videos")
            return Prompt(input_ids=ids, positions=self.mrope_positions(ids, torch.empty(0, 3, dtype=torch.long)),
                          rope_delta=0, visual_mask=torch.zeros(len(ids), dtype=torch.bool), num_visual_tokens=0,
                          row_order=None, runs=[])
        expanded, items = self._expand(text, counts, videos, tools)
        input_ids = torch.tensor(expanded, dtype=torch.long)
        # Rows: images' in order, then videos'; runs: each image, each frame group, in prompt order.
        image_rows = [sum(counts[:k]) for k in range(len(counts))]
        video_rows = [sum(counts) + sum(len(v.timestamps) * v.group_tokens for v in videos[:j])
                      for j in range(len(videos))]
        runs, order = [], []
        for kind, k, first in items:
            if kind == "image":
                t, h, w = (int(x) for x in image_grid_thw[k])
                runs.append((first, counts[k], (t, h, w)))
                order.append(torch.arange(image_rows[k], image_rows[k] + counts[k]))
                continue
            v, (_, h, w) = videos[k], (int(x) for x in video_grid_thw[k])
            for g, (start, _) in enumerate(self._groups(first, v)):
                runs.append((start, v.group_tokens, (1, h, w)))
                row = video_rows[k] + g * v.group_tokens
                order.append(torch.arange(row, row + v.group_tokens))
        positions = self.mrope_positions(input_ids, torch.tensor([g for _, _, g in runs], dtype=torch.long).reshape(-1, 3))
        row_order = torch.cat(order) if videos and order else None
        return Prompt(
            input_ids=input_ids,
            positions=positions,
            rope_delta=int(positions.max()) + 1 - len(expanded) if len(expanded) else 0,
            visual_mask=(input_ids == self.image_token_id) | (input_ids == self.video_token_id),
            num_visual_tokens=int(sum(counts) + sum(len(v.timestamps) * v.group_tokens for v in videos)),
            row_order=row_order,
            runs=runs,
        )

    def _groups(self, first: int, video: VideoLayout):
        """(first pad token, timestamp) of each frame group of a video expanded at `first`."""
        pos = first
        for t in video.timestamps:
            pos += len(self.timestamp_ids(t)) + 1  # the timestamp, <|vision_start|>
            yield pos, t
            pos += video.group_tokens + 1          # the pads, <|vision_end|>

    def timestamp_ids(self, seconds: float) -> list[int]:
        """The ids of a frame group's time as the processor writes it: `<{t:.1f} seconds>` of the
        float64 time (plain text between special tokens: tokenized alone, the same ids)."""
        return self.tokenizer(f"<{seconds:.1f} seconds>", add_special_tokens=False)["input_ids"]

    def expanded_ids(self, text: str, visual_tokens: list[int], videos: list[VideoLayout] = (),
                     tools: list | None = None) -> list[int]:
        """The prompt's token ids, each image's placeholder expanded to its `visual_tokens[i]`
        tokens, each video's to its frame groups (what `len()` of a prompt is: admission control
        counts it before any vision work)."""
        return self._expand(text, visual_tokens, list(videos), tools)[0]

    def _expand(self, text: str, visual_tokens: list[int], videos: list[VideoLayout], tools: list | None = None):
        """(expanded ids, [(kind, index, first token)] of each image and video in prompt order).
        A video's `<|video_pad|>` becomes, per frame group, what transformers 5.24's processor
        writes: `<t seconds><|vision_start|>` + pads + `<|vision_end|>`; the template's own
        `<|vision_start|>`/`<|vision_end|>` around it stay."""
        ids = self.token_ids(build_messages(text, len(visual_tokens), len(videos)), tools)
        placeholders = sum(1 for i in ids if i == self.image_token_id)
        video_placeholders = sum(1 for i in ids if i == self.video_token_id)
        typed = " ('<|image_pad|>' typed in the text counts while special tokens are allowed)"
        if placeholders != len(visual_tokens):
            raise PromptError(f"the prompt renders {placeholders} image placeholders for {len(visual_tokens)} "
                              f"images{typed if self.allow_special_tokens else ''}")
        if video_placeholders != len(videos):
            raise PromptError(f"the prompt renders {video_placeholders} video placeholders for {len(videos)} "
                              f"videos{typed.replace('image', 'video') if self.allow_special_tokens else ''}")
        expanded, items, k, j = [], [], 0, 0
        for tok in ids:
            if tok == self.image_token_id:
                items.append(("image", k, len(expanded)))
                expanded.extend([tok] * visual_tokens[k])
                k += 1
            elif tok == self.video_token_id:
                items.append(("video", j, len(expanded)))
                for t in videos[j].timestamps:
                    expanded += self.timestamp_ids(t)
                    expanded.append(self.vision_start_id)
                    expanded.extend([tok] * videos[j].group_tokens)
                    expanded.append(self.vision_end_id)
                j += 1
            else:
                expanded.append(tok)
        return expanded, items

    def token_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """The chat template's rendering of `messages` (and `tools`, if any), tokenized. Unless special tokens are
        allowed, special-token text inside the messages stays plain text: each such string is
        swapped for a private-use sentinel before rendering, the rendering is split at the
        template's own special tokens, and each piece between them is tokenized with
        `split_special_tokens=True` after the swap is undone. The tokenizer itself splits its
        input at special tokens before anything else, so a message without special-token text
        gets exactly the ids of `tokenizer(rendered)`. Tool definitions and tool calls are
        escaped the same way, every string in them."""
        template = self.processor.apply_chat_template
        extra = {"tools": tools} if tools else {}
        if self.allow_special_tokens or not self.specials:
            rendered = template(messages, tokenize=False, add_generation_prompt=True, **extra)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        sentinel = _unused_char(json.dumps([messages, tools], ensure_ascii=False))
        escape = lambda t: self._escape(t, sentinel)  # noqa: E731
        escaped = [{**m, "content": _map_text(m.get("content"), escape),
                    **({"tool_calls": _map_strings(m["tool_calls"], escape)} if m.get("tool_calls") else {})}
                   for m in messages]
        if tools:
            extra = {"tools": _map_strings(tools, escape)}
        rendered = template(escaped, tokenize=False, add_generation_prompt=True, **extra)
        ids: list[int] = []
        for i, piece in enumerate(self._special_re.split(rendered)):
            if i % 2:  # a special token the template wrote
                ids.append(self.tokenizer.convert_tokens_to_ids(piece))
            elif piece:
                plain = self._unescape(piece, sentinel)
                ids += self.tokenizer(plain, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids

    def _escape(self, text: str, sentinel: str) -> str:
        return self._special_re.sub(lambda m: sentinel + chr(0xF0000 + self.specials.index(m.group(0))), text)

    def _unescape(self, text: str, sentinel: str) -> str:
        return re.sub(re.escape(sentinel) + "(.)", lambda m: self.specials[ord(m.group(1)) - 0xF0000], text)

    def mrope_positions(self, input_ids: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """[3, T]: text tokens advance all three streams together; each run of visual tokens (an
        image, or one frame group of a video: `grids` has one (t, h, w) row per run, in prompt
        order) takes (t, row, col) offsets from where the text left off, and the text after it
        resumes at start + max(rows, cols). A video's frame groups are runs of (1, h, w), as
        transformers' get_rope_index splits video_grid_thw: time lives in the timestamp text."""
        out = torch.empty(3, len(input_ids), dtype=torch.long)
        is_visual = ((input_ids == self.image_token_id) | (input_ids == self.video_token_id)).tolist()
        pos, i, k = 0, 0, 0
        while i < len(is_visual):
            if not is_visual[i]:
                out[:, i] = pos
                pos += 1
                i += 1
                continue
            t, h, w = (int(v) for v in grids[k])
            h, w = h // self.merge, w // self.merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            n = t * h * w
            out[:, i:i + n] = torch.stack([tt, hh, ww]).reshape(3, -1) + pos
            pos += max(h, w)
            i += n
            k += 1
        return out


def _map_text(content, fn):
    """`content` (a string or a list of items) with `fn` applied to every text in it."""
    if isinstance(content, str):
        return fn(content)
    if isinstance(content, list):
        return [{**item, "text": fn(item["text"])} if item.get("type") == "text" and isinstance(item.get("text"), str)
                else item for item in content]
    return content


def _map_strings(value, fn):
    """`value` (JSON-like: dicts, lists, strings, numbers) with `fn` applied to every string in
    it, keys included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in value.items()}
    return value


def _unused_char(text: str) -> str:
    """A character of Unicode's private use area that `text` does not contain."""
    for code in range(0x100000, 0x10FFFE):
        if chr(code) not in text:
            return chr(code)
    raise PromptError("the prompt uses every private-use character")  # pragma: no cover
