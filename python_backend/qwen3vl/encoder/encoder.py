"""VisionEncoder: image files of several requests -> each request's E->L tensors, through the
feature cache and one vision forward for whatever the cache lacks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import NotCached
from ..model.config import ModelConfig
from ..model.vision import VisionTower, VisualFeatures
from .cache import CachedImage, FeatureCache
from .images import ImageError, decode_image


@dataclass
class EncodeReport:
    """What one `encode` call did (metrics)."""
    requests: int = 0
    images: int = 0
    cache_hits: int = 0  # images served from the cache
    encoded: int = 0     # distinct images that went through the tower
    forwards: int = 0


class VisionEncoder:
    """The checkpoint's image processor, the vision tower and a feature cache of `cache_bytes`."""

    def __init__(self, config: ModelConfig, image_processor, cache_bytes: int = 1 << 30, fault_sha256: str = ""):
        self.config = config
        self.fault_sha256 = fault_sha256  # fault tests: a forward holding this file raises
        self.image_processor = image_processor
        self.cache = FeatureCache(cache_bytes, image_processor.to_json_string())
        self.last = EncodeReport()
        self.tower = VisionTower(config)

    def preprocess(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [P, C*t*p*p] and image_grid_thw [k, 3], by the checkpoint's processor."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def encode(self, per_request: list[list["bytes | CachedImage"]]) -> list[VisualFeatures | Exception]:
        """One vision forward for all images of all requests that the cache lacks; results
        assembled per request. A request with an undecodable image gets its ImageError back
        (a CachedImage the cache lacks: NotCached); the others still run. `self.last`
        describes what this call did (metrics)."""
        keys = [[self.cache.key(b) for b in req] for req in per_request]
        # Decode only what the cache lacks, once per distinct image.
        todo: dict[str, Image.Image] = {}
        failed: dict[int, Exception] = {}
        hits = 0
        for r, (req, req_keys) in enumerate(zip(per_request, keys)):
            for i, (data, key) in enumerate(zip(req, req_keys)):
                if key in todo:
                    continue
                if self.cache.get(key) is not None:
                    hits += 1
                    continue
                if isinstance(data, CachedImage):
                    failed[r] = NotCached(f"images[{i}] is not in the encoder's cache: send the image itself")
                    break
                try:
                    todo[key] = decode_image(data, i)
                except ImageError as e:
                    failed[r] = e
                    break
        if todo:
            if self.fault_sha256:
                self._inject_fault(per_request)
            pixels, grids = self.preprocess(list(todo.values()))
            for key, features in zip(todo, self.tower(pixels, grids)):
                self.cache.put(key, features)
        self.last = EncodeReport(requests=len(per_request), images=sum(map(len, per_request)),
                                 cache_hits=hits, encoded=len(todo), forwards=1 if todo else 0)
        results = [failed.get(r) or VisualFeatures.concat([self.cache.get(k) for k in req_keys], self.config)
                   for r, req_keys in enumerate(keys)]
        self.cache.unpin()
        return results

    def _inject_fault(self, per_request: list[list]) -> None:
        files = (b for req in per_request for b in req if isinstance(b, bytes))
        if any(hashlib.sha256(b).hexdigest() == self.fault_sha256 for b in files):
            raise RuntimeError("injected fault (inject_fault_image_sha256)")
