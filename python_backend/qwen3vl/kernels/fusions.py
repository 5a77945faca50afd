"""Small fused ops in Triton: RMSNorm (with the residual add), SiLU * up, q/k RMSNorm + RoPE.

Each equals its torch path in reference.py (the model's ops) and rounds where the model rounds:
the normalised row is cast to the model dtype before the weight multiplies it, and every torch op
of the model in bf16 (x * cos, rot * sin, their sum, silu, * up) becomes a cast back to the
input dtype here, so bf16 results match the torch path to the bit wherever both compute the same
fp32 values. Written simply, one program per row (or per (token, head)); they stay only if a GPU
measurement says they help (bench/kernel_bench.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_device


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n, eps,
                     stride_x, stride_res, stride_out, stride_res_out,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the residual stream is kept in the model dtype: round the sum before normalising it
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)   # cast back before the weight, as the model
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with a unit stride on the last dim (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    check_device(x, weight)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not fit rows of {x.shape[-1]}")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res2 = res_out = x2  # unused without a residual (pointers must still be tensors)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"fused_add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} is not "
                             f"x's {tuple(x.shape)} {x.dtype}")
        res2 = _rows(residual)
        res_out = torch.empty_like(out)
    n = x2.shape[1]
    _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, res_out, n, eps, x2.stride(0), res2.stride(0),
                                     out.stride(0), res_out.stride(0), HAS_RESIDUAL=residual is not None,
                                     BLOCK=triton.next_power_of_2(n))
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N], weight [N] -> [..., N] in x's dtype: normalise in fp32, cast back to x's dtype,
    multiply by the weight (model/text.py RMSNorm). Raises ValueError on a weight of another
    length or a device Triton cannot run on. After vLLM's rms_norm kernel."""
    return _norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., N] of one dtype, weight [N] -> (rms_norm(x + residual), x + residual), the
    sum rounded to the dtype first (the decoder layer's `x = x + attn(...)`); new tensors, the
    inputs are left as they are. Raises ValueError on mismatched shapes or dtypes. After vLLM's
    fused_add_rms_norm."""
    return _norm(x, residual, weight, eps)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)   # F.silu rounds before the product
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (gate = first I, up = last I) -> SiLU(gate) * up [..., I] in x's dtype.
    Raises ValueError on an odd last dim. After vLLM's silu_and_mul."""
    check_device(x)
    if x.shape[-1] % 2:
        raise ValueError(f"silu_mul: last dim {x.shape[-1]} is not 2 * I")
    x2 = _rows(x)
    inter = x2.shape[1] // 2
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out, inter, x2.stride(0), out.stride(0),
                                                                 BLOCK=block)
    return out.view(*x.shape[:-1], inter)


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, eps,
                      stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
                      D: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    half: tl.constexpr = D // 2
    # rotate_half(y)[j] = -y[j + D/2] for j < D/2, y[j - D/2] after: load the row twice, the second
    # time permuted, and normalise both (the scale is per row, so it commutes with the permutation)
    partner = tl.where(offs < half, offs + half, offs - half)
    sign = tl.where(offs < half, -1.0, 1.0)
    row = x_ptr + t * stride_xt + h * stride_xh
    x = tl.load(row + offs, mask=mask, other=0.0)
    xp = tl.load(row + partner, mask=mask, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + partner, mask=mask, other=0.0).to(tl.float32)
    y = (w * (xf * rstd).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
    yp = (wp * (xp * rstd).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
    c = tl.load(cos_ptr + t * stride_ct + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + offs, mask=mask, other=0.0).to(tl.float32)
    out = (y * c).to(x.dtype).to(tl.float32) + (sign * yp * s).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_rope(x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    t, heads, d = x.shape
    _norm_rope_kernel[(t, heads)](x, w, cos, sin, out, eps, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                                  out.stride(0), out.stride(1), D=d, BLOCK_D=triton.next_power_of_2(d))
    return out


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then rotate-half RoPE (model/text.py's q_norm, k_norm,
    apply_rope). q [T, Hq, D], k [T, Hkv, D], q_weight, k_weight [D]; cos, sin [T, D] with a unit
    last stride (MRoPE.forward's output for one batch row: the interleaved M-RoPE frequencies
    already chosen per position). Returns new (q', k'), same shapes and dtype. Raises ValueError
    on mismatched shapes. After vLLM's fused qk-norm + rope."""
    check_device(q, k, cos, sin)
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or d % 2 or cos.shape != (t, d) or sin.shape != (t, d) \
            or q_weight.shape != (d,) or k_weight.shape != (d,):
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"weights {tuple(q_weight.shape)} / {tuple(k_weight.shape)} do not fit [T, H, D] (D even)")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _norm_rope(q, q_weight, cos, sin, eps), _norm_rope(k, k_weight, cos, sin, eps)
