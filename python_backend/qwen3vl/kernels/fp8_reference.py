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
    from the exact product). Raises ValueError for a scale grid that does not fit. Follows
    transformers' Fp8Dequantize and vLLM's block FP8 (ceil-sized edge tiles, which transformers'
    grid-derived block size does not handle)."""
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"dequantize_block_fp8: weight dtype is {q.dtype}, expected {FP8_DTYPE}")
    return (q.float() * expand_block_scale(scale, tuple(q.shape), block)).to(dtype)


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
