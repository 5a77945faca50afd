"""Compile every Triton kernel of qwen3vl.kernels for a Hopper GPU (sm_90), without a GPU.

    python tests/kernel_compile_check.py   # TRITON_INTERPRET unset; prints one JSON line a kernel

The interpreter checks the kernels' arithmetic but not that they compile: it runs the Python
body, so a type that only the compiler rejects (a loop-carried value changing type, a dot of
mismatched tiles) would first show on the GPU machine. This goes through triton's whole pipeline
(TTIR, TTGIR, LLVM, PTX, cubin with the ptxas the wheel bundles) at the 30B model's dims, with the
specialisations a launch would get (unit strides as constants, 16-divisible pointers, strides
and dims), and reports shared memory and whether the tile loops were software-pipelined (async
copies). Exits 1 on the first kernel that does not compile.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_compile_check: unset TRITON_INTERPRET (interpreted kernels do not compile)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_backend"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qwen3vl.kernels import attention, block_fp8, fused_moe, fusions  # noqa: E402

BF16, FP8 = "*bf16", "*fp8e4nv"
MOE_PTRS = dict(a_ptr=BF16, b_ptr=BF16, c_ptr=BF16, sorted_ids_ptr="*i32", expert_ids_ptr="*i32", num_post_pad_ptr="*i32",
                as_ptr="*fp32", bs_ptr="*fp32")
MOE_FP8_PTRS = dict(MOE_PTRS, a_ptr=FP8, b_ptr=FP8)
MOE_ONES = ("stride_ak", "stride_bn", "stride_cn")
MOE_FP8_ONES = ("stride_ak", "stride_bk", "stride_cn", "stride_asg", "stride_bsg")  # w [E, N, K]: K contiguous
BF16_W = dict(USE_FP8_W8A8=False, GROUP_N=128, GROUP_K=128)
FP8_W = dict(USE_FP8_W8A8=True, GROUP_N=128, GROUP_K=128)
ATTN_PTRS = dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, out_ptr=BF16, seg_acc_ptr="*fp32", seg_max_ptr="*fp32",
                 seg_sum_ptr="*fp32", cu_q_ptr="*i32", seq_lens_ptr="*i32", block_table_ptr="*i32", qk_scale="fp32")
ATTN = dict(HQ=32, QPK=8, D=128, BLOCK_D=128, BLOCK_M=16, BLOCK_Q=2, PAGE=16, UPCAST_DOT=False, DOT_PRECISION="tf32")
GEMM = dict(UPCAST_DOT=False, DOT_PRECISION="tf32")


def moe_gemm(label: str, fp8: bool, rows_per_a: int, naive: bool, tiles: tuple[int, int, int, int], warps: int,
             stages: int):
    """A CASES row of the fused MoE's grouped GEMM; tiles = (BLOCK_SIZE_M, N, K, GROUP_SIZE_M)."""
    m, n, k, group_m = tiles
    constexprs = dict(GEMM, **(FP8_W if fp8 else BF16_W), ROWS_PER_A=rows_per_a, NAIVE=naive, BLOCK_SIZE_M=m,
                      BLOCK_SIZE_N=n, BLOCK_SIZE_K=k, GROUP_SIZE_M=group_m)
    return (label, fused_moe._moe_gemm_kernel, MOE_FP8_PTRS if fp8 else MOE_PTRS, constexprs,
            MOE_FP8_ONES if fp8 else MOE_ONES, ("n", "k"), warps, stages)


