"""The vision tower: pixels -> visual_embeds [N, H] and deepstack_embeds [L, N, H].

The tower is transformers' Qwen3VLMoeVisionModel fed with the checkpoint's `model.visual.*`
weights (nothing else is read). Its attention is per image (cu_seqlens), so images of several
requests can share one forward without changing any image's result. Decoding files, the
checkpoint's image processor, caching and batching live in `qwen3vl.encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers.models.qwen3_vl_moe import Qwen3VLMoeVisionConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

from .checkpoint import load_tensors
from .config import ModelConfig


def _no_videos() -> torch.Tensor:
    return torch.empty(0, 3, dtype=torch.int64)


def _no_timestamps() -> torch.Tensor:
    return torch.empty(0, dtype=torch.float64)


@dataclass
class VisualFeatures:
    """The E->L tensors of one request (or one image or video, or one chunk of either). Rows:
    every image's tokens in prompt order, then every video's (each video's frame groups in
    order); the language side places them where the prompt's placeholders are."""
    visual_embeds: torch.Tensor     # [N, H] model dtype
    deepstack_embeds: torch.Tensor  # [L, N, H] model dtype
    image_grid_thw: torch.Tensor    # [k, 3] int64
    video_grid_thw: torch.Tensor = field(default_factory=_no_videos)          # [v, 3] int64
    video_timestamps: torch.Tensor = field(default_factory=_no_timestamps)    # [sum of t] float64 seconds

    @classmethod
    def empty(cls, config: ModelConfig) -> "VisualFeatures":
        h = config.visual_hidden_size
        return cls(torch.empty(0, h, dtype=config.dtype), torch.empty(config.deepstack_layers, 0, h, dtype=config.dtype),
                   torch.empty(0, 3, dtype=torch.int64))

    def rows(self, visual_embeds: torch.Tensor, deepstack_embeds: torch.Tensor) -> "VisualFeatures":
        """The same grids and timestamps with other rows (a chunk, a reordering)."""
        return replace(self, visual_embeds=visual_embeds, deepstack_embeds=deepstack_embeds)

    @property
    def nbytes(self) -> int:
        """Bytes of visual_embeds and deepstack_embeds (what the E->L transfer moves)."""
        return sum(t.numel() * t.element_size() for t in (self.visual_embeds, self.deepstack_embeds))

    @classmethod
    def concat(cls, parts: list["VisualFeatures"], config: ModelConfig) -> "VisualFeatures":
        """Several images' and videos' features as one request's (no copy for a single part):
        the parts holding images first, then those holding videos, each kind in order."""
        if not parts:
            return cls.empty(config)
        if len(parts) == 1:
            return parts[0]
        parts = ([p for p in parts if p.video_grid_thw.shape[0] == 0]
                 + [p for p in parts if p.video_grid_thw.shape[0] > 0])
        return cls(torch.cat([p.visual_embeds for p in parts]),
                   torch.cat([p.deepstack_embeds for p in parts], dim=1),
                   torch.cat([p.image_grid_thw for p in parts]),
                   torch.cat([p.video_grid_thw for p in parts]),
                   torch.cat([p.video_timestamps for p in parts]))


class VisionTower:
    """transformers' vision model on the checkpoint's weights, on `config.device` in `config.dtype`."""

    def __init__(self, config: ModelConfig):
        self.config = config
        vcfg = Qwen3VLMoeVisionConfig(**{k: v for k, v in config.vision.items() if k != "model_type"})
        vcfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = Qwen3VLMoeVisionModel._from_config(vcfg)
        tensors = load_tensors(config.checkpoint, ("model.visual.",), config.dtype, config.device,
                               name="vision tower")
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{config.checkpoint}: vision missing {missing[:5]}, unexpected {unexpected[:5]}")
        # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them.
        for module in model.modules():
            if hasattr(module, "compute_axial_rope_parameters"):
                inv_freq, _ = module.compute_axial_rope_parameters(vcfg)
                module.inv_freq = inv_freq.to(config.device)
                module.original_inv_freq = module.inv_freq.clone()
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> list[VisualFeatures]:
        """pixel_values [P, C*t*p*p] and grids [k, 3] (the image and video processors' outputs for
        k images and videos, concatenated: the tower treats a video (T, h, w) as T frame groups)
        -> one VisualFeatures per grid row (with image_grid_thw = that row; a caller makes a
        video's its video_grid_thw), each its own memory (a cached image must not pin the whole
        batch's output)."""
        out = self.model(pixel_values.to(self.config.device, self.config.dtype), grid_thw=grids.to(self.config.device))
        tokens = (grids.prod(-1) // self.config.spatial_merge_size**2).tolist()
        embeds = out.pooler_output                        # [N_all, H]
        deepstack = torch.stack(out.deepstack_features)   # [L, N_all, H]
        features, start = [], 0
        for i, n in enumerate(tokens):
            features.append(VisualFeatures(embeds[start:start + n].clone(), deepstack[:, start:start + n].clone(),
                                           grids[i:i + 1].clone()))
            start += n
        return features
