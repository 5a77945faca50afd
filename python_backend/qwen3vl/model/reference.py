"""The language model's unbatched reference path, outside the served model: a static KV cache
and one request's prefill over it. For parity checks against transformers (tests); the engine
attends through engine/model_runner.py's paged cache (bench/gpu_check.py measures the engine).

Shapes: B batch, T new tokens, S cache length, Hq / Hkv query / key-value heads, D head dim,
V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .config import TextConfig
from .text import LanguageModel

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..features import VisualFeatures


class StaticKVCache:
    """Static per-layer cache: k, v [B, Hkv, max_len, D]; `length` tokens are filled. A forward
    attends through it layer by layer (LanguageModel.forward's `cache`); the tokens it adds
    count once its last layer has attended."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: LanguageModel, batch: int, max_len: int) -> "StaticKVCache":
        """A cache in the model's dtype and on its device."""
        w = model.embed_tokens.weight
        return cls(model.cfg, batch, max_len, w.dtype, w.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, T, D], k and v [B, Hkv, T, D] of the new tokens -> attention output
        [B, T, Hq * D]: the new tokens go after the `length` cached ones, causal among
        themselves with a full view of the past. Raises ValueError past `max_len`."""
        b, _, t, _ = q.shape
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]   # [B, Hkv, S, D]
        mask = None
        if t > 1:
            mask = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        if layer == len(self.k) - 1:  # every layer has written the new tokens: they are cached
            self.length = end
        return out.transpose(1, 2).reshape(b, t, -1)


@torch.inference_mode()
def prefill_logits(engine: Engine, text: str, features: VisualFeatures) -> torch.Tensor:
    """All prompt positions' fp32 logits [T, V] in one unbatched prefill over a static cache:
    the request prepared as the engine prepares it (Engine.prepare raises InvalidInput), run
    through the engine's model without its scheduler, paged cache or sampling."""
    prompt = engine.prepare(text, features)
    features = engine.in_prompt_order(prompt, features)
    model, dev = engine.model, engine.config.device
    cache = StaticKVCache.for_model(model, 1, len(prompt.input_ids))
    visual_index = torch.nonzero(prompt.visual_mask).flatten().to(dev)
    x = model.embed_rows(prompt.input_ids[None].to(dev), visual_index, features.visual_embeds.to(dev))
    return model(x, prompt.positions[:, None].to(dev), cache, visual_index=visual_index,
                 deepstack_embeds=features.deepstack_embeds.to(dev), last_only=False)[0]
