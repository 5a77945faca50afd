"""Block FP8 in torch: the arithmetic of Qwen's FP8 checkpoints, no triton.

Weights are float8_e4m3fn with one fp32 (or bf16) multiplier per 128 x 128 tile of the last two
dims, `weight_scale_inv` in DeepSeek's naming (it is the dequantization multiplier, amax / 448,
not its inverse): W = q * s tile by tile. Tiles are ceil-sized: at the bottom and right edges a
tile holds what is left (a [200, 300] weight has a [2, 3] scale grid; its last row of tiles is
72 rows high), as vLLM and Qwen's own vision dims (1152, 4304) need.

What the dequantized path computes at load (model/fp8.py), what the test checkpoints are made
with (tools/make_checkpoint.py), and the oracle the Triton FP8 kernels are checked against.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0            # torch.finfo(torch.float8_e4m3fn).max
BLOCK = (128, 128)         # the released checkpoints' weight_block_size


def scale_grid(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """The scale tensor's shape for a weight of `shape` (leading dims kept, then
    ceil(rows / block[0]), ceil(cols / block[1]))."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """scale [..., ceil(R/b0), ceil(C/b1)] -> fp32 [..., R, C]: each tile's multiplier on each of
    its elements (edge tiles cropped). Raises ValueError when the grid does not fit `shape`."""
    if tuple(scale.shape) != scale_grid(tuple(shape), block):
        raise ValueError(f"scale grid {tuple(scale.shape)} does not fit a weight of shape {tuple(shape)} in "
                         f"{block[0]}x{block[1]} blocks (expected {scale_grid(tuple(shape), block)})")
    rows, cols = shape[-2:]
    s = scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return s.repeat_interleave(block[1], dim=-1)[..., :cols]


def dequantize_block_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """q float8_e4m3fn [..., R, C], scale fp32 or bf16 [..., ceil(R/b0), ceil(C/b1)] -> [..., R, C]
    in `dtype`: q.float() * s per tile, exactly, in fp32, then one cast (bf16 on a GPU rounds once,
    from the exact product). Memory: one fp32 copy of q (multiplied in place, tiles as a view)
    and the result. Raises ValueError for a scale grid that does not fit. Follows transformers'
    Fp8Dequantize and vLLM's block FP8 (ceil-sized edge tiles, which transformers' grid-derived
    block size does not handle)."""
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"dequantize_block_fp8: weight dtype is {q.dtype}, expected {FP8_DTYPE}")
    grid = scale_grid(tuple(q.shape), block)
    if tuple(scale.shape) != grid:
        raise ValueError(f"scale grid {tuple(scale.shape)} does not fit a weight of shape {tuple(q.shape)} in "
                         f"{block[0]}x{block[1]} blocks (expected {grid})")
    *lead, rows, cols = q.shape
    padded_r, padded_c = grid[-2] * block[0], grid[-1] * block[1]
    w = q.float()
    if (padded_r, padded_c) != (rows, cols):     # edge tiles: zeros to full tiles, cropped below
        w = torch.nn.functional.pad(w, (0, padded_c - cols, 0, padded_r - rows))
    w.view(*lead, grid[-2], block[0], grid[-1], block[1]).mul_(scale.float()[..., :, None, :, None])
    return w[..., :rows, :cols].to(dtype).contiguous()


def quantize_block_fp8(w: torch.Tensor, block: tuple[int, int] = BLOCK,
                       scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] (any float dtype) -> (q float8_e4m3fn [..., R, C], scale [..., ceil(R/b0),
    ceil(C/b1)] in scale_dtype): s = amax / 448 per tile, q = w / s cast to e4m3 (round to
    nearest even; |w / s| <= 448 by construction). A tile of zeros gets s = 1 (q = 0). The
    quantization DeepSeek's and Qwen's FP8 releases describe (transformers' Fp8Quantize). A bf16
    scale_dtype rounds the scale first and divides by the rounded one, so q * s stays the best
    fit for the stored scale."""
    *lead, rows, cols = w.shape
    grid = scale_grid(tuple(w.shape), block)
    pad_r, pad_c = grid[-2] * block[0] - rows, grid[-1] * block[1] - cols
    x = torch.nn.functional.pad(w.float(), (0, pad_c, 0, pad_r))           # zeros never raise an amax
    tiles = x.reshape(*lead, grid[-2], block[0], grid[-1], block[1])
    amax = tiles.abs().amax(dim=(-3, -1))                                   # [..., gr, gc]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    s = expand_block_scale(scale, tuple(w.shape), block)
    q = (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.contiguous(), scale


# --- W8A8: activations quantized per token group at run time (activation_scheme "dynamic") ----

GROUP = 128                # activations: one scale per token per 128 input features
ACT_EPS = 1e-10            # an all-zero group gets s = 1e-10 / 448, not 0 (no division by zero)


def per_token_group_quant_fp8_torch(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> (q float8_e4m3fn [M, K], s fp32 [M, ceil(K/group)]):
    s = max(amax of the group, 1e-10) / 448, q = e4m3(clamp(x / s, +-448)); the last group
    holds what is left of K. vLLM's per_token_group_quant_fp8 (what the Triton kernel
    computes; its fp32 -> fp8 cast is right on a GPU, not always under the interpreter)."""
    m, k = x.shape
    groups = math.ceil(k / group)
    xf = torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(m, groups, group)
    s = xf.abs().amax(dim=-1).clamp(min=ACT_EPS) / FP8_MAX                    # [M, G]
    q = (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, groups * group)[:, :k]
    return q.contiguous(), s


def w8a8_block_fp8_matmul_torch(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                                out_dtype: torch.dtype = torch.float32, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """The W8A8 block-FP8 GEMM, emulated: a fp8 [M, K] with a_scale [M, ceil(K/block[1])] (per
    token group), b fp8 [N, K] (nn.Linear's layout) with b_scale [ceil(N/block[0]),
    ceil(K/block[1])] -> [M, N] in out_dtype: for each K group, the fp32 product of the fp8
    values (summed exactly, in fp64, then rounded to fp32) times a_scale (per row) times b_scale
    (per column tile), summed in fp32 over the groups; the order of the Triton kernel (vLLM's
    w8a8_block_fp8_matmul), whose dot under the interpreter is exact too: bit for bit the same. Raises ValueError on
    mismatched shapes."""
    m, k = a.shape
    n = b.shape[0]
    groups = math.ceil(k / block[1])
    if b.shape[1] != k or tuple(a_scale.shape) != (m, groups) or tuple(b_scale.shape) != scale_grid((n, k), block):
        raise ValueError(f"w8a8 matmul: a {tuple(a.shape)}, a_scale {tuple(a_scale.shape)}, b {tuple(b.shape)}, "
                         f"b_scale {tuple(b_scale.shape)} do not fit (want [M, K], [M, ceil(K/{block[1]})], [N, K], "
                         f"[ceil(N/{block[0]}), ceil(K/{block[1]})])")
    b_col_scale = b_scale.float().repeat_interleave(block[0], dim=0)[:n]          # [N, G]
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for g in range(groups):
        cols = slice(g * block[1], (g + 1) * block[1])
        # the group's dot in fp64 is exact (fp8 products have 8 significant bits and span < 2^44),
        # so its fp32 rounding does not depend on the summation order or the batch
        dot = (a[:, cols].double() @ b[:, cols].double().T).float()
        acc += dot * a_scale[:, g, None].float() * b_col_scale[None, :, g]
    return acc.to(out_dtype)


def w8a8_block_fp8_linear_torch(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                                quantize=per_token_group_quant_fp8_torch) -> torch.Tensor:
    """A Linear layer on FP8 weights, W8A8: x [M, K] in the model dtype, w fp8 [N, K], w_scale
    [ceil(N/128), ceil(K/128)] -> [M, N] in x's dtype; x quantized per token group of 128 by
    `quantize` first."""
    q, s = quantize(x)
    return w8a8_block_fp8_matmul_torch(q, w, s, w_scale, x.dtype)


def fused_moe_fp8_torch(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                        w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        config: dict | None = None, *, small_token: bool | None = None,
                        quantize=per_token_group_quant_fp8_torch, silu_mul=None) -> torch.Tensor:
    """The routed experts of a MoE layer on block-FP8 weights, W8A8, emulated (the oracle of
    kernels/fused_moe.fused_moe_fp8): x [M, H] in the model dtype; w13 fp8 [E, 2I, H] (gate =
    first I rows, up = last I; nn.Linear's [out, in] per expert, stacked) with w13_scale
    [E, ceil(2I/128), ceil(H/128)]; w2 fp8 [E, H, I] with w2_scale [E, ceil(H/128), ceil(I/128)];
    topk_weights [M, K] (x's dtype), topk_ids [M, K]. x is quantized per token group, each GEMM
    1's output rounded to x's dtype, SiLU(gate) * up quantized per token group again, GEMM 2's
    output rounded to x's dtype and weighted (in x's dtype), the top-k summed in fp32. Returns
    [M, H] in x's dtype. config and small_token are the Triton path's tuning knobs, ignored here
    (same API). silu_mul: [R, 2I] -> [R, I], SiLU(gate) * up (None: torch's); a test
    passes the kernel path's own (kernels.KernelOps.silu_mul) to compare the FP8 GEMMs alone,
    since a last-ulp difference in SiLU can flip an activation's fp8 rounding (a whole e4m3
    step). After vLLM's fused_moe with use_fp8_w8a8 and block_shape [128, 128]."""
    m, h = x.shape
    xq, xs = quantize(x)
    out = torch.zeros(m, h, dtype=torch.float32, device=x.device)
    for e in topk_ids.unique().tolist():
        token, j = (topk_ids == e).nonzero(as_tuple=True)
        gate_up = w8a8_block_fp8_matmul_torch(xq[token], w13[e], xs[token], w13_scale[e], x.dtype)
        if silu_mul is None:
            gate, up = gate_up.chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
        else:
            act = silu_mul(gate_up)
        aq, as_ = quantize(act)
        y = w8a8_block_fp8_matmul_torch(aq, w2[e], as_, w2_scale[e], x.dtype)
        out.index_add_(0, token, (y * topk_weights[token, j, None]).float())
    return out.to(x.dtype)
