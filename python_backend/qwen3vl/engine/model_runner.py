"""The model runner: one batched forward over a step's tokens, against a paged KV pool.

A step is a ragged batch: decodes (one token each) and prefill chunks of any length, flattened
into one row of T tokens ([1, T, H] through the decoder), so the MoE runs over all of them at
once (grouped). Everything that depends on the batch's shape (token ids, MRoPE positions,
KV slots, which rows are visual, attention gather indices and masks, which rows to sample) is
built on the CPU in `prepare` and moved in one go: the forward itself has no host syncs and no
boolean indexing.

Attention, by the model's kernels (`ModelConfig.kernels`, the `kernels` setting):
- "torch" (`PagedAttention`): each layer writes the step's keys and values into their slots of
  the pool, then gathers every sequence's context into a padded [B, Hkv, S_max, D] and runs
  SDPA with a [B, 1, Tq_max, S_max] mask (causal within a chunk, the whole past before it).
- "triton" (`KernelPagedAttention`): kernels/attention.py's store_kv writes the slots and its
  unified paged attention reads each sequence's context straight from the pool through its
  block table, causal from the sequence and query lengths: no gather, no mask tensor, no
  tensor whose shape follows the longest context but the block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import KernelOps, kernel_ops
from ..model.config import TextConfig
from ..model.text import LanguageModel
from .scheduler import ScheduledSeq


class PagedKVCache:
    """The KV pool: per layer k and v [num_blocks * block_size, Hkv, D]; token slot s of a
    sequence lives at block_table[s // block_size] * block_size + s % block_size. Hkv:
    `num_kv_heads`, the KV heads this process holds (a tensor-parallel rank's; default all)."""

    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device,
                 num_kv_heads: int | None = None):
        shape = (num_blocks * block_size, num_kv_heads or cfg.num_key_value_heads, cfg.head_dim)
        # empty, not zeros: untouched pages cost nothing until a block is used
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(cfg: TextConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * (num_kv_heads or cfg.num_key_value_heads) * cfg.head_dim * element


@dataclass
class AttentionMetadata:
    """Index tensors of one step (B sequences, T tokens; Tq_max / S_max: the longest chunk and
    context in the step). The torch path reads the gather fields, the kernels the lengths and
    block tables; the fields the other path would read are None."""
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes in the pool
    max_query_len: int          # Tq_max (a host int: shapes only, never read on the device)
    # -- the torch path (gather + SDPA)
    q_index: torch.Tensor | None = None    # [B, Tq_max] int64: token row of each sequence's query i (pad: 0)
    kv_index: torch.Tensor | None = None   # [B, S_max] int64: pool slot of each sequence's context token j (pad: 0)
    mask: torch.Tensor | None = None       # [B, 1, Tq_max, S_max] bool: query i sees key j
    out_index: torch.Tensor | None = None  # [T] int64: row of [B * Tq_max] holding token t's output
    # -- the kernels (kernels/attention.py)
    cu_seqlens_q: torch.Tensor | None = None  # [B + 1] int32: sequence b's queries are rows [cu[b], cu[b+1])
    seq_lens: torch.Tensor | None = None      # [B] int32: context length, the step's tokens included
    block_table: torch.Tensor | None = None   # [B, max blocks in the step] int32 (pad: 0)

    def to(self, device) -> "AttentionMetadata":
        return AttentionMetadata(**{name: (value.to(device, non_blocking=True) if isinstance(value, torch.Tensor)
                                           else value) for name, value in self.__dict__.items()})


class PagedAttention:
    """The `cache` a step's forward attends through (see LanguageModel.forward)."""

    def __init__(self, kv: PagedKVCache, meta: AttentionMetadata):
        self.kv, self.meta = kv, meta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, Hq, T, D], k and v [1, Hkv, T, D] of the step's tokens -> [1, T, Hq * D]."""
        m = self.meta
        k_pool, v_pool = self.kv.k[layer], self.kv.v[layer]
        k_pool.index_copy_(0, m.slot_mapping, k[0].transpose(0, 1))   # [T, Hkv, D] into their slots
        v_pool.index_copy_(0, m.slot_mapping, v[0].transpose(0, 1))
        # index_select on dim 0 copies whole rows; advanced indexing (pool[kv_index]) goes
        # element by element on the CPU, about 5x slower (it was most of a decode step).
        b, s_max = m.kv_index.shape
        flat = m.kv_index.view(-1)
        keys = k_pool.index_select(0, flat).view(b, s_max, *k_pool.shape[1:]).transpose(1, 2)  # [B, Hkv, S_max, D]
        values = v_pool.index_select(0, flat).view(b, s_max, *v_pool.shape[1:]).transpose(1, 2)
        tq = m.q_index.shape[1]
        queries = q[0].transpose(0, 1).index_select(0, m.q_index.view(-1))   # [B * Tq_max, Hq, D]
        queries = queries.view(b, tq, *queries.shape[1:]).transpose(1, 2)    # [B, Hq, Tq_max, D]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=m.mask, enable_gqa=True)
        hq, d = out.shape[1], out.shape[3]
        return out.transpose(1, 2).reshape(b * tq, hq * d).index_select(0, m.out_index)[None]  # [1, T, Hq * D]


class KernelPagedAttention:
    """The `cache` a step's forward attends through with the OpenAI Triton kernels: store_kv
    into the slots, then unified paged attention over the block tables (kernels/attention.py,
    after vLLM's unified attention). Same interface and shapes as PagedAttention."""

    def __init__(self, kv: PagedKVCache, meta: AttentionMetadata, ops: KernelOps):
        self.kv, self.meta, self.ops = kv, meta, ops

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, Hq, T, D], k and v [1, Hkv, T, D] of the step's tokens -> [1, T, Hq * D]."""
        m = self.meta
        k_pool, v_pool = self.kv.k[layer], self.kv.v[layer]
        self.ops.store_kv(k[0].transpose(0, 1), v[0].transpose(0, 1), k_pool, v_pool, m.slot_mapping)
        queries = q[0].transpose(0, 1)                                        # [T, Hq, D], last dim contiguous
        out = self.ops.paged_attention(queries, k_pool, v_pool, m.cu_seqlens_q, m.seq_lens, m.block_table,
                                       self.kv.block_size, queries.shape[-1] ** -0.5,
                                       max_query_len=m.max_query_len)        # [T, Hq, D]
        return out.reshape(1, out.shape[0], -1)                              # [1, T, Hq * D]


