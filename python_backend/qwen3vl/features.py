"""The E->L features: what the encoder hands the language model, in memory and on the wire.

These are the contract's encoder-to-language tensors (contract.py: `visual_embeds`,
`deepstack_embeds`, `image_grid_thw`, `video_grid_thw`, `video_timestamps`) as one object. The
vision tower makes them, the encoder caches them, the transfer moves them between servers, the
engine places them in the prompt and the decoder adds them. This module sits beside contract.py
and imports nothing from `model/`, so the wire format and the engine's request state load
without transformers' modeling code.

Rows: every image's visual tokens in prompt order, then every video's (each video's frame
groups in order); the language side reorders them to where the prompt's placeholders are. The
same name is used from the vision tower to the decoder layers: `deepstack_embeds [L, N, H]`,
one row per visual token in each of the L deepstack layers (Qwen3-VL's
`deepstack_visual_indexes`, 3 in the released checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch


class FeatureDims(Protocol):
    """What empty features need to know of a model (model.config.ModelConfig has these)."""
    visual_hidden_size: int   # H
    deepstack_layers: int     # L
    dtype: torch.dtype        # the model dtype


def _no_grids() -> torch.Tensor:
    return torch.empty(0, 3, dtype=torch.int64)


def _no_timestamps() -> torch.Tensor:
    return torch.empty(0, dtype=torch.float64)


@dataclass
class VisualFeatures:
    """The E->L tensors of one request, or of one image, video, or chunk of either (torch)."""
    visual_embeds: torch.Tensor     # [N, H] model dtype
    deepstack_embeds: torch.Tensor  # [L, N, H] model dtype
    image_grid_thw: torch.Tensor    # [k, 3] int64, one row per image
    video_grid_thw: torch.Tensor = field(default_factory=_no_grids)        # [v, 3] int64, one row per video
    video_timestamps: torch.Tensor = field(default_factory=_no_timestamps)  # [sum of t] float64 seconds

    @classmethod
    def empty(cls, dims: FeatureDims) -> "VisualFeatures":
        """No visual tokens: [0, H] and [L, 0, H] in the model dtype (a text-only request)."""
        h = dims.visual_hidden_size
        return cls(torch.empty(0, h, dtype=dims.dtype), torch.empty(dims.deepstack_layers, 0, h, dtype=dims.dtype),
                   _no_grids())

    def rows(self, visual_embeds: torch.Tensor, deepstack_embeds: torch.Tensor) -> "VisualFeatures":
        """The same grids and timestamps with other rows (a chunk, a reordering)."""
        return replace(self, visual_embeds=visual_embeds, deepstack_embeds=deepstack_embeds)

    @property
    def nbytes(self) -> int:
        """Bytes of visual_embeds and deepstack_embeds (what the E->L transfer moves)."""
        return sum(t.numel() * t.element_size() for t in (self.visual_embeds, self.deepstack_embeds))

    @classmethod
    def concat(cls, parts: list["VisualFeatures"], dims: FeatureDims) -> "VisualFeatures":
        """Several images' and videos' features as one request's (no copy for a single part):
        the parts holding images first, then those holding videos, each kind in order."""
        if not parts:
            return cls.empty(dims)
        if len(parts) == 1:
            return parts[0]
        parts = ([p for p in parts if p.video_grid_thw.shape[0] == 0]
                 + [p for p in parts if p.video_grid_thw.shape[0] > 0])
        return cls(torch.cat([p.visual_embeds for p in parts]),
                   torch.cat([p.deepstack_embeds for p in parts], dim=1),
                   torch.cat([p.image_grid_thw for p in parts]),
                   torch.cat([p.video_grid_thw for p in parts]),
                   torch.cat([p.video_timestamps for p in parts]))


@dataclass
class WireFeatures:
    """The same tensors as numpy arrays in the wire dtype, as a chunk arrives (a gRPC response,
    or views of a shared-memory region). numpy has no bfloat16: bf16 arrays are
    `ml_dtypes.bfloat16` (tritonclient) or uint16 bits (shared memory); tensors.to_torch
    turns either into torch without a copy."""
    visual_embeds: np.ndarray     # [n, H] wire dtype
    deepstack_embeds: np.ndarray  # [L, n, H] wire dtype
    image_grid_thw: np.ndarray    # [k, 3] int64 (k = 1 for an image's chunk, 0 for a video's)
    video_grid_thw: np.ndarray = field(default_factory=lambda: np.empty((0, 3), np.int64))  # [v, 3] int64
    video_timestamps: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))   # [sum of t] float64

    @property
    def nbytes(self) -> int:
        return self.visual_embeds.nbytes + self.deepstack_embeds.nbytes
