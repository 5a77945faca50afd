"""Prefix (KV) cache: a repeated image, system prompt or conversation is not prefilled again.

A prompt is prefilled in segments that end after each image's visual tokens and after each
turn (`<|im_end|>`, merged greedily so a segment has at least `min_tokens`). The KV of every
segment but the last is kept, keyed by a hash chained over the segments up to it: their token
ids, their MRoPE positions and the exact bytes of the visual embeddings and deepstack rows in
them. A later prompt that starts with the same segments restores their KV and prefills only
the rest.

Every prompt, cached or not, is prefilled in the same segments (the cut points depend on the
prompt alone), so a hit computes bit for bit the logits a miss would: the segments after the
restored ones see the same KV and run the same shapes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from cachetools import LRUCache

from ..model.prompt import Prompt
from ..tensors import raw_bytes
from ..model.vision import VisualFeatures


@dataclass(frozen=True)
class Segment:
    """Prompt tokens [start, end), visual rows [v_start, v_end) of the request's features, and
    the chained key of the prompt up to `end`."""
    start: int
    end: int
    v_start: int
    v_end: int
    key: bytes


def cut_points(prompt: Prompt, turn_end_id: int | None, min_tokens: int) -> list[int]:
    """Segment ends: after each run of visual tokens (always), after each turn end that closes a
    segment of at least `min_tokens`; the prompt's end last."""
    n = len(prompt.input_ids)
    visual = prompt.visual_mask
    image_ends = set((torch.nonzero(visual[:-1] & ~visual[1:]).flatten() + 1).tolist()) if n > 1 else set()
    turn_ends = set()
    if turn_end_id is not None:
        turn_ends = set((torch.nonzero(prompt.input_ids == turn_end_id).flatten() + 1).tolist())
    ends, last = [], 0
    for end in sorted(image_ends | turn_ends):
        if end < n and (end in image_ends or end - last >= min_tokens):
            ends.append(end)
            last = end
    return ends + [n]


def segments(prompt: Prompt, features: VisualFeatures, turn_end_id: int | None, min_tokens: int) -> list[Segment]:
    out, start, v_start = [], 0, 0
    key = b"qwen3vl-prefix-v1"
    for end in cut_points(prompt, turn_end_id, min_tokens):
        v_end = v_start + int(prompt.visual_mask[start:end].sum())
        h = hashlib.blake2b(key, digest_size=20)
        h.update(raw_bytes(prompt.input_ids[start:end]))
        h.update(raw_bytes(prompt.positions[:, start:end]))
        if v_end > v_start:
            h.update(raw_bytes(features.visual_embeds[v_start:v_end]))
            h.update(raw_bytes(features.deepstack_embeds[:, v_start:v_end]))
        key = h.digest()
        out.append(Segment(start, end, v_start, v_end, key))
        start, v_start = end, v_end
    return out


class PrefixCache:
    """Segment KV blocks [layers, 2, kv_heads, tokens, D], LRU, bounded in bytes. Used from the
    engine's one worker thread only."""

    def __init__(self, max_bytes: int, turn_end_id: int | None = None, min_tokens: int = 32):
        self.turn_end_id, self.min_tokens = turn_end_id, min_tokens
        self.blocks: LRUCache = LRUCache(maxsize=max_bytes, getsizeof=lambda t: t.numel() * t.element_size())

    @property
    def bytes(self) -> int:
        """Bytes of KV held now."""
        return int(self.blocks.currsize)

    @property
    def max_bytes(self) -> int:
        return int(self.blocks.maxsize)

    def segments(self, prompt: Prompt, features: VisualFeatures) -> list[Segment]:
        return segments(prompt, features, self.turn_end_id, self.min_tokens)

    def lookup(self, segs: list[Segment]) -> list[torch.Tensor]:
        """KV blocks of the longest run of leading segments that are cached, never the last
        segment (its logits are needed)."""
        found = []
        for seg in segs[:-1]:
            block = self.blocks.get(seg.key)  # a hit becomes the most recently used
            if block is None:
                break
            found.append(block)
        return found

    def put(self, key: bytes, block: torch.Tensor) -> None:
        if key not in self.blocks and self.blocks.getsizeof(block) <= self.blocks.maxsize:
            self.blocks[key] = block
