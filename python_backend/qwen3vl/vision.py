"""The vision tower: encoded images -> visual_embeds [N, H], deepstack_embeds [L, N, H], grids.

Pixels come from the checkpoint's own image processor; the tower is transformers'
Qwen3VLMoeVisionModel fed with the checkpoint's `model.visual.*` weights (nothing else is read).
Images of several requests go through one forward: the tower's attention is per image
(cu_seqlens), so batching them changes no image's result.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from transformers.models.qwen3_vl_moe import Qwen3VLMoeVisionConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

from .checkpoint import load_tensors
from .config import ModelConfig
from .worker import JobThread


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedImage:
    """An image named by the SHA-256 of its file instead of sent again: a resume or a repeat
    between servers costs no upload. Served from the cache, or NotCached."""
    digest: bytes


class NotCached(LookupError):
    """A CachedImage the cache does not hold (evicted, or another encoder): send the file."""


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


def image_file_bytes(data: bytes, index: int) -> bytes:
    """The image file itself: raw bytes as given, or the payload of a base64 `data:` URL (what
    JSON clients of Triton's HTTP generate endpoint send). Cache keys and routing hash these
    bytes, so the same image hits the same cache entry whichever way it came."""
    if data[:5] != b"data:":
        return data
    header, _, payload = data.partition(b",")
    if not header.endswith(b";base64"):
        raise ImageError(f"images[{index}]: a data URL must be base64 (data:image/...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise ImageError(f"images[{index}]: bad base64 in data URL: {e}") from None


def decode_image(data: bytes, index: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"images[{index}] ({len(data)} bytes) is not a decodable image: {e}") from None
    return image


class VisionEncoder:
    def __init__(self, config: ModelConfig, image_processor, cache_bytes: int = 1 << 30):
        self.config = config
        self.image_processor = image_processor
        self.cache = FeatureCache(cache_bytes, image_processor.to_json_string())
        self.last = EncodeReport()
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
    def encode(self, per_request: list[list["bytes | CachedImage"]]) -> list[VisualFeatures | Exception]:
        """One vision forward for all images of all requests that the cache lacks; results
        assembled per request. A request with an undecodable image gets its ImageError back;
        the others still run. `self.last` describes what this call did (metrics)."""
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
            self._forward(todo)
        self.last = EncodeReport(requests=len(per_request), images=sum(map(len, per_request)),
                                 cache_hits=hits, encoded=len(todo), forwards=1 if todo else 0)
        results = [failed.get(r) or self._assemble(req_keys) for r, req_keys in enumerate(keys)]
        self.cache.unpin()
        return results

    def _forward(self, images: dict[str, Image.Image]) -> None:
        pixels, grids = self.preprocess(list(images.values()))
        out = self.model(pixels.to(self.config.device, self.config.dtype), grid_thw=grids.to(self.config.device))
        tokens = (grids.prod(-1) // self.config.spatial_merge_size**2).tolist()
        embeds = out.pooler_output                        # [N_all, H]
        deepstack = torch.stack(out.deepstack_features)   # [L, N_all, H]
        start = 0
        for i, (key, n) in enumerate(zip(images, tokens)):
            # clone: a cached image must not pin the whole batch's output in memory
            self.cache.put(key, VisualFeatures(embeds[start:start + n].clone(), deepstack[:, start:start + n].clone(),
                                               grids[i:i + 1].clone()))
            start += n

    def _assemble(self, keys: list[str]) -> VisualFeatures:
        if not keys:
            return VisualFeatures.empty(self.config)
        parts = [self.cache.get(k) for k in keys]
        if len(parts) == 1:
            return parts[0]
        return VisualFeatures(torch.cat([p.visual_embeds for p in parts]),
                              torch.cat([p.deepstack_embeds for p in parts], dim=1),
                              torch.cat([p.image_grid_thw for p in parts]))


@dataclass
class EncodeReport:
    requests: int = 0
    images: int = 0
    cache_hits: int = 0  # images served from the cache
    encoded: int = 0     # distinct images that went through the tower
    forwards: int = 0


class FeatureCache:
    """Per-image features, LRU, bounded in bytes. Key: a hash of the image bytes plus the image
    processor's settings (the same bytes under other settings give other features)."""

    def __init__(self, max_bytes: int, settings: str):
        self.max_bytes, self.bytes = max_bytes, 0
        self.salt = hashlib.sha256(settings.encode()).digest()
        self.items: OrderedDict[str, VisualFeatures] = OrderedDict()
        self.lock = threading.Lock()
        # Features of the current batch stay reachable even if the cache is too small to keep
        # them; the batch's results are assembled before the next batch runs.
        self.pinned: dict[str, VisualFeatures] = {}

    def key(self, data: "bytes | CachedImage") -> str:
        digest = data.digest if isinstance(data, CachedImage) else hashlib.sha256(data).digest()
        return hashlib.sha256(self.salt + digest).hexdigest()

    @staticmethod
    def size(f: VisualFeatures) -> int:
        return sum(t.numel() * t.element_size() for t in (f.visual_embeds, f.deepstack_embeds, f.image_grid_thw))

    def get(self, key: str) -> VisualFeatures | None:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            return self.pinned.get(key)

    def put(self, key: str, features: VisualFeatures) -> None:
        size = self.size(features)
        with self.lock:
            self.pinned[key] = features
            if size > self.max_bytes or key in self.items:
                return
            self.items[key] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.bytes -= self.size(old)

    def unpin(self) -> None:
        with self.lock:
            self.pinned.clear()


@dataclass
class EncodeJob:
    images: list[bytes]
    done: Callable[["VisualFeatures | Exception"], None]


class EncodeBatcher(JobThread[EncodeJob]):
    """Collects the requests that arrive while the tower is busy (or within `max_delay_s` of
    the first) and encodes them in one forward, up to `max_images` images per forward.
    `on_batch(report, seconds)` describes each batch (metrics)."""

    def __init__(self, encoder: VisionEncoder, max_delay_s: float = 0.0, max_images: int = 64,
                 on_batch: Callable[[EncodeReport, float], None] | None = None):
        self.encoder, self.max_delay_s, self.max_images = encoder, max_delay_s, max_images
        self.on_batch = on_batch or (lambda *_: None)
        super().__init__("qwen3vl-encoder")

    def _next_batch(self) -> list[EncodeJob] | None:
        first = self.jobs.get()
        if first is None:
            return None
        batch, images = [first], len(first.images)
        deadline = time.monotonic() + self.max_delay_s
        while images < self.max_images:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self.jobs.put(None)
                break
            batch.append(job)
            images += len(job.images)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            start = time.perf_counter()
            report = EncodeReport(requests=len(batch))
            try:
                results = self.encoder.encode([job.images for job in batch])
                report = self.encoder.last
            except Exception as e:  # noqa: BLE001 - a failed forward fails its requests only
                log.exception("vision forward failed")
                results = [RuntimeError(f"vision encoder failed: {e}")] * len(batch)
            try:
                self.on_batch(report, time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - metrics must never stop the encoder
                log.exception("encoder batch report failed")
            for job, result in zip(batch, results):
                try:
                    job.done(result)
                except Exception:  # noqa: BLE001 - one failed reply must not stop the others
                    log.exception("encoder reply failed")

