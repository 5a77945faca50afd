"""Block FP8 (W8A8) in Triton: activations quantized per token group of 128 at run time, and
the GEMM of those against 128x128-block-scaled FP8 weights, as vLLM, SGLang and transformers
run Qwen's and DeepSeek's FP8 checkpoints on GPUs with FP8 tensor cores (compute capability
8.9 and up). The torch emulation each kernel is checked against is in fp8_reference.py.

Under TRITON_INTERPRET=1 the fp32 -> fp8 cast of per_token_group_quant_fp8 drops the rounding
carry in some values (a value may land one e4m3 step low): its scales are right, and tests feed
the GEMM torch-quantized inputs (the served model too: activation_quantizer). On a GPU the cast
rounds to nearest even like torch's. Also under the interpreter, each K tile's fp8 dot runs in
fp64, which is exact for fp8 products, as the emulation's is: the two agree bit for bit whatever
the batch (a last-bit difference would flip the next layer's fp8 roundings). On a GPU the FP8
tensor cores accumulate in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .common import check_device, dot_options
from .fp8_reference import ACT_EPS, BLOCK, FP8_DTYPE, FP8_MAX, GROUP, per_token_group_quant_fp8_torch, scale_grid


@triton.jit
def _per_token_group_quant_kernel(x_ptr, q_ptr, s_ptr, k, num_groups, stride_xm, stride_qm, stride_sm,
                                  eps, fp8_max, GROUP_SIZE: tl.constexpr):
    """One program per (row, group): s = max(amax, eps) / fp8_max, q = clamp(x / s)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    mask = offs < k
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x)), eps) / fp8_max
    q = tl.clamp(x / s, -fp8_max, fp8_max)
    tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + g, s)


def per_token_group_quant_fp8(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16, fp16 or fp32; rows may be strided, the last dim contiguous) -> (q
    float8_e4m3fn [M, K], s fp32 [M, ceil(K/group)]): s = max(amax, 1e-10) / 448 per token and
    group of `group` features (a power of two; the last group holds what is left of K),
    q = e4m3(clamp(x / s, +-448)). Same API as fp8_reference.per_token_group_quant_fp8_torch.
    Raises ValueError for another shape or a device Triton cannot run on. After vLLM's
    per_token_group_quant_fp8."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"per_token_group_quant_fp8: x must be [M, K] with contiguous rows, got {tuple(x.shape)}")
    check_device(x)
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        _per_token_group_quant_kernel[(m, groups)](x, q, s, k, groups, x.stride(0), q.stride(0), s.stride(0),
                                                  ACT_EPS, FP8_MAX, GROUP_SIZE=group)
    return q, s


