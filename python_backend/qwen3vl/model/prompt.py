"""Turn a request's text into token ids and 3-stream MRoPE positions.

The chat template and tokenizer come from the checkpoint (transformers' AutoProcessor), so a
checkpoint's own template is what runs. The language side never sees pixels: each image's
`<|image_pad|>` is expanded to the token count its grid implies, `t*h*w / merge**2`, exactly
what the processor does when it has the pixels.

How a prompt places its images (documented in the README):
- a plain prompt: images go first in one user turn, then the text; or, if the text holds one
  `<image>` marker per image, each image goes where its marker is;
- a chat: `text_input` is a JSON list of messages (`[{"role": "system", "content": "..."},
  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, ...]`);
  the `{"type": "image"}` items take the request's images in order.

Special tokens typed by a user (documented in the README): text inside messages is plain text by
default, so `<|im_end|>` typed in a message is the characters `<`, `|`, `im`, ... and never the
control token (no forged system turn, no stray `<|image_pad|>`). Only the chat template makes
control tokens. `allow_special_tokens=True` (the `allow_special_tokens_in_prompt` setting)
restores what a plain `tokenizer(rendered_text)` does: special-token text anywhere is the token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from ..errors import InvalidInput

IMAGE_MARKER = "<image>"


class PromptError(InvalidInput):
    """A request whose text and images don't fit together; the message says how."""


def build_messages(text: str, num_images: int) -> list[dict]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            messages = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise PromptError(f"text_input starts with '[' but is not a JSON message list: {e}") from None
        except RecursionError:
            raise PromptError("text_input is a JSON message list nested too deeply") from None
        _check_messages(messages, num_images)
        return messages
    parts = text.split(IMAGE_MARKER)
    markers = len(parts) - 1
    if markers == 0:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    elif markers == num_images:
        content = []
        for i, part in enumerate(parts):
            if part:
                content.append({"type": "text", "text": part})
            if i < num_images:
                content.append({"type": "image"})
    else:
        raise PromptError(f"the prompt has {markers} '{IMAGE_MARKER}' markers but the request "
                          f"has {num_images} images; use one marker per image or none")
    return [{"role": "user", "content": content}]


def _check_messages(messages, num_images: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise PromptError("a chat text_input must be a non-empty JSON list of messages")
    slots = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise PromptError(f"message {i}: needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):
            for item in content:
                if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
                    raise PromptError(f"message {i}: content items must be {{'type': 'text'|'image'}}")
                slots += item["type"] == "image"
        elif not isinstance(content, str):
            raise PromptError(f"message {i}: content must be a string or a list of items")
    if slots != num_images:
        raise PromptError(f"the messages have {slots} image items but the request has {num_images} images")


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T] int64, t/h/w streams
    rope_delta: int          # decode position of token at cache index i is i + rope_delta
    visual_mask: torch.Tensor  # [T] bool, True at image tokens
    num_visual_tokens: int


class PromptBuilder:
    def __init__(self, processor, image_token_id: int, spatial_merge_size: int, allow_special_tokens: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
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

    def __call__(self, text: str, image_grid_thw: torch.Tensor) -> Prompt:
        """image_grid_thw [k, 3]: one row per image, in prompt order. Raises PromptError when the
        text and the images do not fit together."""
        counts = (image_grid_thw.prod(-1) // self.merge**2).tolist()
        expanded = self.expanded_ids(text, counts)
        input_ids = torch.tensor(expanded, dtype=torch.long)
        positions = self.mrope_positions(input_ids, image_grid_thw)
        return Prompt(
            input_ids=input_ids,
            positions=positions,
            rope_delta=int(positions.max()) + 1 - len(expanded) if len(expanded) else 0,
            visual_mask=input_ids == self.image_token_id,
            num_visual_tokens=int(sum(counts)),
        )

    def expanded_ids(self, text: str, visual_tokens: list[int]) -> list[int]:
        """The prompt's token ids, each image's placeholder expanded to its `visual_tokens[i]`
        tokens (what `len()` of a prompt is: admission control counts it before any vision work)."""
        ids = self.token_ids(build_messages(text, len(visual_tokens)))
        placeholders = sum(1 for i in ids if i == self.image_token_id)
        if placeholders != len(visual_tokens):
            typed = " ('<|image_pad|>' typed in the text counts while special tokens are allowed)"
            raise PromptError(f"the prompt renders {placeholders} image placeholders for {len(visual_tokens)} "
                              f"images{typed if self.allow_special_tokens else ''}")
        expanded, k = [], 0
        for tok in ids:
            if tok == self.image_token_id:
                expanded.extend([tok] * visual_tokens[k])
                k += 1
            else:
                expanded.append(tok)
        return expanded

    def token_ids(self, messages: list[dict]) -> list[int]:
        """The chat template's rendering of `messages`, tokenized. Unless special tokens are
        allowed, special-token text inside the messages stays plain text: each such string is
        swapped for a private-use sentinel before rendering, the rendering is split at the
        template's own special tokens, and each piece between them is tokenized with
        `split_special_tokens=True` after the swap is undone. The tokenizer itself splits its
        input at special tokens before anything else, so a message without special-token text
        gets exactly the ids of `tokenizer(rendered)`."""
        template = self.processor.apply_chat_template
        if self.allow_special_tokens or not self.specials:
            rendered = template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        sentinel = _unused_char(json.dumps(messages, ensure_ascii=False))
        escaped = [{**m, "content": _map_text(m.get("content"), lambda t: self._escape(t, sentinel))}
                   for m in messages]
        rendered = template(escaped, tokenize=False, add_generation_prompt=True)
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
        """[3, T]: text tokens advance all three streams together; an image's tokens take
        (t, row, col) offsets from where the text left off, and the text after it resumes at
        start + max(rows, cols)."""
        out = torch.empty(3, len(input_ids), dtype=torch.long)
        is_image = (input_ids == self.image_token_id).tolist()
        pos, i, k = 0, 0, 0
        while i < len(is_image):
            if not is_image[i]:
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


def _unused_char(text: str) -> str:
    """A character of Unicode's private use area that `text` does not contain."""
    for code in range(0x100000, 0x10FFFE):
        if chr(code) not in text:
            return chr(code)
    raise PromptError("the prompt uses every private-use character")  # pragma: no cover
