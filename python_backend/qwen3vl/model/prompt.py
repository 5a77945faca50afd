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
"""

from __future__ import annotations

import json
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
    def __init__(self, processor, image_token_id: int, spatial_merge_size: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
        self.merge = spatial_merge_size

    def __call__(self, text: str, image_grid_thw: torch.Tensor) -> Prompt:
        """image_grid_thw [k, 3]: one row per image, in prompt order."""
        messages = build_messages(text, int(image_grid_thw.shape[0]))
        rendered = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        placeholders = sum(1 for i in ids if i == self.image_token_id)
        if placeholders != image_grid_thw.shape[0]:
            raise PromptError(f"the prompt text renders {placeholders} image placeholders for "
                              f"{image_grid_thw.shape[0]} images (is '<|image_pad|>' typed in the text?)")
        counts = (image_grid_thw.prod(-1) // self.merge**2).tolist()
        expanded, k = [], 0
        for tok in ids:
            if tok == self.image_token_id:
                expanded.extend([tok] * counts[k])
                k += 1
            else:
                expanded.append(tok)
        input_ids = torch.tensor(expanded, dtype=torch.long)
        positions = self.mrope_positions(input_ids, image_grid_thw)
        return Prompt(
            input_ids=input_ids,
            positions=positions,
            rope_delta=int(positions.max()) + 1 - len(expanded) if len(expanded) else 0,
            visual_mask=input_ids == self.image_token_id,
            num_visual_tokens=int(sum(counts)),
        )

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
