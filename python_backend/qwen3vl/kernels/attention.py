"""Paged attention in Triton, shaped like vLLM's unified attention: one kernel for a ragged step
of prefill chunks (with or without a cached prefix) and decodes, straight from the block table.

The pool is the engine's: per layer k, v [num_blocks * block_size, Hkv, D]; token position p of
sequence b lives in slot block_table[b, p // block_size] * block_size + p % block_size.

One program handles BLOCK_M = 16 rows of (query token, q head of one KV group) -- GQA packing:
the group's heads share every K/V tile it loads. The grid is (T // BLOCK_Q + B, Hkv), an upper
bound that does not depend on the lengths; a program finds its sequence by binary search over
cu_seqlens_q and exits when its query block is past the sequence's end. Causality comes from the
lengths (query i of a sequence with n queries and length s sits at position s - n + i), with no
mask tensor; softmax is online, in fp32, in the exp2 domain.

The split-KV variant (vLLM's 3D kernel) cuts each sequence's keys into NUM_SEGMENTS segments,
one program each, and a second kernel merges the partial results by log-sum-exp: more programs
for a small decode batch with long contexts. Which one runs is decided from the batch's shape
alone (should_split_kv), never from the lengths, so a captured CUDA graph stays valid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_device, dot_options

LOG2E = 1.4426950408889634
NUM_SEGMENTS = 16            # vLLM's NUM_PAR_SOFTMAX_SEGMENTS
SPLIT_KV_MIN_PROGRAMS = 128  # split while B * Hkv programs would not fill this (vLLM's MIN_LAUNCH_GRID_SIZE_2D)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_kc, stride_kch, stride_vc, stride_vch,
                     HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padding row
        return
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < HKV) & (offs_d < D)
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(k_cache_ptr + slot * stride_kc + offs_h * stride_kch + offs_d, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_vc + offs_h * stride_vch + offs_d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _unit_last(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"attention: a tensor of shape {tuple(t.shape)} has last-dim stride {t.stride(-1)}, not 1")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write the step's keys and values into their slots of the pool, in place.

    k, v [T, Hkv, D]; k_cache, v_cache [num_slots, Hkv, D]; slot_mapping [T] int (int64 as the
    engine's), -1 = skip the row (padding in a captured batch). Raises ValueError on mismatched
    shapes, a last dim that is not contiguous, or a device Triton cannot run on. After vLLM's
    reshape_and_cache_flash (its Triton version)."""
    check_device(k, v, k_cache, v_cache, slot_mapping)
    t, hkv, d = k.shape
    if v.shape != k.shape or k_cache.shape[1:] != (hkv, d) or v_cache.shape != k_cache.shape \
            or slot_mapping.shape != (t,):
        raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}, slot_mapping {tuple(slot_mapping.shape)} do not fit")
    _unit_last(k, v, k_cache, v_cache)
    if t == 0:
        return
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                           HKV=hkv, D=d, BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d))


