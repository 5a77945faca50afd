"""Native FP8 (fp8_mode native): the language model's FP8 weights kept as the checkpoint stores
them, with their 128x128 block scales, and run by the W8A8 block-FP8 kernels.

What runs natively: every FP8 Linear of the decoder (attention q/k/v/o, a dense MLP's
gate/up/down) as an `Fp8Linear`, and each MoE layer's FP8 experts as `Fp8Experts` (the fused
MoE's FP8 path). Activations are quantized per token group of 128 at run time (dynamic
scheme). The ops come from the kernel selection (kernels.kernel_ops): Triton's block-FP8
kernels, or, with kernels=torch, the torch emulation of the same math (the tests' oracle).
Whatever the checkpoint leaves unquantized (embeddings, norms, router, lm_head) and the vision
tower (run by transformers' vision model) stay as on the dequantized path.

`install_native_fp8` swaps the modules by name after the model is built, so the decoder's
classes (model/text.py) know nothing of FP8 except SparseMoe's call into `Fp8Experts`.
`check_native_fp8` decides at load, from the safetensors headers alone, whether a checkpoint
can run natively (and refuses by tensor name where it cannot). Under tensor / expert
parallelism each rank keeps its share of the FP8 weights and their scales as stored
(model/checkpoint.py reads them with get_slice on block-aligned bounds); `fp8_shard_check` is
the rule every share keeps (`check_fp8_shards`, `native_fp8_here`): a shard never splits a
128x128 scale block.

The kernels themselves take any N and K (ragged edge tiles are masked; the last activation
group holds what is left of K). What needs 128-multiples is stacking the release's per-expert
gate and up weights into the fused MoE's w13 [E, 2I, H]: their scale grids only concatenate
when I % 128 == 0 (else one 128-row scale block of w13 would straddle gate and up rows).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import InvalidInput
from ..kernels.fp8_reference import BLOCK, FP8_DTYPE, scale_grid
from .checkpoint import shard_header, weight_map
from ..parallel.shard import SKIP, Shard
from .fp8 import SCALE_SUFFIX, fp8_pairs, read_quantization_config

LANGUAGE_PREFIX = "model.language_model."
# Checkpoint names (below LANGUAGE_PREFIX) of the FP8 tensors that run natively.
LINEAR = re.compile(r"^layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate_proj|up_proj|down_proj))\.weight$")
PER_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def runs_natively(name: str) -> bool:
    """Whether the FP8 tensor `name` (a checkpoint name) has a native module: the language
    model's Linear weights and experts. Others (the vision tower's) are dequantized."""
    if not name.startswith(LANGUAGE_PREFIX):
        return False
    short = name[len(LANGUAGE_PREFIX):]
    return bool(LINEAR.match(short) or PER_EXPERT.match(short) or FUSED.match(short))


class Fp8Linear(nn.Module):
    """A Linear layer on block-FP8 weights, W8A8.

    weight float8_e4m3fn [N, K] (nn.Linear's [out, in]); weight_scale_inv fp32
    [ceil(N/128), ceil(K/128)] (W = q * s per tile); bias [N] in the model dtype or None.
    forward: x [..., K] (the model dtype) -> [..., N] in x's dtype: x quantized per token group
    of 128, the block-FP8 GEMM accumulated in fp32 (`linear`: kernels.KernelOps'
    w8a8_block_fp8_linear, the Triton kernel or the torch emulation). After vLLM's Fp8LinearMethod
    with a weight block size (apply_w8a8_block_fp8_linear)."""

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 linear: Callable):
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.dim() != 2 or \
                tuple(weight_scale_inv.shape) != scale_grid(tuple(weight.shape), BLOCK):
            raise ValueError(f"Fp8Linear: weight {weight.dtype} {tuple(weight.shape)} with scales "
                             f"{tuple(weight_scale_inv.shape)} is not an FP8 [N, K] with [ceil(N/128), ceil(K/128)]")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(weight_scale_inv.float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = self.linear(x.reshape(-1, self.in_features).contiguous(), self.weight, self.weight_scale_inv)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, 128x128 block scales"


class Fp8Experts(nn.Module):
    """One MoE layer's routed experts on block-FP8 weights, W8A8 (vLLM's names and layout):
    w13_weight float8_e4m3fn [E, 2I, H] (each expert's gate rows, then its up rows) with
    w13_weight_scale_inv fp32 [E, ceil(2I/128), ceil(H/128)]; w2_weight [E, H, I] with
    w2_weight_scale_inv [E, ceil(H/128), ceil(I/128)].
    forward(x [M, H], topk_weights [M, K] (x's dtype), topk_ids [M, K]) -> [M, H] in x's dtype
    through `fused_moe_fp8` (kernels.KernelOps': the Triton fused MoE's FP8 path or the torch
    emulation)."""

    def __init__(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                 fused_moe_fp8: Callable):
        super().__init__()
        self.w13_weight = nn.Parameter(w13, requires_grad=False)
        self.w13_weight_scale_inv = nn.Parameter(w13_scale.float(), requires_grad=False)
        self.w2_weight = nn.Parameter(w2, requires_grad=False)
        self.w2_weight_scale_inv = nn.Parameter(w2_scale.float(), requires_grad=False)
        self.fused_moe_fp8 = fused_moe_fp8

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.fused_moe_fp8(x, self.w13_weight, self.w13_weight_scale_inv, self.w2_weight,
                                  self.w2_weight_scale_inv, topk_weights, topk_ids)


def stack_experts(tensors: dict[str, torch.Tensor], experts: str, num_experts: int, hidden: int, inter: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], its scales, w2 [E, H, I], its scales) of the experts `experts` (e.g.
    "layers.0.mlp.experts"), popped from `tensors` ({name: tensor} with FP8 weights and their
    `_scale_inv`), from either layout: per expert (`{e}.gate_proj.weight` [I, H] etc., the
    release: gate and up rows stacked, their scale grids concatenated, which needs I % 128 == 0)
    or fused (`gate_up_proj` / `down_proj` in hub [E, H, 2I] / [E, I, H] or transformers'
    [E, 2I, H] / [E, H, I] layout, told apart by shape; weights and scales transposed to the
    kernel's layout and made contiguous). Raises ValueError naming the tensor for a shape that
    fits no layout, a missing expert, or per-expert experts with I not a multiple of 128."""
    fused = f"{experts}.gate_up_proj"
    if fused in tensors:
        out = []
        for name, kernel in ((fused, (2 * inter, hidden)), (f"{experts}.down_proj", (hidden, inter))):
            if name not in tensors or name + SCALE_SUFFIX not in tensors:
                raise ValueError(f"{name}: missing (or not FP8) while {fused} is FP8")
            q, s = tensors.pop(name), tensors.pop(name + SCALE_SUFFIX)
            if tuple(q.shape[1:]) == kernel[::-1]:            # hub [E, in, out]: to [E, out, in]
                q, s = q.transpose(1, 2), s.transpose(1, 2)
            elif tuple(q.shape[1:]) != kernel:
                raise ValueError(f"{name}: shape {tuple(q.shape)} fits neither expert layout {kernel[::-1]} nor {kernel}")
            out += [q.contiguous(), s.contiguous()]
        return out[0], out[1], out[2], out[3]
    if inter % BLOCK[0]:
        raise ValueError(f"{experts}.0.gate_proj.weight: per-expert FP8 experts need moe_intermediate_size "
                         f"({inter}) to be a multiple of {BLOCK[0]} to run natively: the fused MoE stacks gate and "
                         "up into one weight, and their scale blocks only stack whole")
    rows = {}
    for e in range(num_experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"{experts}.{e}.{proj}.weight"
            if name not in tensors or name + SCALE_SUFFIX not in tensors:
                raise ValueError(f"{name}: missing (or not FP8) while other experts of the layer are FP8")
            want = (hidden, inter) if proj == "down_proj" else (inter, hidden)
            if tuple(tensors[name].shape) != want:
                raise ValueError(f"{name}: shape {tuple(tensors[name].shape)}, expected {want}")
            rows[e, proj] = (tensors.pop(name), tensors.pop(name + SCALE_SUFFIX))
    w13 = torch.stack([torch.cat((rows[e, "gate_proj"][0], rows[e, "up_proj"][0])) for e in range(num_experts)])
    s13 = torch.stack([torch.cat((rows[e, "gate_proj"][1], rows[e, "up_proj"][1])) for e in range(num_experts)])
    w2 = torch.stack([rows[e, "down_proj"][0] for e in range(num_experts)])
    s2 = torch.stack([rows[e, "down_proj"][1] for e in range(num_experts)])
    return w13, s13, w2, s2


def install_native_fp8(model: nn.Module, tensors: dict[str, torch.Tensor], ops, num_experts: int, hidden: int,
                       inter: int) -> dict[str, torch.Tensor]:
    """Swap the modules of `model` (the LanguageModel, built on the meta device) whose weights
    `tensors` holds as FP8 (load_tensors(keep_fp8=runs_natively), names below
    model.language_model.) for Fp8Linear and Fp8Experts running `ops` (kernels.KernelOps), and
    return the other tensors plus the new modules' own, for load_state_dict. A Linear's bias, if any, moves with it.
    Raises ValueError naming a tensor that cannot run natively (stack_experts)."""
    tensors = dict(tensors)
    fp8 = [n for n, t in tensors.items() if t.dtype == FP8_DTYPE]
    for name in fp8:
        if name not in tensors:                  # taken with its layer's other experts
            continue
        expert = PER_EXPERT.match(name) or FUSED.match(name)
        if expert:
            experts = expert.group(1)
            w13, s13, w2, s2 = stack_experts(tensors, experts, num_experts, hidden, inter)
            parent = model.get_submodule(experts.rsplit(".", 1)[0])
            parent.experts = Fp8Experts(w13, s13, w2, s2, ops.fused_moe_fp8)
        elif LINEAR.match(name):
            module = name.removesuffix(".weight")
            owner, attr = module.rsplit(".", 1)
            bias = tensors.pop(module + ".bias", None)
            setattr(model.get_submodule(owner), attr, Fp8Linear(tensors.pop(name), tensors.pop(name + SCALE_SUFFIX),
                                                                 bias, ops.w8a8_block_fp8_linear))
        else:
            raise ValueError(f"{name}: FP8, but no native module runs it (only the decoder's Linear weights and experts)")
    for path, module in model.named_modules():   # the new modules' own tensors: load_state_dict sees them whole
        if isinstance(module, (Fp8Linear, Fp8Experts)):
            tensors.update({f"{path}.{k}": v for k, v in module.state_dict().items()})
    return tensors


def language_fp8_shapes(checkpoint: str | Path) -> dict[str, tuple[int, ...]]:
    """{checkpoint name: shape} of the language model's FP8 weights (those with a
    `_scale_inv` sibling), from the safetensors headers alone (no bytes read)."""
    checkpoint = Path(checkpoint)
    shards = {}
    for name, shard in weight_map(checkpoint).items():
        shards.setdefault(shard, []).append(name)
    header = {}
    for shard, names in shards.items():
        h = shard_header(checkpoint / shard)
        header.update({n: h[n] for n in names if n.startswith(LANGUAGE_PREFIX)})
    quantization = read_quantization_config(json.loads((checkpoint / "config.json").read_text()))
    return {name: tuple(header[name]["shape"]) for name in fp8_pairs(header, quantization, str(checkpoint))}


def check_native_fp8(checkpoint: str | Path, mode: str, setting: str, num_experts: int, inter: int,
                     progress=print) -> str:
    """The FP8 mode to load with, given `mode` as resolve_fp8_mode chose it from `setting`: when
    native, the checkpoint's language-model FP8 tensors are checked from the safetensors headers
    (no bytes read) against what the native modules run (stack_experts' rule: per-expert experts
    need moe_intermediate_size % 128 == 0). Where they cannot: setting "native" raises
    ValueError naming the tensor and why; "auto" returns "dequantize" and prints (`progress`)
    one line saying why. Otherwise returns `mode`."""
    if mode != "native":
        return mode
    problem = None
    for name in sorted(language_fp8_shapes(checkpoint)):
        expert = PER_EXPERT.match(name[len(LANGUAGE_PREFIX):])
        if not runs_natively(name):
            problem = f"{name}: FP8, but no native module runs it"
        elif expert and expert.group(3) != "down_proj" and inter % BLOCK[0]:
            problem = (f"{name}: per-expert FP8 experts need moe_intermediate_size ({inter}) to be a multiple of "
                       f"{BLOCK[0]} to run natively (gate and up are stacked into one weight for the fused MoE, and "
                       "their scale blocks only stack whole)")
        if problem:
            break
    if problem is None:
        return "native"
    if setting == "native":
        raise ValueError(f"fp8_mode=native cannot run {checkpoint}: {problem}; choose fp8_mode auto or dequantize")
    progress(f"fp8_mode auto: dequantizing at load, not native: {problem}")
    return "dequantize"


def check_fp8_shards(shapes: dict[str, tuple[int, ...]], shard: Shard, cfg) -> None:
    """Check that `shard`'s share of every FP8 weight (`shapes`: checkpoint name -> shape, as
    language_fp8_shapes gives) holds whole 128x128 scale blocks, so that the rank can read its
    weight rows/columns and the matching scale rows/columns as stored. Each cut that
    Shard.reads makes goes through fp8_shard_check: a column-parallel weight (q/k/v, gate/up)
    split by rows, a row-parallel one (o_proj, down) by columns, a fused gate_up's gate half and
    up half each split alike; k/v under KV-head replication (N > KV heads) are split KV ways
    only (each rank holds its KV head whole); an expert-parallel cut of the expert dim splits
    no block. Raises ValueError naming the tensor and the sizes (fp8_shard_check)."""
    for name, shape in sorted(shapes.items()):
        reads = shard.reads(name.removeprefix(LANGUAGE_PREFIX), shape, cfg)
        if reads is None or reads == SKIP:
            continue
        dim, nd = Shard.split_dim(reads[0]), len(shape)
        if dim < nd - 2:            # whole experts (expert parallel)
            continue
        held = reads[0][dim].stop - reads[0][dim].start
        part = list(shape)
        part[dim] = shape[dim] // len(reads)     # a fused gate_up: its gate half and its up half
        label = name if len(reads) == 1 else f"{name} (each of its gate and up halves)"
        fp8_shard_check(label, tuple(part), dim - nd, part[dim] // held)


def native_fp8_here(config, shard: Shard, progress=print) -> bool:
    """Whether a language model loads its FP8 weights natively: config.fp8_mode (model/config.py
    ModelConfig) is "native", and under tensor parallelism (shard.world_size > 1) every rank's
    share of every FP8 weight holds whole scale blocks (check_fp8_shards, from the checkpoint's
    headers). Where a share would split a block: with config.fp8_setting "native" that raises
    InvalidInput naming the tensor and the size; with "auto" it returns False and prints
    (`progress`) one line saying why (each rank then reads its share dequantized)."""
    if config.fp8_mode != "native":
        return False
    if shard.world_size == 1:
        return True
    try:
        check_fp8_shards(language_fp8_shapes(config.checkpoint), shard, config.text)
    except ValueError as e:
        where = f"tensor_parallel_size {shard.world_size}" + (" with expert parallel" if shard.expert_parallel else "")
        if config.fp8_setting == "native":
            raise InvalidInput(f"fp8_mode=native cannot run under {where}: {e}; choose fp8_mode auto or dequantize, "
                               "or another tensor_parallel_size") from None
        progress(f"fp8_mode auto: dequantizing at load, not native: {where}: {e}")
        return False
    return True


def fp8_shard_check(name: str, shape: tuple[int, ...], dim: int, world_size: int,
                    block: tuple[int, int] = BLOCK) -> int:
    """The size of each of `world_size` equal shards of the FP8 weight `name` of `shape`
    ([..., N, K], nn.Linear's [out, in] or stacked experts' [E, out, in]) split along `dim`
    (-2 or the rows: column parallel, e.g. q/k/v, gate/up; -1 or the columns: row parallel,
    e.g. o_proj, down_proj), for tensor parallelism. A shard must hold whole 128x128 scale
    blocks, so that each rank slices its weight and its weight_scale_inv alike: the split size
    must divide evenly and be a multiple of the block along that dim (vLLM checks the same,
    `validate_fp8_block_shape`). Splitting the expert dim (expert parallel) never splits a
    block and needs no check. Raises ValueError naming the tensor, the dim and the sizes."""
    nd = len(shape)
    axis = dim % nd
    if axis < nd - 2:
        raise ValueError(f"{name}: dim {dim} of {list(shape)} is not one of the two block-scaled dims (-2, -1)")
    size, b = shape[axis], block[axis - (nd - 2)]
    if world_size < 1:
        raise ValueError(f"{name}: world_size {world_size} must be at least 1")
    if world_size == 1:
        return size
    part = size // world_size
    if size % world_size or part % b:
        raise ValueError(f"{name}: FP8 weight {list(shape)} cannot be split {world_size} ways along dim {dim}: each "
                         f"shard would hold {size / world_size:g} of its {size}, which is not a whole number of "
                         f"{b}-wide scale blocks (a shard must never split a 128x128 block of weight_scale_inv)")
    return part
