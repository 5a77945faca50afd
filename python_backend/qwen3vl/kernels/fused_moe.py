"""Fused MoE in Triton, shaped like vLLM's fused_moe: align the (token, expert) slots into
per-expert tiles, one grouped GEMM kernel for gate_up and for down, SiLU * up between them, and
a fixed-order reduce over the top-k instead of atomics.

Nothing here reads the device on the host: every buffer has a size fixed by (M, K, E, BLOCK_M),
the kernels find the real extent in device memory (num_tokens_post_padded, expert id -1) and
exit early, so a step can be captured in a CUDA graph. A token's output depends only on its own
row: GEMM tiles multiply rows independently and the reduce sums its k rows in a static order
(with one tile config; configs are chosen by the step's token count, see moe_config).

Weights are the hub layout: w_gate_up [E, H, 2I] (gate = first I columns), w_down [E, I, H];
the kernel takes strides, so other layouts pass as they are. `fused_moe_fp8` runs the same
kernels on block-FP8 weights (W8A8, a constexpr switch): FP8 experts stacked as released,
w13 [E, 2I, H] and w2 [E, H, I] with per-expert scales [E, ceil(N/128), ceil(K/128)], and the
activations quantized per token group of 128 before each GEMM (vLLM's use_fp8_w8a8 with
block_shape [128, 128]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import moe_config
from .block_fp8 import check_fp8_block_k, per_token_group_quant_fp8
from .common import check_device, dot_options
from .fp8_reference import BLOCK, FP8_DTYPE, scale_grid
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
                     as_ptr, bs_ptr, stride_asm, stride_asg, stride_bse, stride_bsn, stride_bsg,
                     ROWS_PER_A: tl.constexpr, NAIVE: tl.constexpr,
                     USE_FP8_W8A8: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                     GROUP_SIZE_M: tl.constexpr):
    """C[slot] = A[slot // ROWS_PER_A] @ B[expert of the slot's tile], for the slots of one
    (M-tile, N-tile). GEMM1: A = x, ROWS_PER_A = top_k (a slot's row is its token's hidden state);
    GEMM2: A = the activations of the slots, ROWS_PER_A = 1. USE_FP8_W8A8: A and B are fp8, each
    K tile's product scaled by A's per-row group scale (as_ [rows, K/GROUP_K]) and B's block
    scale (bs [E, N/GROUP_N, K/GROUP_K]), accumulated in fp32; BLOCK_SIZE_K divides GROUP_K."""
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
    # the FP8 scales' rows (unread without USE_FP8_W8A8; defined outside an `if` for the compiler)
    as_ptrs = as_ptr + rows * stride_asm
    bs_ptrs = bs_ptr + expert * stride_bse + (offs_n // GROUP_N) * stride_bsn
    acc = tl.full((BLOCK_SIZE_M, BLOCK_SIZE_N), 0.0, dtype=tl.float32)
    for kk in range(0, (k + BLOCK_SIZE_K - 1) // BLOCK_SIZE_K):
        k_ok = offs_k < k - kk * BLOCK_SIZE_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if USE_FP8_W8A8:
            if UPCAST_DOT:  # the interpreter: fp8 products summed in fp64 are exact (block_fp8.py)
                a = a.to(tl.float32).to(tl.float64)  # (the interpreter casts fp8 via fp32 only)
                b = b.to(tl.float32).to(tl.float64)
            g = (kk * BLOCK_SIZE_K) // GROUP_K
            a_s = tl.load(as_ptrs + g * stride_asg, mask=row_ok, other=0.0)
            b_s = tl.load(bs_ptrs + g * stride_bsg, mask=n_ok, other=0.0)
            acc += tl.dot(a, b, input_precision=DOT_PRECISION).to(tl.float32) * a_s[:, None] * b_s[None, :]
        else:
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


def _gemm(a, w, out, tiles, rows_per_a: int, naive: bool, config: dict, fp8=None) -> None:
    """Launch the grouped GEMM: a [rows, k] @ w [E, k, n] into out [M*K, n] for the slots of
    `tiles` = (sorted_token_ids, expert_ids, num_tokens_post_padded, number of M-tiles). With
    fp8 = (a_scale [rows, ceil(k/128)], w_scale [E, ceil(n/128), ceil(k/128)]): a and w are fp8
    and w is [E, n, k] (nn.Linear's layout per expert), W8A8."""
    sorted_ids, expert_ids, num_post_pad, m_tiles = tiles
    if fp8 is None:
        n, k = w.shape[2], w.shape[1]
        strides_w = (w.stride(0), w.stride(1), w.stride(2))
        a_s = w_s = torch.ones(1, 1, 1, device=a.device)    # unread: USE_FP8_W8A8 is off
    else:
        n, k = w.shape[1], w.shape[2]
        strides_w = (w.stride(0), w.stride(2), w.stride(1))
        a_s, w_s = fp8[0][None], fp8[1]
    grid = (m_tiles * triton.cdiv(n, config["BLOCK_SIZE_N"]),)
    _moe_gemm_kernel[grid](
        a, w, out, sorted_ids, expert_ids, num_post_pad, n, k, out.shape[0],
        a.stride(0), a.stride(1), *strides_w, out.stride(0), out.stride(1),
        a_s, w_s, a_s.stride(1), a_s.stride(2), w_s.stride(0), w_s.stride(1), w_s.stride(2),
        ROWS_PER_A=rows_per_a, NAIVE=naive, USE_FP8_W8A8=fp8 is not None, GROUP_N=BLOCK[0], GROUP_K=BLOCK[1],
        **dot_options(a.dtype), **config)


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
    return _experts(x, w_gate_up, w_down, topk_weights, topk_ids, (m, h, e, k, w_down.shape[1]), config,
                    small_token)


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                  w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  config: dict | None = None, *, small_token: bool | None = None,
                  quantize=per_token_group_quant_fp8, silu_mul=silu_mul) -> torch.Tensor:
    """The routed experts of a MoE layer on block-FP8 weights, W8A8, in Triton.

    x [M, H] (bf16, fp16 or fp32); w13 float8_e4m3fn [E, 2I, H] (each expert's gate rows then up
    rows, nn.Linear's [out, in]: the released per-expert weights stacked) with w13_scale fp32 or
    bf16 [E, ceil(2I/128), ceil(H/128)]; w2 float8_e4m3fn [E, H, I] with w2_scale
    [E, ceil(H/128), ceil(I/128)]; topk_weights [M, K] (x's dtype); topk_ids [M, K] int in [0, E).
    x and SiLU(gate) * up are quantized per token group of 128 by `quantize`
    (block_fp8.per_token_group_quant_fp8; tests under the interpreter pass
    fp8_reference.per_token_group_quant_fp8_torch, whose cast is right there); each K tile's
    fp8 product is scaled by the token group's and the weight block's scales and accumulated in
    fp32; GEMM outputs are rounded to x's dtype; silu_mul ([R, 2I] -> [R, I]) runs between the
    GEMMs (fusions.silu_mul; the emulation's API has it too). Returns [M, H] in x's dtype. config as
    fused_moe's, with BLOCK_SIZE_K capped at 128 (one scale per K tile; a looked-up config gets 128:
    one K tile per scale group, vLLM's block-FP8 configs). Raises ValueError on
    mismatched shapes or dtypes, a bad config or a device Triton cannot run on. Same math as
    fp8_reference.fused_moe_fp8_torch; after vLLM's fused_moe with use_fp8_w8a8 and block_shape
    [128, 128].
    """
    m, h = x.shape
    e, two_i = w13.shape[0], w13.shape[1]
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"fused_moe_fp8: w13 and w2 must be {FP8_DTYPE}, got {w13.dtype} and {w2.dtype}")
    if (w13.dim() != 3 or tuple(w13.shape[2:]) != (h,) or two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2)
            or tuple(w13_scale.shape) != scale_grid(tuple(w13.shape)) or tuple(w2_scale.shape) != scale_grid(tuple(w2.shape))):
        raise ValueError(f"fused_moe_fp8: w13 {tuple(w13.shape)}, w13_scale {tuple(w13_scale.shape)}, w2 "
                         f"{tuple(w2.shape)}, w2_scale {tuple(w2_scale.shape)} do not fit hidden size {h} (want "
                         "[E, 2I, H], [E, ceil(2I/128), ceil(H/128)], [E, H, I], [E, ceil(H/128), ceil(I/128)])")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe_fp8: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [M={m}, K]")
    check_device(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids)
    scales = (w13_scale.float(), w2_scale.float(), quantize, silu_mul)
    return _experts(x, w13, w2, topk_weights, topk_ids, (m, h, e, topk_ids.shape[1], two_i // 2), config,
                    small_token, scales)


def _experts(x, w1, w2, topk_weights, topk_ids, dims, config, small_token, fp8=None) -> torch.Tensor:
    """fused_moe's body for both weight kinds: align, GEMM 1, SiLU * up, GEMM 2, the fixed-order
    sum. dims = (M, H, E, K, I); fp8 = (w1 scales, w2 scales, activation quantizer, SiLU * up) or None."""
    m, h, e, k, inter = dims
    if m == 0:
        return x.new_empty(0, h)
    if config is None:
        config = moe_config.get_config(m, e, inter, moe_config.device_name(x.device), triton.__version__)
        if fp8 is not None:   # one K tile per scale group, as vLLM's block-FP8 configs all have
            config = dict(config, BLOCK_SIZE_K=BLOCK[1])
    else:
        config = moe_config.check_config(config)
    if fp8 is not None:
        config = dict(config, BLOCK_SIZE_K=min(config["BLOCK_SIZE_K"], BLOCK[1]))
        check_fp8_block_k(config["BLOCK_SIZE_K"])
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
    if fp8 is None:
        _gemm(x, w1, gate_up, tiles, k, naive, config)
    else:
        xq, xs = fp8[2](x)                                                        # per token, once for its K slots
        _gemm(xq, w1, gate_up, tiles, k, naive, config, (xs, fp8[0]))
    act = silu_mul(gate_up) if fp8 is None else fp8[3](gate_up)                   # [M*K, I]
    y = torch.empty(m * k, h, dtype=x.dtype, device=x.device)
    if fp8 is None:
        _gemm(act, w2, y, tiles, 1, naive, config)
    else:
        aq, as_ = fp8[2](act)
        _gemm(aq, w2, y, tiles, 1, naive, config, (as_, fp8[1]))
    out = torch.empty(m, h, dtype=x.dtype, device=x.device)
    weights = topk_weights if topk_weights.stride(1) == 1 else topk_weights.contiguous()
    block_h = min(1024, triton.next_power_of_2(h))
    _moe_sum_kernel[(m, triton.cdiv(h, block_h))](y, weights, out, h, y.stride(0), weights.stride(0), out.stride(0),
                                                  TOP_K=k, BLOCK_H=block_h)
    return out