@triton.jit
def _find_sequence(cu_q_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks hold q_block: the last b with cu_q[b] // BLOCK_Q + b <= q_block
    (sequence b's blocks start there: one spare block per sequence keeps the ranges apart)."""
    lo: tl.int32 = 0  # typed: a loop-carried value must not start as a constant
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, seg_acc_ptr, seg_max_ptr, seg_sum_ptr,
                      cu_q_ptr, seq_lens_ptr, block_table_ptr, num_seqs, qk_scale,
                      stride_qt, stride_qh, stride_kc, stride_kh, stride_vc, stride_vh,
                      stride_ot, stride_oh, stride_bt,
                      HQ: tl.constexpr, QPK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE: tl.constexpr,
                      PAGE: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
                      UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    seq = _find_sequence(cu_q_ptr, num_seqs, q_block, BLOCK_Q)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:  # the spare block of this sequence, or past the grid's use
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = local_block * BLOCK_Q + offs_m // QPK        # query index within the sequence's chunk
    head = kv_head * QPK + offs_m % QPK
    row_ok = (offs_m // QPK < BLOCK_Q) & (q_idx < q_len)
    token = (q_start + q_idx).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:  # see common.dot_options
        q = q.to(tl.float32)
    q_pos = context + q_idx                                # absolute position: sees keys 0 .. q_pos

    # keys up to the block's last query (causal), never past the sequence
    kv_end = tl.minimum(seq_len, context + tl.minimum((local_block + 1) * BLOCK_Q, q_len))
    # (x + n - 1) // n rather than tl.cdiv, tl.full rather than tl.zeros: the same code on a GPU,
    # and no nested jit call, which costs the interpreter milliseconds each
    num_tiles = (kv_end + TILE - 1) // TILE
    if NUM_SEGMENTS > 1:
        per_segment = (num_tiles + NUM_SEGMENTS - 1) // NUM_SEGMENTS
        tile_lo = segment * per_segment
        tile_hi = tl.minimum(tile_lo + per_segment, num_tiles)
    else:
        tile_lo = 0
        tile_hi = num_tiles

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, dtype=tl.float32)
    table = block_table_ptr + seq.to(tl.int64) * stride_bt
    for j in range(tile_lo, tile_hi):
        pos = j * TILE + tl.arange(0, TILE)
        pos_ok = pos < kv_end
        page = tl.load(table + pos // PAGE, mask=pos_ok, other=0).to(tl.int64)
        slot = page * PAGE + pos % PAGE
        k = tl.load(k_ptr + slot[None, :] * stride_kc + kv_head * stride_kh + offs_d[:, None],
                    mask=pos_ok[None, :] & d_ok[:, None], other=0.0)                     # [D, TILE]
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale                    # log2 domain
        s = tl.where(pos_ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row that sees nothing yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + slot[:, None] * stride_vc + kv_head * stride_vh + offs_d[None, :],
                    mask=pos_ok[:, None] & d_ok[None, :], other=0.0)                     # [TILE, D]
        p = p.to(v.dtype)  # P rounded to the cache dtype for the tensor cores, as flash attention does
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SEGMENTS > 1:
        # unnormalised partials; an empty segment writes max -inf, sum 0, acc 0
        row = (token * HQ + head) * NUM_SEGMENTS + segment
        tl.store(seg_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(seg_max_ptr + row, m_i, mask=row_ok)
        tl.store(seg_sum_ptr + row, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_segments_kernel(seg_acc_ptr, seg_max_ptr, seg_sum_ptr, out_ptr, stride_ot, stride_oh,
                           HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SEGMENTS: tl.constexpr):
    """out[t, h] = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), M = max_s m_s (log-sum-exp)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = (t * HQ + h) * NUM_SEGMENTS + tl.arange(0, NUM_SEGMENTS)
    m = tl.load(seg_max_ptr + row)
    top = tl.max(m, axis=0)
    scale = tl.exp2(m - tl.where(top > float("-inf"), top, 0.0))
    total = tl.sum(tl.load(seg_sum_ptr + row) * scale, axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.sum(tl.load(seg_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :]) * scale[:, None], axis=0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def should_split_kv(num_tokens: int, num_seqs: int, num_kv_heads: int) -> bool:
    """Split-KV for a pure decode step (one query per sequence) too small to fill the GPU with
    one program per (sequence, KV head): B * Hkv <= 128, i.e. B <= 32 at Hkv = 4. From shapes only
    (a captured graph's batch size fixes the path). vLLM's seq_threshold_3D rule."""
    return num_tokens == num_seqs and num_seqs * num_kv_heads <= SPLIT_KV_MIN_PROGRAMS


def unified_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int, scale: float, *,
                      max_query_len: int | None = None, split_kv: bool | None = None) -> torch.Tensor:
    """Attention of a ragged step over the paged KV pool, in one Triton kernel (plus a merge
    kernel when split).

    q [T, Hq, D] (the step's queries, sequence after sequence; Hq a multiple of Hkv); k_cache,
    v_cache [num_blocks * block_size, Hkv, D] already holding the step's keys and values
    (store_kv); cu_seqlens_q [B+1] int32 with cu[0] = 0 and cu[B] = T; seq_lens [B] int32 (context
    including the new tokens; >= the sequence's query count); block_table [B, max_blocks] int32.
    Query i of a sequence with n queries and length s sits at position s - n + i and sees keys
    0 .. s - n + i. scale: the softmax scale (1 / sqrt(D) for this model).
    max_query_len: unused here (the torch path's bound), same API. split_kv: force the split-KV
    (True) or the single-pass (False) kernel; None decides by should_split_kv.
    Returns [T, Hq, D] in q's dtype. Raises ValueError on mismatched shapes, a non-contiguous
    last dim or a device Triton cannot run on. After vLLM's triton_unified_attention (2D and 3D).
    """
    check_device(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table)
    t, hq, d = q.shape
    b = seq_lens.shape[0]
    hkv = k_cache.shape[1]
    if k_cache.shape[2] != d or v_cache.shape != k_cache.shape or hq % hkv or cu_seqlens_q.shape != (b + 1,) \
            or block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"unified_attention: q {tuple(q.shape)}, caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}, cu_seqlens_q {tuple(cu_seqlens_q.shape)}, seq_lens "
                         f"{tuple(seq_lens.shape)}, block_table {tuple(block_table.shape)} do not fit")
    _unit_last(q, k_cache, v_cache, block_table)
    out = torch.empty_like(q)
    if t == 0 or b == 0:
        return out
    qpk = hq // hkv
    block_m = 16 if qpk <= 16 else triton.next_power_of_2(qpk)
    block_q = block_m // qpk
    block_d = triton.next_power_of_2(d)
    decode = t == b
    split = should_split_kv(t, b, hkv) if split_kv is None else split_kv
    segments = NUM_SEGMENTS if split else 1
    if split:
        seg_acc = torch.empty(t * hq * segments, block_d, dtype=torch.float32, device=q.device)
        seg_max = torch.empty(t * hq * segments, dtype=torch.float32, device=q.device)
        seg_sum = torch.empty_like(seg_max)
    else:
        seg_acc = seg_max = seg_sum = out  # unused pointers
    grid = (t // block_q + b, hkv, segments)
    _attention_kernel[grid](
        q, k_cache, v_cache, out, seg_acc, seg_max, seg_sum, cu_seqlens_q, seq_lens, block_table, b,
        scale * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        HQ=hq, QPK=qpk, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_Q=block_q,
        TILE=16 if decode else 32,  # vLLM: 16 for decode, 32 for prefill at 2-byte dtypes
        PAGE=block_size, NUM_SEGMENTS=segments, **dot_options(q.dtype))
    if split:
        _merge_segments_kernel[(t, hq)](seg_acc, seg_max, seg_sum, out, out.stride(0), out.stride(1),
                                        HQ=hq, D=d, BLOCK_D=block_d, NUM_SEGMENTS=segments)
    return out
