"""The vision tower: encoded images -> visual_embeds [N, H], deepstack_embeds [L, N, H], grids.

Pixels come from the checkpoint's own image processor; the tower is transformers'
Qwen3VLMoeVisionModel fed with the checkpoint's `model.visual.*` weights (nothing else is read).
Images of several requests go through one forward: the tower's attention is per image
(cu_seqlens), so batching them changes no image's result.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from transformers.models.qwen3_vl_moe import Qwen3VLMoeVisionConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

from .checkpoint import load_tensors
from .config import ModelConfig


class ImageError(ValueError):
    """An input that is not a decodable image; the message names which one."""


@dataclass
class VisualFeatures:
    visual_embeds: torch.Tensor     # [N, H]
    deepstack_embeds: torch.Tensor  # [L, N, H]
    image_grid_thw: torch.Tensor    # [k, 3] int64

    @classmethod
    def empty(cls, config: ModelConfig) -> "VisualFeatures":
        h = config.visual_hidden_size
        return cls(torch.empty(0, h, dtype=config.dtype), torch.empty(config.deepstack_layers, 0, h, dtype=config.dtype),
                   torch.empty(0, 3, dtype=torch.int64))


def decode_image(data: bytes, index: int) -> Image.Image:
    """Raw image file bytes, or a base64 `data:` URL (what JSON clients of Triton's HTTP
    generate endpoint can send)."""
    if data[:5] == b"data:":
        header, _, payload = data.partition(b",")
        if not header.endswith(b";base64"):
            raise ImageError(f"images[{index}]: a data URL must be base64 (data:image/...;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise ImageError(f"images[{index}]: bad base64 in data URL: {e}") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"images[{index}] ({len(data)} bytes) is not a decodable image: {e}") from None
    return image


class VisionEncoder:
    def __init__(self, config: ModelConfig, image_processor):
        self.config = config
        self.image_processor = image_processor
        vcfg = Qwen3VLMoeVisionConfig(**{k: v for k, v in config.vision.items() if k != "model_type"})
        vcfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = Qwen3VLMoeVisionModel._from_config(vcfg)
        tensors = load_tensors(config.checkpoint, ("model.visual.",), config.dtype, config.device)
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{config.checkpoint}: vision missing {missing[:5]}, unexpected {unexpected[:5]}")
        # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them.
        for name, module in model.named_modules():
            if hasattr(module, "compute_axial_rope_parameters"):
                inv_freq, _ = module.compute_axial_rope_parameters(vcfg)
                module.inv_freq = inv_freq.to(config.device)
                module.original_inv_freq = module.inv_freq.clone()
        self.model = model.eval()

    def preprocess(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    @torch.inference_mode()
    def encode(self, per_request: list[list[bytes]]) -> list[VisualFeatures | ImageError]:
        """One vision forward for all images of all requests; results split back per request.
        A request with an undecodable image gets its ImageError back; the others still run."""
        decoded: list[list[Image.Image] | ImageError] = []
        for req in per_request:
            try:
                decoded.append([decode_image(b, i) for i, b in enumerate(req)])
            except ImageError as e:
                decoded.append(e)
        flat = [im for req in decoded if not isinstance(req, ImageError) for im in req]
        if not flat:
            return [req if isinstance(req, ImageError) else VisualFeatures.empty(self.config) for req in decoded]
        pixels, grids = self.preprocess(flat)
        out = self.model(pixels.to(self.config.device, self.config.dtype), grid_thw=grids.to(self.config.device))
        tokens_per_image = (grids.prod(-1) // self.config.spatial_merge_size**2).tolist()
        embeds = out.pooler_output                        # [N_all, H]
        deepstack = torch.stack(out.deepstack_features)   # [L, N_all, H]
        results, image_start, token_start = [], 0, 0
        for req in decoded:
            if isinstance(req, ImageError):
                results.append(req)
                continue
            n = sum(tokens_per_image[image_start:image_start + len(req)])
            sl = slice(token_start, token_start + n)
            results.append(VisualFeatures(embeds[sl], deepstack[:, sl], grids[image_start:image_start + len(req)]))
            image_start += len(req)
            token_start += n
        return results