# (label, kernel, argument types, constexprs, args that are 1 at a launch, 16-divisible ints, warps, stages)
CASES = [
    moe_gemm("moe gemm1 T=1024 (H200 128/256/64)", False, 8, False, (128, 256, 64, 16), 8, 4),
    moe_gemm("moe gemm2 T=64 (H200 16/256/128)", False, 1, False, (16, 256, 128, 1), 8, 2),
    moe_gemm("moe gemm1 small-token T=1", False, 8, True, (16, 64, 64, 1), 4, 5),
    moe_gemm("moe gemm1 fp8 T=1024 (128/256/64)", True, 8, False, (128, 256, 64, 16), 8, 4),
    moe_gemm("moe gemm2 fp8 small-token T=1", True, 1, True, (16, 64, 128, 1), 4, 5),
    ("w8a8 block fp8 matmul", block_fp8._w8a8_block_fp8_matmul_kernel,
     dict(a_ptr=FP8, b_ptr=FP8, c_ptr=BF16, as_ptr="*fp32", bs_ptr="*fp32"),
     dict(GEMM, GROUP_N=128, GROUP_K=128, BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=8),
     ("stride_ak", "stride_bk", "stride_cn", "stride_asg", "stride_bsg"), ("n", "k"), 4, 3),
    ("per-token group quant fp8", block_fp8._per_token_group_quant_kernel,
     dict(x_ptr=BF16, q_ptr=FP8, s_ptr="*fp32", eps="fp32", fp8_max="fp32"), dict(GROUP_SIZE=128), (), ("k",), 4, 3),
    ("moe sum", fused_moe._moe_sum_kernel, dict(y_ptr=BF16, w_ptr=BF16, out_ptr=BF16), dict(TOP_K=8, BLOCK_H=1024),
     (), ("h",), 4, 3),
    ("attention 2D prefill", attention._attention_kernel, ATTN_PTRS, dict(ATTN, TILE=32, NUM_SEGMENTS=1), (), (), 4, 3),
    ("attention split-KV decode B=1", attention._attention_kernel, ATTN_PTRS, dict(ATTN, TILE=16, NUM_SEGMENTS=16),
     ("num_seqs",), (), 4, 3),  # one sequence: the binary search's bound becomes a constant
    ("attention merge", attention._merge_segments_kernel,
     dict(seg_acc_ptr="*fp32", seg_max_ptr="*fp32", seg_sum_ptr="*fp32", out_ptr=BF16),
     dict(HQ=32, D=128, BLOCK_D=128, NUM_SEGMENTS=16), (), (), 4, 3),
    ("store_kv", attention._store_kv_kernel, dict(k_ptr=BF16, v_ptr=BF16, k_cache_ptr=BF16, v_cache_ptr=BF16,
                                                  slot_ptr="*i64"), dict(HKV=4, D=128, BLOCK_H=4, BLOCK_D=128),
     (), (), 4, 3),
    ("fused_add_rms_norm", fusions._rms_norm_kernel, dict(x_ptr=BF16, res_ptr=BF16, w_ptr=BF16, out_ptr=BF16,
                                                          res_out_ptr=BF16, eps="fp32"),
     dict(HAS_RESIDUAL=True, BLOCK=2048), (), ("n",), 4, 3),
    ("silu_mul", fusions._silu_mul_kernel, dict(x_ptr=BF16, out_ptr=BF16), dict(BLOCK=1024), (), ("inter",), 4, 3),
    ("qk_norm_rope", fusions._norm_rope_kernel, dict(x_ptr=BF16, w_ptr=BF16, cos_ptr=BF16, sin_ptr=BF16, out_ptr=BF16,
                                                     eps="fp32"), dict(D=128, BLOCK_D=128), (), (), 4, 3),
]


def compile_case(kernel, types, constexprs, ones, aligned, num_warps, num_stages, capability=90):
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs or name in ones:
            signature[name] = "constexpr"
            constants.setdefault(name, 1)
        else:
            signature[name] = types.get(name, "i32")
            if name.endswith("_ptr") or name.startswith("stride") or name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def main() -> int:
    for label, kernel, types, constexprs, ones, aligned, warps, stages in CASES:
        try:
            compiled = compile_case(kernel, types, constexprs, ones, aligned, warps, stages)
        except Exception as error:  # noqa: BLE001 -- report which kernel and why, then fail
            print(json.dumps({"kernel": label, "error": f"{type(error).__name__}: {error}"[:2000]}))
            return 1
        ttgir = compiled.asm["ttgir"]
        print(json.dumps({"kernel": label, "shared_bytes": compiled.metadata.shared,
                          "async_copies": ttgir.count("async_copy_global_to_local"),
                          "dots": ttgir.count("warp_group_dot ") + ttgir.count("tt.dot ")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