@dataclass
class StepInputs:
    """One step's forward inputs (CPU tensors until `to`)."""
    input_ids: torch.Tensor       # [1, T] int64
    positions: torch.Tensor       # [3, 1, T] int64 (t/h/w)
    visual_index: torch.Tensor    # [Nv] int64: token rows that are visual
    visual_embeds: torch.Tensor   # [Nv, H]
    deepstack_embeds: torch.Tensor  # [L, Nv, H]
    logits_rows: torch.Tensor     # [Bs] int64: the rows whose logits are sampled
    attention: AttentionMetadata

    def to(self, device) -> "StepInputs":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return StepInputs(move(self.input_ids), move(self.positions), move(self.visual_index), move(self.visual_embeds),
                          move(self.deepstack_embeds), move(self.logits_rows), self.attention.to(device))


class ModelRunner:
    """Runs a step's batch through the model over the paged KV pool, with the attention path of
    `kernels` ("torch" or "triton", as kernels.resolve_kernels gives; the MoE's comes with the
    model)."""

    def __init__(self, model: LanguageModel, kv: PagedKVCache, deepstack_layers: int, kernels: str = "torch"):
        self.model, self.kv, self.deepstack_layers, self.kernels = model, kv, deepstack_layers, kernels
        self.ops = kernel_ops(kernels) if kernels != "torch" else None
        w = model.embed_tokens.weight
        self.device, self.dtype, self.hidden = w.device, w.dtype, w.shape[1]
        # pure-decode steps over static buffers (CUDA graphs): engine/graph_runner.py sets it
        self.decode = None

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        bs = self.kv.block_size
        ids, positions, slots, visual_index, visual_embeds, deepstack_embeds, logits_rows = [], [], [], [], [], [], []
        q_rows, kv_slots, q_lens, ctx_lens = [], [], [], []
        row = 0
        for s in batch:
            seq, n, start, end = s.seq, s.num_tokens, s.start, s.end
            if start < seq.prompt_len:  # a prefill chunk
                ids.append(seq.prompt.input_ids[start:end].numpy())
                positions.append(seq.prompt.positions[:, start:end].numpy())
                v0, v1 = int(seq.visual_rows_before[start]), int(seq.visual_rows_before[end])
                if v1 > v0:  # the chunk may cut through an image: its rows sliced to match
                    mask = seq.prompt.visual_mask[start:end].numpy()
                    visual_index.append(row + np.flatnonzero(mask))
                    visual_embeds.append(seq.features.visual_embeds[v0:v1])
                    deepstack_embeds.append(seq.features.deepstack_embeds[:, v0:v1])
            else:  # a decode: the last generated token, at its own position on all three streams
                ids.append(np.array(seq.output_ids[-1:], dtype=np.int64))
                positions.append(np.full((3, 1), start + seq.prompt.rope_delta, dtype=np.int64))
            table = np.asarray(seq.block_table, dtype=np.int64)
            context = np.arange(end, dtype=np.int64)
            ctx_slots = table[context // bs] * bs + context % bs
            slots.append(ctx_slots[start:end])
            kv_slots.append(ctx_slots)
            q_rows.append(np.arange(row, row + n, dtype=np.int64))
            q_lens.append(n)
            ctx_lens.append(end)
            row += n
            if s.samples:
                logits_rows.append(row - 1)
        slot_mapping = torch.from_numpy(np.concatenate(slots))
        if self.kernels == "torch":
            attention = self._gather_metadata(slot_mapping, q_rows, kv_slots, q_lens, ctx_lens, row)
        else:
            attention = self._kernel_metadata(slot_mapping, batch, q_lens, ctx_lens)
        h, layers = self.hidden, self.deepstack_layers
        return StepInputs(
            input_ids=torch.from_numpy(np.concatenate(ids))[None],
            positions=torch.from_numpy(np.concatenate(positions, axis=1))[:, None],
            visual_index=torch.from_numpy(np.concatenate(visual_index) if visual_index else np.zeros(0, np.int64)),
            visual_embeds=torch.cat(visual_embeds) if visual_embeds else torch.empty(0, h, dtype=self.dtype),
            deepstack_embeds=(torch.cat(deepstack_embeds, dim=1) if deepstack_embeds
                              else torch.empty(layers, 0, h, dtype=self.dtype)),
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64),
            attention=attention,
        )

    @staticmethod
    def _gather_metadata(slot_mapping: torch.Tensor, q_rows: list, kv_slots: list, q_lens: list[int],
                         ctx_lens: list[int], num_tokens: int) -> AttentionMetadata:
        """The torch path's gather indices and mask: [B, Tq_max] queries, [B, S_max] keys."""
        b, tq_max, s_max = len(q_lens), max(q_lens), max(ctx_lens)
        q_index = np.zeros((b, tq_max), dtype=np.int64)
        kv_index = np.zeros((b, s_max), dtype=np.int64)
        mask = np.zeros((b, 1, tq_max, s_max), dtype=bool)
        out_index = np.empty(num_tokens, dtype=np.int64)
        keys = np.arange(s_max)
        for i, (rows_i, slots_i, n, ctx) in enumerate(zip(q_rows, kv_slots, q_lens, ctx_lens)):
            q_index[i, :n] = rows_i
            kv_index[i, :ctx] = slots_i
            # query j sits at position ctx - n + j: it sees keys up to there
            mask[i, 0, :n] = keys[None, :] <= (ctx - n + np.arange(n))[:, None]
            mask[i, 0, n:, 0] = True  # padding queries see one key (no all-masked rows: no NaN)
            out_index[rows_i] = i * tq_max + np.arange(n)
        return AttentionMetadata(slot_mapping, tq_max, q_index=torch.from_numpy(q_index),
                                 kv_index=torch.from_numpy(kv_index), mask=torch.from_numpy(mask),
                                 out_index=torch.from_numpy(out_index))

    def _kernel_metadata(self, slot_mapping: torch.Tensor, batch: list[ScheduledSeq], q_lens: list[int],
                         ctx_lens: list[int]) -> AttentionMetadata:
        """The kernels' lengths and block tables: cu_seqlens_q [B + 1], seq_lens [B], and the
        blocks of each sequence's context [B, max blocks in the step] (rows padded with 0)."""
        bs = self.kv.block_size
        widths = [-(-ctx // bs) for ctx in ctx_lens]
        table = np.zeros((len(batch), max(widths)), dtype=np.int32)
        for i, (s, width) in enumerate(zip(batch, widths)):
            table[i, :width] = s.seq.block_table[:width]
        cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu[1:])
        return AttentionMetadata(slot_mapping, max(q_lens), cu_seqlens_q=torch.from_numpy(cu),
                                 seq_lens=torch.tensor(ctx_lens, dtype=torch.int32), block_table=torch.from_numpy(table))

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Run one step; logits [Bs, V] fp32 of the sequences that sample, in batch order."""
        if self.decode is not None and self.decode.fits(batch):
            return self.decode.execute(batch)
        step = self.prepare(batch).to(self.device)
        x = self.model.embed_rows(step.input_ids, step.visual_index, step.visual_embeds)
        cache = (PagedAttention(self.kv, step.attention) if self.ops is None
                 else KernelPagedAttention(self.kv, step.attention, self.ops))
        return self.model(x, step.positions, cache,
                          visual_index=step.visual_index, deepstack_embeds=step.deepstack_embeds,
                          logits_rows=step.logits_rows)[0]
