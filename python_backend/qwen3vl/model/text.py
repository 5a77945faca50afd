"""The Qwen3-VL-MoE language model: our own compact decoder (checked against transformers).

Module names equal checkpoint names below `model.language_model.` so loading is a copy.
One class serves text-only and multimodal requests; deepstack is an optional argument.
Under tensor parallel (`shard`, parallel/shard.py) each module holds its rank's share and ends
with the one all-reduce its split needs; in one process (the default) nothing changes.

Shapes: B batch, T new tokens, S cache length, H hidden, D head dim, E experts, K top-k,
I expert intermediate size, L deepstack layers, N visual tokens.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import KernelOps, kernel_ops
from ..kernels.reference import fused_moe_torch
from ..parallel.shard import ONE_PROCESS, Shard
from .checkpoint import fuse_per_expert, load_tensors, to_hub_expert_layout
from .config import ModelConfig, TextConfig
from .fp8_linear import Fp8Experts, install_native_fp8, native_fp8_here, runs_natively


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back before the weight: the reference's order of operations.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MRoPE(nn.Module):
    """Interleaved multimodal RoPE: frequency j takes its angle from stream t, h or w by j mod 3
    (h and w only inside their sections), then the usual rotate-half application."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # stream_of[j] in {0: t, 1: h, 2: w} for each of the D/2 frequencies.
        stream_of = torch.zeros(d // 2, dtype=torch.long)
        for stream, offset in ((1, 1), (2, 2)):
            stream_of[offset: cfg.mrope_section[stream] * 3: 3] = stream
        self.register_buffer("stream_of", stream_of, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [3, B, T] -> angles [3, B, T, D/2] -> pick each frequency's stream -> [B, T, D/2]
        angles = positions[..., None].float() * self.inv_freq
        index = self.stream_of.view(1, 1, 1, -1).expand(1, *angles.shape[1:])
        freqs = angles.gather(0, index)[0]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, D]; cos/sin [B, T, D]
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """The rank's query heads and KV heads (all of them in one process); o_proj's partial sums
    are all-reduced."""

    def __init__(self, cfg: TextConfig, layer_idx: int, shard: Shard = ONE_PROCESS):
        super().__init__()
        self.cfg, self.layer_idx, self.shard = cfg, layer_idx, shard
        h, d = cfg.hidden_size, cfg.head_dim
        hq, hkv = shard.q_heads(cfg), shard.kv_heads(cfg)
        self.q_proj = nn.Linear(h, hq * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, hkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, hkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hq * d, h, bias=cfg.attention_bias)  # bias: rank 0's only
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_norm(self.q_proj(x).view(b, t, -1, d)).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_norm(self.k_proj(x).view(b, t, -1, d)).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)               # [B, Hkv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.shard.all_reduce(self.o_proj(cache.attend(self.layer_idx, q, k, v)))  # [B, T, H]


class SparseMoe(nn.Module):
    """Top-k routed experts; weights fused per layer in hub layout (see checkpoint.py). All the
    step's tokens go through at once: the router here, the experts through `fused_moe` (the
    kernels' torch path, grouped by expert, or the OpenAI Triton fused MoE; kernels/).

    Under expert parallel a rank holds E/N whole experts ([E/N, H, 2I]: the shapes the kernels
    see in one process, fewer experts), routes every token with the whole router and gives the
    other ranks' slots weight 0 on its first expert; without it every expert's intermediate
    size is split ([E, H, 2I/N]). Either way one all-reduce sums the ranks' shares."""

    def __init__(self, cfg: TextConfig, fused_moe: Callable = fused_moe_torch, shard: Shard = ONE_PROCESS):
        super().__init__()
        self.cfg, self.shard = cfg, shard
        self.first_expert, end = shard.experts(cfg)
        e, h, i = end - self.first_expert, cfg.hidden_size, shard.moe_inter(cfg)
        self.num_local_experts = e   # this rank's (the bf16 or the Fp8Experts' weights hold as many)
        self.gate = nn.Linear(h, cfg.num_experts, bias=False)  # router, replicated
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))  # [E, H, 2I]
        self.experts.down_proj = nn.Parameter(torch.empty(e, i, h))         # [E, I, H]
        self.fused_moe = fused_moe

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [M, H] -> weights [M, K] (model dtype), expert ids [M, K]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                  # [M, H]
        weights, ids = self.route(x)                                  # [M, K]
        if self.shard.expert_parallel and self.shard.world_size > 1:
            # dense (no boolean indexing, no host sync): other ranks' slots weigh 0 here
            ids = ids - self.first_expert
            mine = (ids >= 0) & (ids < self.num_local_experts)
            weights, ids = torch.where(mine, weights, 0), torch.where(mine, ids, 0)
        if isinstance(self.experts, Fp8Experts):                      # fp8_mode native (model/fp8_linear.py)
            return self.shard.all_reduce(self.experts(x, weights, ids)).view(shape)
        out = self.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)  # [M, H]
        return self.shard.all_reduce(out).view(shape)


