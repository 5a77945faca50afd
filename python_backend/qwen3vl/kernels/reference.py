"""The torch paths: the model's current math (model/text.py, engine/model_runner.py) behind the
kernels' API, so the engine can switch between the two and the tests have an oracle.

No triton here. Shapes: M or T tokens, H hidden, E experts, K top-k, I expert intermediate size,
Hq / Hkv query / key-value heads, D head dim, B sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FAST_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# torch's grouped GEMM on the CPU is slower than a per-expert loop below about this many rows
# (2x at 8 rows, one decode token; slightly faster from 64 rows: `qwen3vl-bench`, R6).
CPU_GROUPED_MIN_ROWS = 64


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """x [S, in] with rows grouped by expert, w [E, in, out], offsets [E] int32 cumulative row
    ends -> [S, out] in x's dtype. torch's grouped GEMM where it takes this device and dtype (no
    host sync) and pays off, else (or with fast=False) one matmul per non-empty group (reads
    offsets on the host)."""
    if fast and _FAST_GROUPED_MM is not None and (
            (x.device.type == "cpu" and x.shape[0] >= CPU_GROUPED_MIN_ROWS) or x.dtype == torch.bfloat16):
        return _FAST_GROUPED_MM(x, w, offs=offsets)
    out = torch.empty(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w[expert], out=out[start:end])
        start = end
    return out


def fused_moe_torch(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, config: dict | None = None, *, small_token: bool | None = None
                    ) -> torch.Tensor:
    """The routed experts of a MoE layer, after routing, in torch: the served model's torch path
    (model/text.py's SparseMoe): slots (token, expert) sorted by expert so that each expert's
    rows are contiguous, one grouped matmul per projection over the hub-layout weights (every
    expert that was hit and no other), SiLU(gate) * up, the weight in the model dtype, one
    fp32-accumulated sum over k per token (one rounding, not k in-place adds).

    x [M, H]; w_gate_up [E, H, 2I] (gate = first I columns, up = last I); w_down [E, I, H];
    topk_weights [M, K] (x's dtype); topk_ids [M, K] int in [0, E). Returns [M, H] in x's dtype.
    config and small_token are the Triton path's tuning knobs, ignored here (same API).
    Raises ValueError on mismatched shapes.
    """
    return sorted_experts(x, w_gate_up, w_down, topk_weights, topk_ids, grouped=True)


def fused_moe_torch_per_expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                               topk_weights: torch.Tensor, topk_ids: torch.Tensor, config: dict | None = None, *,
                               small_token: bool | None = None) -> torch.Tensor:
    """fused_moe_torch with one matmul per hit expert (grouped_mm's loop, never torch's grouped
    GEMM): what qwen3vl-bench measures the grouped path against. Same shapes and errors."""
    return sorted_experts(x, w_gate_up, w_down, topk_weights, topk_ids, grouped=False)


def sorted_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, grouped: bool) -> torch.Tensor:
    """The torch MoE after routing (see fused_moe_torch); grouped: torch's grouped GEMM where it
    pays (grouped_mm's fast path), else one matmul per hit expert."""
    m, h, e, k = check_moe_shapes(x, w_gate_up, w_down, topk_weights, topk_ids)
    sorted_ids, order = torch.sort(topk_ids.flatten())                  # [M*K]
    counts = torch.histc(sorted_ids.float(), bins=e, min=0, max=e - 1)
    offsets = torch.cumsum(counts, 0).to(torch.int32)                   # [E] end row of each expert
    xs = x[order // k]                                                  # [M*K, H]
    gate, up = grouped_mm(xs, w_gate_up, offsets, grouped).chunk(2, dim=-1)  # [M*K, I]
    y = grouped_mm(F.silu(gate) * up, w_down, offsets, grouped)              # [M*K, H]
    y = y * topk_weights.flatten()[order, None]
    out = torch.empty_like(y)
    out[order] = y                                                      # back to (token, k) order
    return out.view(m, k, h).sum(dim=1)


def check_moe_shapes(x, w_gate_up, w_down, topk_weights, topk_ids) -> tuple[int, int, int, int]:
    """(M, H, E, K) of a fused-MoE call; ValueError naming the first mismatch."""
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("fused_moe: x must be [M, H], w_gate_up [E, H, 2I], w_down [E, I, H]")
    m, h = x.shape
    e, _, two_i = w_gate_up.shape
    if w_gate_up.shape[1] != h or two_i % 2 or tuple(w_down.shape) != (e, two_i // 2, h):
        raise ValueError(f"fused_moe: weights {tuple(w_gate_up.shape)} and {tuple(w_down.shape)} do not fit "
                         f"hidden size {h} (want [E, H, 2I] and [E, I, H])")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [M={m}, K]")
    return m, h, e, topk_ids.shape[1]


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write the step's keys and values into their slots of the pool, in place.

    k, v [T, Hkv, D]; k_cache, v_cache [num_slots, Hkv, D]; slot_mapping [T] int64, -1 = skip
    the row (padding). As engine/model_runner.py's index_copy_, without a host sync for the -1
    rows: each one rewrites the slot of the first real row with that row's own values (or, when
    no row is real, slot 0 with what it holds), so duplicate writes carry equal values.
    """
    rows = torch.arange(k.shape[0], device=k.device)
    real = slot_mapping >= 0
    source = torch.where(real, rows, real.to(torch.uint8).argmax())     # first real row (0 if none)
    keep = real[source]
    slots = torch.where(keep, slot_mapping[source], 0)
    for new, cache in ((k, k_cache), (v, v_cache)):
        rows_new = torch.where(keep[:, None, None], new.index_select(0, source), cache.index_select(0, slots))
        cache.index_copy_(0, slots, rows_new)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                          block_size: int, scale: float, *, max_query_len: int | None = None,
                          split_kv: bool | None = None) -> torch.Tensor:
    """Attention of a ragged step over the paged KV pool: the engine's current math (gather
    every sequence's context, SDPA with a causal mask from the lengths).

    q [T, Hq, D] (the step's queries, sequence after sequence); k_cache, v_cache
    [num_blocks * block_size, Hkv, D] already holding the step's keys and values; cu_seqlens_q
    [B+1] int32 (query rows of sequence b: cu[b] .. cu[b+1]); seq_lens [B] int32 (context
    including the new tokens); block_table [B, max_blocks] int32. Query i of a sequence with n
    queries and length s sits at position s - n + i and sees keys 0 .. s - n + i.
    max_query_len: the longest query chunk (a host int the caller knows), bounding the padded
    query tensor; None pads to T (static, no host read). split_kv is the Triton path's knob,
    ignored. Returns [T, Hq, D] in q's dtype. After engine/model_runner.py PagedAttention.attend.
    """
    t, hq, d = q.shape
    b, max_blocks = block_table.shape
    tq = t if max_query_len is None else max_query_len
    s_max = max_blocks * block_size
    dev = q.device
    q_start = cu_seqlens_q[:-1].long()
    q_len = cu_seqlens_q[1:].long() - q_start                                        # [B]
    key_pos = torch.arange(s_max, device=dev)
    slots = block_table.long().clamp(min=0)[:, key_pos // block_size] * block_size + key_pos % block_size
    keys = k_cache.index_select(0, slots.view(-1)).view(b, s_max, *k_cache.shape[1:]).transpose(1, 2)
    values = v_cache.index_select(0, slots.view(-1)).view(b, s_max, *v_cache.shape[1:]).transpose(1, 2)
    # Keys past a sequence's length are masked, but what the gather read there (an unwritten slot
    # of the pool: NaN as often as not) would still poison the row (NaN * 0, NaN - inf): zeroed.
    past = (key_pos >= seq_lens.long()[:, None])[:, None, :, None]                   # [B, 1, S, 1]
    keys, values = keys.masked_fill(past, 0), values.masked_fill(past, 0)
    qi = torch.arange(tq, device=dev)
    rows = (q_start[:, None] + qi).clamp(max=t - 1)                                   # [B, tq]
    queries = q.index_select(0, rows.view(-1)).view(b, tq, hq, d).transpose(1, 2)     # [B, Hq, tq, D]
    q_pos = (seq_lens.long() - q_len)[:, None] + qi                                   # [B, tq]
    mask = (key_pos <= q_pos[..., None]) & (key_pos < seq_lens.long()[:, None, None])
    mask[..., 0] = True  # padding queries see one key (no all-masked row: no NaN); real ones see it anyway
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=True)                              # [B, Hq, tq, D]
    tokens = torch.arange(t, device=dev)
    seq_of = torch.searchsorted(cu_seqlens_q[1:].long(), tokens, right=True)          # [T]
    flat = seq_of * tq + tokens - q_start[seq_of]
    return out.transpose(1, 2).reshape(b * tq, hq, d).index_select(0, flat)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N], weight [N] -> [..., N] in x's dtype: normalise in fp32, cast back to x's
    dtype, then multiply by the weight (model/text.py RMSNorm's order of operations)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., N] (same dtype), weight [N] -> (rms_norm(x + residual), x + residual);
    the sum is rounded to the model dtype first, as the decoder layer's `x = x + attn(...)`."""
    summed = x + residual
    return rms_norm_torch(summed, weight, eps), summed


def silu_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (gate = first I, up = last I) -> SiLU(gate) * up [..., I] in x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope_torch(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then rotary embedding: model/text.py's Attention (q_norm,
    k_norm, apply_rope). q [T, Hq, D], k [T, Hkv, D], q_weight, k_weight [D]; cos, sin [T, D]
    (MRoPE.forward's output for one batch row: the interleaved t/h/w frequencies already
    chosen). Returns (q', k') of the same shapes and dtype."""
    c, s = cos[:, None], sin[:, None]
    out = []
    for x, w in ((q, q_weight), (k, k_weight)):
        x = rms_norm_torch(x, w, eps)
        out.append(x * c + rotate_half(x) * s)
    return out[0], out[1]
