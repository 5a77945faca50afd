"""Generation: prefill, KV-cached decode, sampling, stop conditions, streamed text.

A simple per-request loop (one request decodes at a time, in arrival order, on one worker
thread); continuous batching replaces the worker later without changing this interface.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .config import ModelConfig
from .prefix_cache import PrefixCache, Segment
from .prompt import Prompt, PromptBuilder
from .text import KVCache, LanguageModel
from .vision import VisualFeatures
from .worker import JobThread

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """Bad input: reported to the client, the server carries on."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0            # 0 = no top-k filter
    seed: int | None = None   # None = a fresh random seed

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")


def generation_defaults(checkpoint) -> tuple[SamplingParams, list[int]]:
    """The checkpoint's generation_config.json: default sampling and the stop token ids."""
    path = checkpoint / "generation_config.json"
    gc = json.loads(path.read_text()) if path.is_file() else {}
    eos = gc.get("eos_token_id", [])
    eos = [eos] if isinstance(eos, int) else list(eos)
    sampling = gc.get("do_sample", False)
    defaults = SamplingParams(
        temperature=float(gc.get("temperature", 1.0)) if sampling else 0.0,
        top_p=float(gc.get("top_p", 1.0)) if sampling else 1.0,
        top_k=int(gc.get("top_k", 0)) if sampling else 0,
    )
    return defaults, eos


class IncrementalDetokenizer:
    """Text deltas from a growing id list. A delta is held back while the decoded text ends in
    an incomplete UTF-8 sequence (U+FFFD), so a character is never split between responses.
    Decoding a window that starts a few tokens back keeps byte-level BPE merges right."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0    # ids before this are already emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        emitted = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(emitted):]
        return ""

    def flush(self) -> str:
        emitted = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(emitted):]


@dataclass
class Step:
    """One streamed piece: new token ids, the text they complete, and (last step) why it ended."""
    token_ids: list[int]
    text: str
    finish_reason: str = ""  # "", "stop", "length" or "cancelled"


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [V] fp32 -> token id (0-d tensor)."""
    if p.temperature == 0:
        return logits.argmax()
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


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
            raise RequestError(f"visual_embeds has shape {tuple(features.visual_embeds.shape)}, "
                               f"image_grid_thw implies ({n}, {h})")
        want = (self.config.deepstack_layers, n, h)
        if n and tuple(features.deepstack_embeds.shape) != want:
            raise RequestError(f"deepstack_embeds has shape {tuple(features.deepstack_embeds.shape)}, expected {want}")
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
            raise RequestError(f"prompt ({len(prompt.input_ids)} tokens) + max_tokens ({params.max_tokens}) "
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


@dataclass
class Job:
    """One request for the worker: what to generate and where its steps go."""
    text: str
    features: VisualFeatures
    params: SamplingParams
    emit: Callable[[Step], None]
    fail: Callable[[Exception], None]
    is_cancelled: Callable[[], bool] = field(default=lambda: False)


class Worker(JobThread[Job]):
    """Runs jobs one after another on a background thread, so a decoupled Triton model's
    execute() returns at once and responses stream from here."""

    def __init__(self, engine: Engine):
        self.engine = engine
        super().__init__("qwen3vl-engine")

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self._generate(job)
            except Exception:  # noqa: BLE001 - a reply that cannot be sent must not stop the worker
                log.exception("could not deliver a response")

    def _generate(self, job: Job) -> None:
        try:
            if job.is_cancelled():
                job.emit(Step([], "", "cancelled"))
                return
            for step in self.engine.generate(job.text, job.features, job.params, job.is_cancelled):
                job.emit(step)
        except Exception as e:  # noqa: BLE001 - every failure goes back to its request
            if not isinstance(e, ValueError):
                log.exception("generation failed")
            job.fail(e)
