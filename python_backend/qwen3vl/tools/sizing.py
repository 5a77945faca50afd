"""`qwen3vl-sizing`: what a checkpoint needs, read from its config.json and safetensors headers
(nothing is loaded): weights per server role, KV cache bytes per token, E->L bytes per visual
token, and what those come to for a context and an image.

An FP8 checkpoint (model/fp8.py) is counted both ways it can run: dequantized at load (every
weight in the serving dtype, the scales dropped: fp8_mode dequantize, what the main sizes
assume) and native (fp8_mode native, what auto picks on a GPU of compute capability 8.9+ with
the Triton kernels: 1 byte per language-model FP8 weight plus its fp32 scales, the rest in the
serving dtype; the vision tower is dequantized either way), with the reason when native cannot
run the checkpoint (model/fp8_linear.check_native_fp8; under tensor parallelism also
check_fp8_shards: a rank's share must hold whole 128x128 scale blocks).

With `--tensor-parallel-size N` (and `--enable-expert-parallel`) the language model's weights
and KV cache are also given per GPU: each tensor's share as a rank reads it (parallel/shard.py:
the same split the servers load), the KV heads a rank holds (replicated beyond the model's KV
heads)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..model.checkpoint import shard_header, weight_map
from ..model.config import ModelConfig
from ..model.fp8 import FP8_DTYPES, SCALE_SUFFIX
from ..model.fp8_linear import check_fp8_shards, check_native_fp8, language_fp8_shapes
from ..parallel.shard import SKIP, Shard

LANGUAGE_PREFIXES = ("model.language_model.", "lm_head.")
VISION_PREFIXES = ("model.visual.",)


@dataclass
class Sizing:
    dtype: str
    language_params: int                # weights, FP8 ones included, their scales not
    vision_params: int
    language_weight_bytes: int          # in the serving dtype (FP8 dequantized at load)
    vision_weight_bytes: int
    language_fp8_params: int            # of language_params: FP8 in the checkpoint
    vision_fp8_params: int              # (the vision tower is always dequantized at load)
    language_fp8_weight_bytes: int      # kept FP8 (native): 1 byte each + fp32 scales + the rest in the dtype
    kv_bytes_per_token: int             # 2 (K, V) x layers x KV heads x head dim x dtype bytes
    e2l_bytes_per_visual_token: int     # (1 + deepstack layers) x hidden x dtype bytes
    max_position_embeddings: int
    tensor_parallel_size: int = 1
    expert_parallel: bool = False
    language_weight_bytes_per_gpu: int = 0       # the largest rank's share, in the serving dtype
    language_fp8_weight_bytes_per_gpu: int = 0   # the same kept FP8 (native)
    kv_bytes_per_token_per_gpu: int = 0          # the KV heads one rank holds
    fp8_native_refused: str = ""        # why fp8_mode native cannot run this FP8 checkpoint ("" if it can)

    def kv_bytes(self, tokens: int) -> int:
        return self.kv_bytes_per_token * tokens

    def e2l_bytes(self, visual_tokens: int) -> int:
        return self.e2l_bytes_per_visual_token * visual_tokens


@dataclass
class _Count:
    params: int = 0          # weights (FP8 ones included), not their scales
    fp8: int = 0             # of those, FP8 in the checkpoint
    scales: int = 0          # the FP8 weights' scale entries

    def weight_bytes(self, element: int) -> int:
        return self.params * element

    def fp8_weight_bytes(self, element: int) -> int:
        return self.fp8 + 4 * self.scales + (self.params - self.fp8) * element


def _count(checkpoint: Path, prefixes: tuple[str, ...], share=None) -> _Count:
    """The tensors under `prefixes`; with share(name, shape) -> the fraction of it one rank
    holds (an FP8 scale counted at its weight's fraction)."""
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map(checkpoint).items():
        if name.startswith(prefixes):
            shards.setdefault(shard, []).append(name)
    header = {}
    for shard in shards:
        header |= shard_header(checkpoint / shard)
    count = _Count()
    for names in shards.values():
        for n in names:
            numel = math.prod(header[n]["shape"])
            if n.endswith(SCALE_SUFFIX):
                weight = n[:-len(SCALE_SUFFIX)]
                count.scales += round(numel * (share(weight, tuple(header[weight]["shape"])) if share else 1))
            else:
                numel = round(numel * (share(n, tuple(header[n]["shape"])) if share else 1))
                count.params += numel
                count.fp8 += numel if header[n]["dtype"] in FP8_DTYPES else 0
    return count


def _rank_share(shard: Shard, cfg):
    """share(name, shape): the fraction of a language tensor rank `shard` reads."""
    def share(name: str, shape: tuple[int, ...]) -> float:
        reads = shard.reads(name.removeprefix("model.language_model."), shape, cfg)
        if reads is None:
            return 1.0
        if reads == SKIP:
            return 0.0
        held = sum(math.prod(len(range(*s.indices(d))) for s, d in zip(index, shape)) for index in reads)
        return held / math.prod(shape)
    return share


def sizing(checkpoint: str | Path, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
           expert_parallel: bool = False) -> Sizing:
    """The checkpoint's sizes (see Sizing) in the serving `dtype`, from its config.json and
    shard headers, per GPU for `tensor_parallel_size` ranks (rank 0: it holds as much as any).
    Raises what ModelConfig.load raises (FileNotFoundError, ValueError), InvalidInput when
    the model does not split into that many ranks."""
    checkpoint = Path(checkpoint)
    config = ModelConfig.load(checkpoint, device="cpu", dtype=dtype)
    element = torch.empty((), dtype=config.dtype).element_size()
    t = config.text
    language, vision = _count(checkpoint, LANGUAGE_PREFIXES), _count(checkpoint, VISION_PREFIXES)
    shard = Shard(0, tensor_parallel_size, expert_parallel)
    shard.check(t, fp8=config.quantization is not None)
    per_gpu = _count(checkpoint, LANGUAGE_PREFIXES, _rank_share(shard, t))
    refused: list[str] = []
    if language.fp8:
        check_native_fp8(checkpoint, "native", "auto", t.num_experts, t.moe_intermediate_size, refused.append)
        if not refused and tensor_parallel_size > 1:
            try:
                check_fp8_shards(language_fp8_shapes(checkpoint), shard, t)
            except ValueError as e:
                refused.append(f"not native: tensor_parallel_size {tensor_parallel_size}: {e}")
    return Sizing(
        dtype=str(config.dtype).removeprefix("torch."),
        language_params=language.params, vision_params=vision.params,
        language_weight_bytes=language.weight_bytes(element), vision_weight_bytes=vision.weight_bytes(element),
        language_fp8_params=language.fp8, vision_fp8_params=vision.fp8,
        language_fp8_weight_bytes=language.fp8_weight_bytes(element),
        kv_bytes_per_token=2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * element,
        e2l_bytes_per_visual_token=(1 + config.deepstack_layers) * config.visual_hidden_size * element,
        max_position_embeddings=t.max_position_embeddings,
        tensor_parallel_size=tensor_parallel_size, expert_parallel=expert_parallel,
        language_weight_bytes_per_gpu=per_gpu.weight_bytes(element),
        language_fp8_weight_bytes_per_gpu=per_gpu.fp8_weight_bytes(element),
        kv_bytes_per_token_per_gpu=2 * t.num_hidden_layers * shard.kv_heads(t) * t.head_dim * element,
        fp8_native_refused=refused[0].split("not native: ", 1)[-1] if refused else "",
    )


def _b(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qwen3vl-sizing", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the checkpoint directory (config.json, safetensors)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="the dtype the servers run in (default: bfloat16)")
    p.add_argument("--context", type=int, default=4096, help="tokens of one sequence, for its KV bytes")
    p.add_argument("--visual-tokens", type=int, default=1024,
                   help="visual tokens of one image (1024 for a 1024x1024 image), for its E->L bytes")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs the language model is split across: its weights and KV cache per GPU (default: 1)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: whole experts per GPU instead of a slice of each")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    s = sizing(args.checkpoint, args.dtype, args.tensor_parallel_size, args.enable_expert_parallel)
    if args.json:
        print(json.dumps(asdict(s)))
        return 0
    print(f"{args.checkpoint} in {s.dtype}:")
    print(f"  language model weights  {_b(s.language_weight_bytes)} ({s.language_params / 1e9:.3g} B params): "
          f"language and aggregated servers")
    print(f"  vision tower weights    {_b(s.vision_weight_bytes)} ({s.vision_params / 1e9:.3g} B params): "
          f"encoder and aggregated servers")
    if s.language_fp8_params or s.vision_fp8_params:
        native = (f"native cannot run this checkpoint ({s.fp8_native_refused}): auto dequantizes"
                  if s.fp8_native_refused else "what fp8_mode auto picks on a GPU of compute capability 8.9+ with "
                  "the Triton kernels")
        print(f"  FP8 checkpoint          {s.language_fp8_params / 1e9:.3g} B language and {s.vision_fp8_params / 1e9:.3g} "
              f"B vision params in FP8, dequantized at load to the sizes above (fp8_mode dequantize); the language "
              f"model kept FP8 (native: 1 byte a weight + fp32 scales) {_b(s.language_fp8_weight_bytes)}, {native}")
    print(f"  KV cache per token      {_b(s.kv_bytes_per_token)}; a {args.context}-token sequence "
          f"{_b(s.kv_bytes(args.context))}")
    print(f"  E->L per visual token   {_b(s.e2l_bytes_per_visual_token)}; an image of {args.visual_tokens} "
          f"visual tokens {_b(s.e2l_bytes(args.visual_tokens))}")
    if s.tensor_parallel_size > 1:
        fp8 = (f" ({_b(s.language_fp8_weight_bytes_per_gpu)} kept FP8, native"
               f"{': refused here, each rank dequantizes' if s.fp8_native_refused else ''})"
               if s.language_fp8_params else "")
        print(f"  per GPU at tensor parallel {s.tensor_parallel_size}"
              f"{' with expert parallel' if s.expert_parallel else ''}: language weights "
              f"{_b(s.language_weight_bytes_per_gpu)}{fp8}, KV cache per token {_b(s.kv_bytes_per_token_per_gpu)} "
              f"(a {args.context}-token sequence {_b(s.kv_bytes_per_token_per_gpu * args.context)}); the vision "
              f"tower is not split (one replica per encoder GPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
