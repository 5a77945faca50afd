"""A checkpoint's tensors as Qwen's FP8 releases store them (block-quantized, per-expert experts).

No FP8 checkpoint can be downloaded here, so the tests make their own from ours: every Linear
weight of the decoder (attention q/k/v/o, the experts, a dense MLP's projections), and with
`vision` also the vision blocks' Linear weights, is quantized per 128 x 128 tile
(kernels/fp8_reference.quantize_block_fp8: s = amax / 448, q = e4m3(w / s), ceil-sized edge
tiles) and stored as F8_E4M3 with an fp32 (or bf16) `<name>_scale_inv`. The embeddings, norms,
the router `mlp.gate`, lm_head and the vision mergers stay as they were, and the config's
`quantization_config` lists them like the release does (model/fp8.py reads it).

Expert layouts written: `per-expert` (the release: `experts.{e}.{gate,up,down}_proj.weight`
[out, in], each with its own scale grid), `hub` (fused [E, H, 2I] / [E, I, H], scales
[E, ceil(H/128), ceil(2I/128)] / [E, ceil(I/128), ceil(H/128)]) or `transformers` (fused
[E, 2I, H] / [E, H, I], scales over those dims).

make_checkpoint.py uses this for `qwen3vl-make-checkpoint --fp8` and `quantize_fp8(src, dst)`.
"""

from __future__ import annotations

import re

import torch

from ..kernels.fp8_reference import BLOCK, quantize_block_fp8
from ..model.fp8 import SCALE_SUFFIX

EXPERT_LAYOUTS = ("per-expert", "hub", "transformers")
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
# The decoder's and the vision blocks' Linear weights: what the release quantizes.
_LANGUAGE_LINEAR = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|"
                              r"mlp\.(gate_proj|up_proj|down_proj))\.weight$")
_VISION_LINEAR = re.compile(r"^model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc[12])\.weight$")


def _quantized(name: str, t: torch.Tensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    q, s = quantize_block_fp8(t, BLOCK, scale_dtype)
    return {name: q, name + SCALE_SUFFIX: s}


def fp8_tensors(tensors: dict[str, torch.Tensor], layout: str = "per-expert", vision: bool = False,
                scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{hub name: tensor} of a whole checkpoint (fused experts in hub layout [E, H, 2I] /
    [E, I, H], any float dtype) -> the FP8 release's {name: tensor}: the Linear weights of the
    decoder (and of the vision blocks when `vision`) as float8_e4m3fn plus `<name>_scale_inv`
    in scale_dtype (fp32 or bf16), the experts in `layout` (EXPERT_LAYOUTS); every other
    tensor as given. Raises ValueError for an unknown layout. Quantization: s = amax / 448 per
    128x128 tile of the stored tensor (transformers' Fp8Quantize, DeepSeek's and Qwen's FP8)."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout {layout!r} is not one of {', '.join(EXPERT_LAYOUTS)}")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        fused = _FUSED.match(name)
        if fused and layout == "per-expert":
            experts, proj = fused.groups()
            for e in range(t.shape[0]):
                w = t[e].T                                 # hub [in, out] -> nn.Linear's [out, in]
                if proj == "gate_up_proj":
                    inter = w.shape[0] // 2                # gate = the first I output rows
                    out |= _quantized(f"{experts}.{e}.gate_proj.weight", w[:inter], scale_dtype)
                    out |= _quantized(f"{experts}.{e}.up_proj.weight", w[inter:], scale_dtype)
                else:
                    out |= _quantized(f"{experts}.{e}.down_proj.weight", w, scale_dtype)
        elif fused:
            out |= _quantized(name, t if layout == "hub" else t.transpose(1, 2), scale_dtype)
        elif _LANGUAGE_LINEAR.match(name) or (vision and _VISION_LINEAR.match(name)):
            out |= _quantized(name, t, scale_dtype)
        else:
            out[name] = t
    return out


def quantization_config(num_layers: int, vision: bool = False) -> dict:
    """The config.json entry of the FP8 release (FineGrainedFP8Config's fields, Qwen3-FP8's style
    of modules_to_not_convert: lm_head, each layer's norms and router), plus the vision tower
    (whole, or its mergers when its blocks are quantized)."""
    keep = ["lm_head", "model.language_model.embed_tokens"]
    for i in range(num_layers):
        layer = f"model.language_model.layers.{i}"
        keep += [f"{layer}.input_layernorm", f"{layer}.mlp.gate", f"{layer}.post_attention_layernorm"]
    keep += ["model.visual.merger", "model.visual.deepstack_merger_list"] if vision else ["model.visual"]
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "modules_to_not_convert": keep,
            "quant_method": "fp8", "weight_block_size": list(BLOCK)}
