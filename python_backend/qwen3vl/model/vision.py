"""The vision tower: pixels -> visual_embeds [N, H] and deepstack_embeds [L, N, H].

The tower is transformers' Qwen3VLMoeVisionModel fed with the checkpoint's `model.visual.*`
weights (nothing else is read). Its attention is per image (cu_seqlens), so images of several
requests can share one forward without changing any image's result. Decoding files, the
checkpoint's image processor, caching and batching live in `qwen3vl.encoder`.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl_moe import Qwen3VLMoeVisionConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

from ..features import VisualFeatures
from .checkpoint import load_tensors
from .config import ModelConfig


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
        visual_embeds = out.pooler_output                           # [N_all, H]
        deepstack_embeds = torch.stack(out.deepstack_features)      # [L, N_all, H]
        features, start = [], 0
        for i, n in enumerate(tokens):
            features.append(VisualFeatures(visual_embeds[start:start + n].clone(),
                                           deepstack_embeds[:, start:start + n].clone(), grids[i:i + 1].clone()))
            start += n
        return features
