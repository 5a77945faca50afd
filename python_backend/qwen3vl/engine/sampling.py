"""Sampling parameters (validated, over the checkpoint's generation_config.json) and sampling a
step's tokens, each sequence with its own parameters and generator."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ..errors import InvalidInput

# A positive temperature below this samples as greedy: dividing logits by it would overflow
# fp32 to inf, and softmax would give NaN (vLLM's _SAMPLING_EPS).
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0            # 0 = no top-k filter
    seed: int | None = None   # None = a fresh random seed
    ignore_eos: bool = False  # generate max_tokens, stop tokens or not (vLLM's ignore_eos; benchmarks)
    # max_tokens is the checkpoint's default, not the request's: a prompt near the end of the
    # context window gets what the window leaves instead of a refusal (as OpenAI's API and vLLM)
    fits_window: bool = False
    stop: tuple[str, ...] = ()  # stop strings: the text ends just before the first (engine/stop.py)

    def validate(self) -> None:
        """Raises InvalidInput naming the parameter that is out of range or not finite."""
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidInput(f"{name} must be a finite number, got {value}")
        if self.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidInput(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidInput(f"seed must be in [0, 2**64), got {self.seed}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise InvalidInput(f"stop[{i}] must be a non-empty string, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


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
    """logits [V] fp32 -> token id (0-d tensor): greedy, or temperature, top-k, top-p."""
    if p.greedy:
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


def sample_batch(logits: torch.Tensor, seqs: list) -> list[int]:
    """logits [B, V] fp32, one row per sequence (each with `.params` and `.generator`) -> token
    ids. Greedy rows take one argmax together; sampled rows each draw from their own generator,
    so a seeded request's text does not depend on its neighbours in the batch."""
    if not seqs:
        return []
    out = logits.argmax(dim=-1)
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            out[i] = sample(logits[i], seq.params, seq.generator)
    return out.tolist()
