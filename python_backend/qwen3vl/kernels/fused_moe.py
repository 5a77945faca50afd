"""Fused MoE in Triton, shaped like vLLM's fused_moe: align the (token, expert) slots into
per-expert tiles, one grouped GEMM kernel for gate_up and for down, SiLU * up between them, and
a fixed-order reduce over the top-k instead of atomics.

Nothing here reads the device on the host: every buffer has a size fixed by (M, K, E, BLOCK_M),
the kernels find the real extent in device memory (num_tokens_post_padded, expert id -1) and
exit early, so a step can be captured in a CUDA graph. A token's output depends only on its own
row: GEMM tiles multiply rows independently and the reduce sums its k rows in a static order
(with one tile config; configs are chosen by the step's token count, see moe_config).

Weights are the hub layout: w_gate_up [E, H, 2I] (gate = first I columns), w_down [E, I, H];
the kernel takes strides, so a per-expert transposed layout could be passed later.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import moe_config
from .common import check_device, dot_options
from .fusions import silu_mul
from .reference import check_moe_shapes

# vLLM's naive block assignment: with this few slots per expert, sorting costs more than it saves.
SMALL_TOKEN_SPARSITY = 4


def use_small_token_path(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """True when M * K * 4 <= E: most experts get no row, so each (token, expert) slot gets a
    tile of its own and there is no alignment step (vLLM's SPARSITY_FACTOR rule)."""
    return num_tokens * top_k * SMALL_TOKEN_SPARSITY <= num_experts


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the M*K (token, expert) slots by expert into tiles of block_m rows, without a host sync.

    topk_ids [M, K] int in [0, E). Slot s = token * K + k. Returns
      sorted_token_ids [M*K + E*(block_m-1)] int32: each expert's slots, in token order, padded to
          a multiple of block_m with the value M*K (a row the kernels mask); experts one after another;
      expert_ids [cdiv(len(sorted_token_ids), block_m)] int32: the expert of each tile, -1 past the end;
      num_tokens_post_padded [1] int32: the rows in use (on topk_ids' device).
    Static shapes and only capturable ops (stable argsort, scatter_add_, cumsum, searchsorted).
    Ids outside [0, E) are not checked (that would read the device): scatter_add_ fails on
    them. After vLLM's moe_align_block_size and nano-vllm PR #236's torch alignment.
    """
    dev = topk_ids.device
    flat = topk_ids.flatten().long()
    numel = flat.numel()
    capacity = numel + num_experts * (block_m - 1)
    order = torch.argsort(flat, stable=True)                         # slots by expert, token order kept
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)                             # [E] end row of each expert's tiles
    first = torch.cumsum(counts, 0) - counts                         # [E] first sorted position per expert
    expert_of = flat[order]
    dest = padded_end[expert_of] - padded[expert_of] + torch.arange(numel, device=dev) - first[expert_of]
    sorted_token_ids = torch.full((capacity,), numel, dtype=torch.int32, device=dev)
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))
    tile_start = torch.arange(triton.cdiv(capacity, block_m), device=dev) * block_m
    expert_ids = torch.searchsorted(padded_end, tile_start, right=True)   # empty experts are skipped
    expert_ids = torch.where(tile_start < padded_end[-1], expert_ids, -1).to(torch.int32)
    return sorted_token_ids, expert_ids, padded_end[-1:].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
                     n, k, num_slots,
                     stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                     ROWS_PER_A: tl.constexpr, NAIVE: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                     GROUP_SIZE_M: tl.constexpr):
    """C[slot] = A[slot // ROWS_PER_A] @ B[expert of the slot's tile], for the slots of one
    (M-tile, N-tile). GEMM1: A = x, ROWS_PER_A = top_k (a slot's row is its token's hidden state);
    GEMM2: A = the activations of the slots, ROWS_PER_A = 1."""
    pid = tl.program_id(0)
    num_pid_n = (n + BLOCK_SIZE_N - 1) // BLOCK_SIZE_N  # not tl.cdiv: see attention.py
    num_pid_m = tl.num_programs(0) // num_pid_n
    # GROUP_SIZE_M M-tiles walk the N-tiles together, so a weight tile is reused from L2
    group = GROUP_SIZE_M * num_pid_n
    first_m = (pid // group) * GROUP_SIZE_M
    group_m = min(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = tl.arange(0, BLOCK_SIZE_M)
    if NAIVE:
        # one slot per tile (row 0), the other rows are padding; the tile's expert is the slot's
        slots = tl.where(offs_m == 0, pid_m, num_slots)
    else:
        # past the last used tile (read from device memory: the grid is a static upper bound)
        if pid_m * BLOCK_SIZE_M >= tl.load(num_post_pad_ptr):
            return
        slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_SIZE_M + offs_m)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert == -1:
        return
    row_ok = slots < num_slots
    rows = (slots // ROWS_PER_A).to(tl.int64)

    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    n_ok = offs_n < n
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.full((BLOCK_SIZE_M, BLOCK_SIZE_N), 0.0, dtype=tl.float32)
    for kk in range(0, (k + BLOCK_SIZE_K - 1) // BLOCK_SIZE_K):
        k_ok = offs_k < k - kk * BLOCK_SIZE_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST_DOT:  # see common.dot_options
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    c_ptrs = c_ptr + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_sum_kernel(y_ptr, w_ptr, out_ptr, h, stride_ym, stride_wm, stride_om,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_k w[t, k] * y[t * K + k], in fp32, k in a static order: no atomics, so a
    token's sum never depends on what else is in the batch or on timing."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < h
    acc = tl.full((BLOCK_H,), 0.0, dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        w = tl.load(w_ptr + t * stride_wm + j)
        y = tl.load(y_ptr + (t * TOP_K + j) * stride_ym + offs, mask=mask, other=0.0)
        # y * w rounds to the model dtype before the fp32 sum, as the torch path's product does
        acc += (y.to(tl.float32) * w.to(tl.float32)).to(y.dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _gemm(a, w, out, tiles, rows_per_a: int, naive: bool, config: dict) -> None:
    """Launch the grouped GEMM: a [rows, k] @ w [E, k, n] into out [M*K, n] for the slots of
    `tiles` = (sorted_token_ids, expert_ids, num_tokens_post_padded, number of M-tiles)."""
    sorted_ids, expert_ids, num_post_pad, m_tiles = tiles
    n, k = w.shape[2], w.shape[1]
    grid = (m_tiles * triton.cdiv(n, config["BLOCK_SIZE_N"]),)
    _moe_gemm_kernel[grid](
        a, w, out, sorted_ids, expert_ids, num_post_pad, n, k, out.shape[0],
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        ROWS_PER_A=rows_per_a, NAIVE=naive, **dot_options(a.dtype), **config)


def fused_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict | None = None, *, small_token: bool | None = None
              ) -> torch.Tensor:
    """The routed experts of a MoE layer, after routing, in Triton.

    x [M, H] (bf16, fp16 or fp32); w_gate_up [E, H, 2I] (gate = first I columns, up = last I);
    w_down [E, I, H]; topk_weights [M, K]; topk_ids [M, K] int in [0, E) (ids outside are not
    checked: checking would read the device). Returns [M, H] in x's dtype:
    out[t] = sum_k w[t,k] * (SiLU(x[t] @ Wg[e]) * (x[t] @ Wu[e])) @ Wd[e], e = topk_ids[t, k].
    config: a tile config (moe_config.CONFIG_KEYS); None looks one up by M for this device and
    triton version. small_token: one tile per (token, expert) slot and no alignment; None
    decides by use_small_token_path. Raises ValueError on mismatched shapes, a bad config or
    a device Triton cannot run on. After vLLM's fused_moe (alignment, grouped GEMM with early
    exit, small-token naive blocks) and SGLang's fixed-order moe_fused_mul_sum.
    """
    m, h, e, k = check_moe_shapes(x, w_gate_up, w_down, topk_weights, topk_ids)
    check_device(x, w_gate_up, w_down, topk_weights, topk_ids)
    inter = w_down.shape[1]
    if m == 0:
        return x.new_empty(0, h)
    if config is None:
        config = moe_config.get_config(m, e, inter, moe_config.device_name(x.device), triton.__version__)
    else:
        config = moe_config.check_config(config)
    naive = use_small_token_path(m, k, e) if small_token is None else small_token
    block_m = config["BLOCK_SIZE_M"]
    if naive:
        expert_ids = topk_ids.flatten().to(torch.int32)
        tiles = (expert_ids, expert_ids, expert_ids, m * k)  # sorted ids and the count are unused
    else:
        sorted_ids, expert_ids, num_post_pad = moe_align(topk_ids, e, block_m)
        # tiles in use <= sum over hit experts of (rows // BLOCK_M + 1): launch no more than that
        used_bound = (m * k) // block_m + min(e, m * k)
        tiles = (sorted_ids, expert_ids, num_post_pad, min(expert_ids.numel(), used_bound))
    gate_up = torch.empty(m * k, 2 * inter, dtype=x.dtype, device=x.device)      # rows = slots
    _gemm(x, w_gate_up, gate_up, tiles, k, naive, config)
    act = silu_mul(gate_up)                                                       # [M*K, I]
    y = torch.empty(m * k, h, dtype=x.dtype, device=x.device)
    _gemm(act, w_down, y, tiles, 1, naive, config)
    out = torch.empty(m, h, dtype=x.dtype, device=x.device)
    weights = topk_weights if topk_weights.stride(1) == 1 else topk_weights.contiguous()
    block_h = min(1024, triton.next_power_of_2(h))
    _moe_sum_kernel[(m, triton.cdiv(h, block_h))](y, weights, out, h, y.stride(0), weights.stride(0), out.stride(0),
                                                  TOP_K=k, BLOCK_H=block_h)
    return out