@triton.jit
def _w8a8_block_fp8_matmul_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, m, n, k,
                                  stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                                  stride_asm, stride_asg, stride_bsn, stride_bsg,
                                  GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                                  UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                  BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                                  GROUP_SIZE_M: tl.constexpr):
    """C tile = sum over K tiles of (A tile @ B tile) * a_scale[row, group] * b_scale[col tile,
    group], accumulated in fp32. BLOCK_SIZE_K divides GROUP_K, so each K tile has one scale."""
    pid = tl.program_id(0)
    num_pid_m = (m + BLOCK_SIZE_M - 1) // BLOCK_SIZE_M
    num_pid_n = (n + BLOCK_SIZE_N - 1) // BLOCK_SIZE_N
    group = GROUP_SIZE_M * num_pid_n           # M-tiles walk the N-tiles together: B reused from L2
    first_m = (pid // group) * GROUP_SIZE_M
    group_m = min(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    m_ok, n_ok = offs_m < m, offs_n < n
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    as_ptrs = as_ptr + offs_m * stride_asm
    bs_ptrs = bs_ptr + (offs_n // GROUP_N) * stride_bsn
    acc = tl.full((BLOCK_SIZE_M, BLOCK_SIZE_N), 0.0, dtype=tl.float32)
    for kk in range(0, (k + BLOCK_SIZE_K - 1) // BLOCK_SIZE_K):
        k_ok = offs_k < k - kk * BLOCK_SIZE_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        g = (kk * BLOCK_SIZE_K) // GROUP_K
        a_s = tl.load(as_ptrs + g * stride_asg, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptrs + g * stride_bsg, mask=n_ok, other=0.0)
        if UPCAST_DOT:  # the interpreter: fp8 products summed in fp64 are exact (fp8_reference's order)
            a = a.to(tl.float32).to(tl.float64)  # (the interpreter casts fp8 via fp32 only)
            b = b.to(tl.float32).to(tl.float64)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION).to(tl.float32) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def check_fp8_block_k(block_size_k: int, group_k: int = BLOCK[1]) -> None:
    """ValueError unless a K tile of `block_size_k` lies inside one scale group (divides it)."""
    if group_k % block_size_k:
        raise ValueError(f"BLOCK_SIZE_K {block_size_k} must divide the FP8 scale group {group_k}")


def w8a8_block_fp8_matmul(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                          out_dtype: torch.dtype = torch.float32, block: tuple[int, int] = BLOCK,
                          config: dict | None = None) -> torch.Tensor:
    """The W8A8 block-FP8 GEMM: a fp8 [M, K] with a_scale fp32 [M, ceil(K/block[1])] (per token
    group, per_token_group_quant_fp8), b fp8 [N, K] (nn.Linear's layout, any strides) with
    b_scale fp32 [ceil(N/block[0]), ceil(K/block[1])] -> [M, N] in out_dtype, accumulated in fp32
    with a_scale * b_scale applied per K tile. Same API as
    fp8_reference.w8a8_block_fp8_matmul_torch. config: BLOCK_SIZE_M/N/K, GROUP_SIZE_M, num_warps,
    num_stages (None: vLLM's defaults for block FP8, BLOCK_SIZE_K = block[1]). Raises ValueError
    on mismatched shapes or dtypes, a BLOCK_SIZE_K that does not divide block[1], or a device
    Triton cannot run on. After vLLM's w8a8_block_fp8_matmul (the same kernel in SGLang and
    transformers' finegrained_fp8)."""
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"w8a8_block_fp8_matmul: a and b must be {FP8_DTYPE}, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or tuple(a_scale.shape) != (m, triton.cdiv(k, block[1])) \
            or tuple(b_scale.shape) != scale_grid((n, k), block):
        raise ValueError(f"w8a8_block_fp8_matmul: a {tuple(a.shape)}, a_scale {tuple(a_scale.shape)}, b "
                         f"{tuple(b.shape)}, b_scale {tuple(b_scale.shape)} do not fit")
    check_device(a, b, a_scale, b_scale)
    config = config or dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=block[0], BLOCK_SIZE_K=block[1], GROUP_SIZE_M=8,
                            num_warps=4, num_stages=3)
    check_fp8_block_k(config["BLOCK_SIZE_K"], block[1])
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    a_s, b_s = a_scale.float(), b_scale.float()
    grid = (triton.cdiv(m, config["BLOCK_SIZE_M"]) * triton.cdiv(n, config["BLOCK_SIZE_N"]),)
    _w8a8_block_fp8_matmul_kernel[grid](
        a, b, c, a_s, b_s, m, n, k, a.stride(0), a.stride(1), b.stride(1), b.stride(0), c.stride(0), c.stride(1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), GROUP_N=block[0], GROUP_K=block[1],
        **dot_options(a.dtype), **config)
    return c


def w8a8_block_fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                          quantize=per_token_group_quant_fp8) -> torch.Tensor:
    """A Linear layer on FP8 weights, W8A8: x [M, K] (the model dtype), w fp8 [N, K], w_scale
    [ceil(N/128), ceil(K/128)] -> [M, N] in x's dtype; x quantized per token group of 128 by
    `quantize` (tests under the interpreter pass the torch one, whose cast is right there).
    Same API as fp8_reference.w8a8_block_fp8_linear_torch."""
    q, s = quantize(x)
    return w8a8_block_fp8_matmul(q, w, s, w_scale, x.dtype)


def activation_quantizer():
    """The per-token-group activation quantizer the served model's FP8 layers run:
    per_token_group_quant_fp8 (this Triton kernel) on a GPU; under TRITON_INTERPRET the torch one
    (fp8_reference.per_token_group_quant_fp8_torch, same API and math), because the
    interpreter's fp32 -> fp8 cast drops the rounding carry in some values (module docstring)
    and would move a served model's outputs by whole e4m3 steps. The GEMMs stay Triton's."""
    return per_token_group_quant_fp8_torch if interpreting() else per_token_group_quant_fp8
