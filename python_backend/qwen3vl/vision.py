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
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from transformers.models.qwen3_vl_moe import Qwen3VLMoeVisionConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

from .checkpoint import load_tensors
from .config import ModelConfig


log = logging.getLogger(__name__)


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


@dataclass
class EncodeJob:
    images: list[bytes]
    done: Callable[["VisualFeatures | Exception"], None]


class EncodeBatcher:
    """Collects the requests that arrive while the tower is busy (or within `max_delay_s` of
    the first) and encodes them in one forward, up to `max_images` images per forward.
    `on_batch(requests, images, seconds)` reports each forward (metrics)."""

    def __init__(self, encoder: VisionEncoder, max_delay_s: float = 0.0, max_images: int = 64,
                 on_batch: Callable[[int, int, float], None] | None = None):
        self.encoder, self.max_delay_s, self.max_images = encoder, max_delay_s, max_images
        self.on_batch = on_batch or (lambda *_: None)
        self.jobs: queue.Queue[EncodeJob | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="qwen3vl-encoder", daemon=True)
        self.thread.start()

    def submit(self, job: EncodeJob) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

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
            try:
                results = self.encoder.encode([job.images for job in batch])
            except Exception as e:  # noqa: BLE001 - a failed forward fails its requests only
                log.exception("vision forward failed")
                results = [RuntimeError(f"vision encoder failed: {e}")] * len(batch)
            encoded = sum(len(j.images) for j, r in zip(batch, results) if not isinstance(r, Exception))
            try:
                self.on_batch(len(batch), encoded, time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - metrics must never stop the encoder
                log.exception("encoder batch report failed")
            for job, result in zip(batch, results):
                try:
                    job.done(result)
                except Exception:  # noqa: BLE001 - one failed reply must not stop the others
                    log.exception("encoder reply failed")
