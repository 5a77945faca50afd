"""Generation: prefill (through the prefix cache), KV-cached decode, stop conditions, streamed text.

A simple per-request loop (one request decodes at a time, in arrival order, on one worker
thread); continuous batching replaces the worker later without changing this interface.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import InvalidInput
from ..model.config import ModelConfig
from ..model.prompt import Prompt, PromptBuilder
from ..model.text import KVCache, LanguageModel
from ..model.vision import VisualFeatures
from .detokenize import IncrementalDetokenizer
from .prefix_cache import PrefixCache, Segment
from .sampling import SamplingParams, generation_defaults, sample

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One streamed piece: new token ids, the text they complete, and (last step) why it ended."""
    token_ids: list[int]
    text: str
    finish_reason: str = ""  # "", "stop", "length" or "cancelled"


@dataclass
class PrefillReport:
    """One request's prefill: prompt tokens restored from the prefix cache and computed."""
    cached_tokens: int = 0
    computed_tokens: int = 0


class Engine:
    def __init__(self, config: ModelConfig, model: LanguageModel, prompts: PromptBuilder, tokenizer,
                 defaults: SamplingParams, stop_ids: list[int], max_model_len: int | None = None,
                 prefix_cache: PrefixCache | None = None):
        self.config, self.model, self.prompts, self.tokenizer = config, model, prompts, tokenizer
        self.defaults, self.stop_ids = defaults, set(stop_ids)
        self.max_model_len = max_model_len or config.text.max_position_embeddings
        self.prefix_cache = prefix_cache
        self.on_prefill: Callable[[PrefillReport], None] = lambda report: None

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, max_model_len: int | None = None,
                        prefix_cache_bytes: int = 0) -> "Engine":
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(config.checkpoint)
        model = LanguageModel.from_checkpoint(config)
        defaults, stop_ids = generation_defaults(config.checkpoint)
        if not stop_ids and processor.tokenizer.eos_token_id is not None:
            stop_ids = [processor.tokenizer.eos_token_id]
        prompts = PromptBuilder(processor, config.image_token_id, config.spatial_merge_size)
        prefix_cache = None
        if prefix_cache_bytes > 0:
            turn_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
            prefix_cache = PrefixCache(prefix_cache_bytes, turn_end if isinstance(turn_end, int) else None)
        return cls(config, model, prompts, processor.tokenizer, defaults, stop_ids, max_model_len, prefix_cache)

    def params(self, **given) -> SamplingParams:
        """Request parameters over the checkpoint's defaults; None means not given."""
        values = {k: v for k, v in given.items() if v is not None}
        p = SamplingParams(**{**self.defaults.__dict__, **values})
        p.validate()
        return p

    def prepare(self, text: str, features: VisualFeatures) -> Prompt:
        prompt = self.prompts(text, features.image_grid_thw)
        n, h = prompt.num_visual_tokens, self.config.text.hidden_size
        if tuple(features.visual_embeds.shape) != (n, h):
            raise InvalidInput(f"visual_embeds has shape {tuple(features.visual_embeds.shape)}, "
                               f"image_grid_thw implies ({n}, {h})")
        want = (self.config.deepstack_layers, n, h)
        if n and tuple(features.deepstack_embeds.shape) != want:
            raise InvalidInput(f"deepstack_embeds has shape {tuple(features.deepstack_embeds.shape)}, expected {want}")
        return prompt

    @torch.inference_mode()
    def prefill_logits(self, text: str, features: VisualFeatures) -> torch.Tensor:
        """All prompt positions' logits [T, V] (for parity checks against transformers)."""
        prompt = self.prepare(text, features)
        cache = self.model.new_cache(1, len(prompt.input_ids))
        x, mask, deepstack = self._prefill_inputs(prompt, features)
        return self.model(x, prompt.positions[:, None].to(x.device), cache, mask, deepstack, last_only=False)[0]

    def _prefill(self, prompt: Prompt, features: VisualFeatures, cache: KVCache) -> torch.Tensor:
        """Fill `cache` with the prompt; the last position's logits [1, 1, V]. With a prefix
        cache, segment by segment (see prefix_cache.py), restoring the leading ones it has."""
        n = len(prompt.input_ids)
        if self.prefix_cache is None:
            segs = [Segment(0, n, 0, prompt.num_visual_tokens, b"")]
            restored = []
        else:
            segs = self.prefix_cache.segments(prompt, features)
            restored = self.prefix_cache.lookup(segs)
        for block in restored:
            cache.append(block)
        dev = self.config.device
        for i, seg in enumerate(segs[len(restored):], start=len(restored)):
            ids = prompt.input_ids[None, seg.start:seg.end].to(dev)
            mask = prompt.visual_mask[None, seg.start:seg.end].to(dev)
            visual = deepstack = None
            if seg.v_end > seg.v_start:
                visual = features.visual_embeds[seg.v_start:seg.v_end].to(dev)
                deepstack = features.deepstack_embeds[:, seg.v_start:seg.v_end].to(dev)
            positions = prompt.positions[:, None, seg.start:seg.end].to(dev)
            logits = self.model(self.model.embed(ids, mask, visual), positions, cache, mask, deepstack)
            if self.prefix_cache is not None and i < len(segs) - 1:
                self.prefix_cache.put(seg.key, cache.export(seg.start, seg.end))
        cached = segs[len(restored)].start
        self.on_prefill(PrefillReport(cached_tokens=cached, computed_tokens=n - cached))
        return logits

    def _prefill_inputs(self, prompt: Prompt, features: VisualFeatures):
        dev = self.config.device
        ids, mask = prompt.input_ids[None].to(dev), prompt.visual_mask[None].to(dev)
        visual = features.visual_embeds.to(dev) if prompt.num_visual_tokens else None
        deepstack = features.deepstack_embeds.to(dev) if prompt.num_visual_tokens else None
        return self.model.embed(ids, mask, visual), mask, deepstack

    @torch.inference_mode()
    def generate(self, text: str, features: VisualFeatures, params: SamplingParams,
                 is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        prompt = self.prepare(text, features)
        total = len(prompt.input_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidInput(f"prompt ({len(prompt.input_ids)} tokens) + max_tokens ({params.max_tokens}) "
                               f"= {total} exceeds the model's limit of {self.max_model_len} tokens")
        dev = self.config.device
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=dev)
            generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        cache = self.model.new_cache(1, total)
        logits = self._prefill(prompt, features, cache)
        detok = IncrementalDetokenizer(self.tokenizer)
        for n in range(1, params.max_tokens + 1):
            token = sample(logits[0, -1], params, generator)
            tid = int(token)
            text_piece = detok.push(tid)
            if tid in self.stop_ids:
                yield Step([tid], text_piece + detok.flush(), "stop")
                return
            if n == params.max_tokens:
                yield Step([tid], text_piece + detok.flush(), "length")
                return
            if is_cancelled():
                yield Step([tid], text_piece + detok.flush(), "cancelled")
                return
            yield Step([tid], text_piece)
            pos = torch.full((3, 1, 1), cache.length + prompt.rope_delta, dtype=torch.long, device=dev)
            logits = self.model(self.model.embed(token.view(1, 1)), pos, cache)


