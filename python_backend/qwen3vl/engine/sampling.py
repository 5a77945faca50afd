"""Sampling parameters (validated, over the checkpoint's generation_config.json) and sampling
one token from logits."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import InvalidInput


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0            # 0 = no top-k filter
    seed: int | None = None   # None = a fresh random seed

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidInput(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {self.top_k}")


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


