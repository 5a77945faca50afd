"""One frozen configuration object, read from a checkpoint's config.json and passed down.

The vision tower reuses transformers' own vision config class (the encoder runs transformers'
vision model); the language side has its own small dataclass because the decoder is ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidInput
from ..kernels import resolve_kernels
from .fp8 import Fp8Config, read_quantization_config, resolve_fp8_mode
from .fp8_linear import check_native_fp8


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    hidden_act: str = "silu"
    attention_bias: bool = False

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        # Released configs write `rope_scaling` (+ top-level rope_theta); transformers 5 writes
        # `rope_parameters`. Accept both.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported text rope_type {rope.get('rope_type')!r}")
        if rope.get("mrope_interleaved") is False:
            raise ValueError("only interleaved MRoPE (Qwen3-VL) is supported")
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        section = tuple(rope.get("mrope_section", (24, 20, 20)))
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r}")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=head_dim,
            moe_intermediate_size=d["moe_intermediate_size"],
            intermediate_size=d.get("intermediate_size", 0),
            num_experts=d.get("num_experts", d.get("num_local_experts")),  # transformers 5 writes the latter
            num_experts_per_tok=d["num_experts_per_tok"],
            # Qwen3-VL-MoE's router always renormalises the top-k weights.
            norm_topk_prob=d.get("norm_topk_prob", True),
            decoder_sparse_step=d.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            rms_norm_eps=d["rms_norm_eps"],
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 5_000_000.0)),
            mrope_section=section,  # type: ignore[arg-type]
            max_position_embeddings=d.get("max_position_embeddings", 262144),
            attention_bias=d.get("attention_bias", False),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Everything a server needs to know about one checkpoint, plus where it runs."""

    checkpoint: Path
    text: TextConfig
    vision: dict  # the raw vision_config; transformers' Qwen3VLMoeVisionConfig is built from it
    image_token_id: int
    spatial_merge_size: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kernels: str = "torch"  # the language model's kernels: "torch" or "triton" (kernels.resolve_kernels)
    quantization: Fp8Config | None = None   # the checkpoint's checked quantization_config (model/fp8.py)
    fp8_mode: str = "dequantize"            # how its FP8 weights run: "dequantize" or "native" (resolve_fp8_mode)
    raw: dict = field(default_factory=dict, repr=False, compare=False)
    fp8_setting: str = "auto"               # fp8_mode as asked (auto, dequantize, native), before resolving

    @property
    def deepstack_layers(self) -> int:
        return len(self.vision.get("deepstack_visual_indexes", ()))

    @property
    def visual_hidden_size(self) -> int:
        """H of `visual_embeds [N, H]`: the vision merger's output size (= text hidden size)."""
        return self.vision["out_hidden_size"]

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
             kernels: str = "auto", fp8_mode: str = "auto") -> "ModelConfig":
        """The checkpoint's config.json, on `device` (auto: cuda when available) in `dtype` (auto:
        bf16 on GPU, fp32 on CPU), with `kernels` (auto, torch, triton) and `fp8_mode` (auto,
        dequantize, native) resolved for that device and those kernels (model/fp8.resolve_fp8_mode,
        model/fp8_linear.check_native_fp8). Raises FileNotFoundError, ValueError (not a
        qwen3_vl_moe config; a quantization_config we do not run, naming the field; fp8_mode
        native on a checkpoint an FP8 tensor of which cannot run natively, naming it),
        InvalidInput (a dtype, kernels or fp8_mode value that does not apply)."""
        checkpoint = Path(checkpoint)
        config_path = checkpoint / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {checkpoint}")
        raw = json.loads(config_path.read_text())
        if raw.get("model_type") != "qwen3_vl_moe":
            raise ValueError(f"{config_path}: model_type is {raw.get('model_type')!r}, expected 'qwen3_vl_moe'")
        device = resolve_device(device or "auto")
        quantization = read_quantization_config(raw, str(config_path))
        text = TextConfig.from_dict(raw["text_config"])
        resolved_kernels = resolve_kernels(kernels, device)
        mode = resolve_fp8_mode(fp8_mode, device, quantized=quantization is not None, kernels=resolved_kernels)
        # native also needs every language-model FP8 tensor to have a native module (headers only)
        mode = check_native_fp8(checkpoint, mode, fp8_mode, text.num_experts, text.moe_intermediate_size)
        return cls(
            checkpoint=checkpoint,
            text=text,
            vision=dict(raw["vision_config"]),
            image_token_id=raw.get("image_token_id", 151655),
            spatial_merge_size=raw["vision_config"].get("spatial_merge_size", 2),
            device=device,
            dtype=resolve_dtype(dtype, device),
            kernels=resolved_kernels,
            quantization=quantization,
            fp8_mode=mode,
            raw=raw,
            fp8_setting=fp8_mode,
        )


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu; anything else as given."""
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Model dtype: bf16 on GPU and fp32 on CPU unless asked otherwise. Raises InvalidInput for
    an unknown name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise InvalidInput(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]