class DenseMlp(nn.Module):
    def __init__(self, cfg: TextConfig, shard: Shard = ONE_PROCESS):
        super().__init__()
        self.shard = shard
        h, i = cfg.hidden_size, shard.dense_inter(cfg)
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.shard.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, ops: KernelOps, shard: Shard = ONE_PROCESS):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, shard)
        self.mlp = SparseMoe(cfg, ops.fused_moe, shard) if cfg.is_moe_layer(layer_idx) else DenseMlp(cfg, shard)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """`model.language_model.*` plus `lm_head`. `kernels` ("torch" or "triton", as
    kernels.resolve_kernels gives) chooses the MoE's experts path; attention goes through the
    `cache` each forward is given (the engine's model runner chooses its kernels the same way).
    `shard`: the tensor-parallel rank's share (parallel/shard.py); embedding and LM head are
    split by vocabulary, so the logits exist on rank 0 only (None on the other ranks)."""

    def __init__(self, cfg: TextConfig, kernels: str = "torch", shard: Shard = ONE_PROCESS):
        super().__init__()
        self.cfg, self.kernels, self.shard = cfg, kernels, shard
        self.num_kv_heads = shard.kv_heads(cfg)   # of this rank: the KV pool's heads
        ops = kernel_ops(kernels)
        vocab = shard.vocab_rows(cfg)
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ops, shard) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRoPE(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab, bias=False)

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, shard: Shard = ONE_PROCESS) -> "LanguageModel":
        """The language model (this rank's share of it) from the checkpoint, on config.device.
        Raises InvalidInput when the model does not split into `shard.world_size` ranks,
        ValueError for a checkpoint that does not fit the config."""
        cfg = config.text
        shard.check(cfg, fp8=config.quantization is not None)
        with torch.device("meta"):
            model = cls(cfg, config.kernels, shard)
        prefix = "model.language_model."
        native = native_fp8_here(config, shard)

        def select(name: str, shape: tuple[int, ...]):
            return shard.reads(name.removeprefix(prefix), shape, cfg)

        tensors = load_tensors(config.checkpoint, (prefix, "lm_head."), config.dtype, config.device,
                               name="language model" + (f" rank {shard.rank}/{shard.world_size}"
                                                        if shard.world_size > 1 else ""),
                               select=select if shard.world_size > 1 else None,
                               keep_fp8=runs_natively if native else None)
        if "weight" in tensors:  # `lm_head.weight` lost its prefix
            tensors["lm_head.weight"] = tensors.pop("weight")
        elif config.raw.get("tie_word_embeddings"):
            tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
        if shard.world_size > 1:
            tensors = _local_names_and_pads(tensors, cfg, shard)
        first, end = shard.experts(cfg)
        inter = shard.moe_inter(cfg)    # this rank's experts and their intermediate size
        if native:  # FP8 Linear weights and experts kept FP8: their modules swapped (fp8_linear.py)
            tensors = install_native_fp8(model, tensors, kernel_ops(config.kernels), end - first,
                                         cfg.hidden_size, inter)
        # (with fp8_mode "dequantize" the FP8 tensors came back dequantized)
        tensors = fuse_per_expert(tensors, end - first, cfg.hidden_size, inter)
        tensors = {k: to_hub_expert_layout(k, v, cfg.hidden_size, inter) for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{config.checkpoint}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.rotary = MRoPE(cfg).to(config.device)  # buffers are not in the checkpoint
        return model.eval()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, H]; split by vocabulary, each rank embeds the ids of its
        rows (zeros elsewhere) and the all-reduce completes them (vLLM's VocabParallelEmbedding)."""
        if not self.shard.splits_vocab:
            return self.embed_tokens(input_ids)
        local = input_ids - self.shard.vocab_start(self.cfg)
        mine = (local >= 0) & (local < self.embed_tokens.weight.shape[0])
        x = self.embed_tokens(torch.where(mine, local, 0)) * mine[..., None].to(self.embed_tokens.weight.dtype)
        return self.shard.all_reduce(x)

    def embed_rows(self, input_ids: torch.Tensor, visual_index: torch.Tensor | None = None,
                   visual_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, H] (B = 1 when visual rows are given): the rows
        `visual_index` [N] (image placeholders) replaced by visual_embeds [N, H]."""
        x = self.embed(input_ids)
        if visual_index is not None and visual_embeds is not None and visual_embeds.shape[0]:
            x = x.index_copy(1, visual_index, visual_embeds.to(x.dtype)[None])
        return x

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache,
                visual_index: torch.Tensor | None = None,
                deepstack_embeds: torch.Tensor | None = None,
                logits_rows: torch.Tensor | None = None,
                last_only: bool = True) -> torch.Tensor:
        """x [B, T, H] embeddings of the new tokens, positions [3, B, T] (t/h/w streams); `cache`
        gives each layer's attention through `cache.attend(layer, q, k, v)` and keeps the new
        tokens' K/V (the engine's PagedAttention; model/reference.py's StaticKVCache for parity
        checks). deepstack_embeds [L, N, H] is added after layer i < L at token rows visual_index
        [N] (B = 1), by index, densely: no boolean indexing (a host sync on GPU). Returns fp32
        logits [B, R, V] of the rows `logits_rows` [R], else of the last row (last_only,
        [B, 1, V]) or of every row; under tensor parallel on rank 0 only (None elsewhere)."""
        cos, sin = self.rotary(positions, x.dtype)
        deep = deepstack_embeds is not None and visual_index is not None and deepstack_embeds.shape[1] > 0
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache)
            if deep and i < deepstack_embeds.shape[0]:
                x = x.index_add(1, visual_index, deepstack_embeds[i].to(x.dtype)[None])
        if logits_rows is not None:
            x = x[:, logits_rows]
        elif last_only:
            x = x[:, -1:]
        if self.shard.rank and not self.shard.vocab_parallel:
            return None   # a replicated head: rank 0's logits are the ones sampled
        return self.shard.gather_vocab(self.lm_head(self.norm(x)).float(), self.cfg.vocab_size)


_EXPERT_ID = re.compile(r"(\.experts\.)(\d+)(\.)")


def _local_names_and_pads(tensors: dict[str, torch.Tensor], cfg: TextConfig, shard: Shard
                          ) -> dict[str, torch.Tensor]:
    """A rank's tensors as its modules name and size them: per-expert names renumbered from the
    rank's first expert (expert parallel), the last rank's vocab rows padded with zeros to the
    rows every rank holds, o_proj's bias on rank 0 only (the all-reduce would add it N times)."""
    first, _ = shard.experts(cfg)
    out = {}
    for name, t in tensors.items():
        if first:
            name = _EXPERT_ID.sub(lambda m: f"{m.group(1)}{int(m.group(2)) - first}{m.group(3)}", name)
        if name in ("embed_tokens.weight", "lm_head.weight") and t.shape[0] < shard.vocab_rows(cfg):
            t = F.pad(t, (0, 0, 0, shard.vocab_rows(cfg) - t.shape[0]))
        if name.endswith("self_attn.o_proj.bias") and shard.rank:
            t = torch.zeros_like(t)
        out[name] = t
    return out
