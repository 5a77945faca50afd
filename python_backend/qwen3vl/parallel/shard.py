"""Which part of the language model one tensor-parallel rank holds, and the collectives its
layers call (torch.distributed's default group). A leaf: it imports torch and errors only, so
the model (model/text.py, model/checkpoint.py) can import it.

The layout follows vLLM's Qwen3-MoE model (qwen3_moe.py: QKVParallelLinear, RowParallelLinear,
FusedMoE; VocabParallelEmbedding, ParallelLMHead) and nano-vllm's layers:

- attention: query heads split; KV heads split while N <= KV heads, replicated beyond (rank r
  uses KV head r * KV // N); q_norm / k_norm (per head) replicated; one all-reduce after o_proj;
- MoE with expert parallel: each rank owns E / N whole experts, the router is replicated, every
  rank routes every token and computes its own experts' share; one all-reduce;
- MoE without it: every expert's intermediate size split (gate / up rows, down columns);
  one all-reduce;
- embedding and LM head split by vocabulary (padded to a multiple of N): the embedding masks
  ids outside its rows and all-reduces, the head's logits are gathered to rank 0;
- norms replicated.

Hidden states are replicated on every rank between layers; partial sums exist only inside a
layer, up to its all-reduce. Visual rows and deepstack rows are added to the replicated
hidden states, so each rank adds them once to its own copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InvalidInput

FP8_BLOCK = 128   # the block-FP8 scale tiles (model/fp8.py); native kernels need splits on them
SKIP = "skip"     # a tensor this rank does not hold at all (another rank's experts)


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world_size` (1: one process, nothing split, no collective)."""

    rank: int = 0
    world_size: int = 1
    expert_parallel: bool = False
    vocab_parallel: bool = True   # False: embedding and LM head whole on every rank (measured: docs/tensor-parallel.md)

    # ---- sizes (the text config's fields; cfg: model.config.TextConfig)
    def q_heads(self, cfg) -> int:
        return cfg.num_attention_heads // self.world_size

    def kv_heads(self, cfg) -> int:
        """KV heads this rank holds: KV / N when split, 1 when replicated (N > KV)."""
        return max(1, cfg.num_key_value_heads // self.world_size)

    def kv_head_start(self, cfg) -> int:
        kv = cfg.num_key_value_heads
        if self.world_size <= kv:
            return self.rank * (kv // self.world_size)
        return self.rank * kv // self.world_size

    def experts(self, cfg) -> tuple[int, int]:
        """[first, end) of the experts this rank holds: all of them without expert parallel."""
        if not self.expert_parallel:
            return 0, cfg.num_experts
        n = cfg.num_experts // self.world_size
        return self.rank * n, (self.rank + 1) * n

    def moe_inter(self, cfg) -> int:
        """Each held expert's intermediate size on this rank."""
        i = cfg.moe_intermediate_size
        return i if self.expert_parallel else i // self.world_size

    def dense_inter(self, cfg) -> int:
        return cfg.intermediate_size // self.world_size

    @property
    def splits_vocab(self) -> bool:
        return self.world_size > 1 and self.vocab_parallel

    def vocab_rows(self, cfg) -> int:
        """Rows of the embedding and LM head per rank (vocab padded up to a multiple of N)."""
        return -(-cfg.vocab_size // self.world_size) if self.splits_vocab else cfg.vocab_size

    def vocab_start(self, cfg) -> int:
        return self.rank * self.vocab_rows(cfg) if self.splits_vocab else 0

    # ---- checks
    def check(self, cfg, fp8: bool = False) -> None:
        """Raise InvalidInput naming the size a split of `world_size` ranks does not fit."""
        n = self.world_size
        if n < 1:
            raise InvalidInput(f"tensor_parallel_size must be at least 1, got {n}")
        if n == 1:
            return
        where = f"tensor_parallel_size {n}"
        if cfg.num_attention_heads % n:
            raise InvalidInput(f"{where}: the model's {cfg.num_attention_heads} attention heads do not split "
                               f"evenly; use a size that divides them")
        kv = cfg.num_key_value_heads
        if (kv >= n and kv % n) or (kv < n and n % kv):
            raise InvalidInput(f"{where}: the model's {kv} KV heads neither split evenly (N <= {kv}, dividing it) "
                               f"nor replicate evenly (N a multiple of {kv})")
        moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        if moe_layers and self.expert_parallel and cfg.num_experts % n:
            raise InvalidInput(f"{where} with expert parallel: the model's {cfg.num_experts} experts do not "
                               f"split into whole experts per rank")
        if moe_layers and not self.expert_parallel:
            inter = cfg.moe_intermediate_size
            if inter % n:
                raise InvalidInput(f"{where}: the experts' intermediate size {inter} does not split evenly; "
                                   "use --enable-expert-parallel (whole experts per rank)")
            if fp8 and (inter // n) % FP8_BLOCK:
                raise InvalidInput(f"{where}: each rank's share of the experts' intermediate size, {inter} / {n} = "
                                   f"{inter // n}, is not a multiple of the FP8 checkpoint's {FP8_BLOCK}-wide "
                                   "weight blocks (as vLLM refuses it); use --enable-expert-parallel")
        if len(moe_layers) < cfg.num_hidden_layers and cfg.intermediate_size % n:
            raise InvalidInput(f"{where}: the dense MLP's intermediate size {cfg.intermediate_size} does not split "
                               "evenly")

    # ---- collectives (no-ops in one process)
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; x itself."""
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """logits [..., V/N] of this rank's vocab rows -> [..., V] on rank 0 (the pad cut off),
        None on the other ranks (sampling runs on rank 0 only)."""
        if self.world_size == 1:
            return logits
        if not self.vocab_parallel:
            return logits if self.rank == 0 else None
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[..., :vocab_size] if self.rank == 0 else None

    # ---- what to read of each checkpoint tensor
    def reads(self, name: str, shape: tuple[int, ...], cfg) -> str | list[tuple[slice, ...]] | None:
        """What this rank reads of the language-model tensor `name` (its prefix
        `model.language_model.` removed; `lm_head.weight`) of checkpoint `shape`:
        None (all of it), SKIP (none: another rank's expert), or a list of index tuples whose
        parts are concatenated along the split dimension (`split_dim`). Fused expert tensors come
        in the hub layout [E, H, 2I] / [E, I, H] or transformers' [E, 2I, H] / [E, H, I], told
        apart by shape (model/checkpoint.py)."""
        if self.world_size == 1:
            return None
        h, d = cfg.hidden_size, cfg.head_dim
        full = [slice(None)] * len(shape)

        def cut(dim: int, start: int, size: int) -> list[tuple[slice, ...]]:
            index = list(full)
            index[dim] = slice(start, start + size)
            return [tuple(index)]

        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            if not self.vocab_parallel:
                return None
            start = self.vocab_start(cfg)
            return cut(0, start, max(0, min(self.vocab_rows(cfg), cfg.vocab_size - start)))
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            q = self.q_heads(cfg) * d
            return cut(0, self.rank * q, q)
        if re.search(r"self_attn\.[kv]_proj\.(weight|bias)$", name):
            kv = self.kv_heads(cfg) * d
            return cut(0, self.kv_head_start(cfg) * d, kv)
        if name.endswith("self_attn.o_proj.weight"):
            q = self.q_heads(cfg) * d
            return cut(1, self.rank * q, q)
        m = re.search(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:  # per expert, nn.Linear's [out, in]
            first, end = self.experts(cfg)
            if not first <= int(m.group(1)) < end:
                return SKIP
            if self.expert_parallel:
                return None
            i = self.moe_inter(cfg)
            return cut(1 if m.group(2) == "down_proj" else 0, self.rank * i, i)
        if name.endswith("mlp.experts.gate_up_proj"):
            first, end = self.experts(cfg)
            if self.expert_parallel:
                return cut(0, first, end - first)
            inter, i = cfg.moe_intermediate_size, self.moe_inter(cfg)
            dim = 2 if shape[1] == h else 1      # hub [E, H, 2I], else transformers [E, 2I, H]
            return cut(dim, self.rank * i, i) + cut(dim, inter + self.rank * i, i)   # gate's rows, up's rows
        if name.endswith("mlp.experts.down_proj"):
            first, end = self.experts(cfg)
            if self.expert_parallel:
                return cut(0, first, end - first)
            i = self.moe_inter(cfg)
            return cut(1 if shape[2] == h else 2, self.rank * i, i)   # hub [E, I, H], else [E, H, I]
        if re.search(r"mlp\.(gate_proj|up_proj)\.weight$", name):
            i = self.dense_inter(cfg)
            return cut(0, self.rank * i, i)
        if name.endswith("mlp.down_proj.weight"):
            i = self.dense_inter(cfg)
            return cut(1, self.rank * i, i)
        return None   # norms, the router, o_proj's bias (rank 0 adds it: see model/text.py)

    @staticmethod
    def split_dim(index: tuple[slice, ...]) -> int:
        """The dimension an index tuple of `reads` cuts."""
        return next(i for i, s in enumerate(index) if s != slice(None))


ONE_PROCESS = Shard()
