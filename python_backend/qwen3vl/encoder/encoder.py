"""VisionEncoder: image and video files of several requests -> each request's E->L tensors,
through the feature cache and one vision forward for whatever the cache lacks (images and videos
share it: the tower's attention is per frame group, so a video encodes as its frame groups)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import InvalidInput, NotCached
from ..features import VisualFeatures
from ..model.config import ModelConfig
from ..model.vision import VisionTower
from ..settings import ServingConfig
from .cache import CachedImage, CachedVideo, FeatureCache
from .images import ImageError, decode_image
from .video import VideoFile, decode_frames, metadata


@dataclass
class EncodeReport:
    """What one `encode` call did (metrics)."""
    requests: int = 0
    images: int = 0      # images and videos
    cache_hits: int = 0  # images served from the cache
    encoded: int = 0     # distinct images that went through the tower
    forwards: int = 0


class VisionEncoder:
    """The checkpoint's image processor, the vision tower and a feature cache of `encoder_cache_mb`."""

    def __init__(self, config: ModelConfig, image_processor, video_processor=None,
                 settings: ServingConfig = ServingConfig()):
        self.config = config
        # fault tests: a forward holding this file raises
        self.fault_sha256 = settings.inject_fault_image_sha256
        self.image_processor = image_processor
        self.video_processor, self.cap_pixels_per_frame = video_processor, settings.video_cap_pixels_per_frame
        processing = image_processor.to_json_string()
        if video_processor is not None:
            processing += video_processor.to_json_string() + f"cap_pixels_per_frame={self.cap_pixels_per_frame}"
        self.cache = FeatureCache(settings.mib(settings.encoder_cache_mb), processing)
        self.last = EncodeReport()
        self.tower = VisionTower(config)

    def preprocess(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [P, C*t*p*p] and image_grid_thw [k, 3], by the checkpoint's processor."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def preprocess_videos(self, videos: list[VideoFile]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values_videos [P, C*t*p*p] and video_grid_thw [v, 3], by the checkpoint's video
        processor on the sampled frames (sampling done: do_sample_frames=False; the per-frame
        pixel cap as configured)."""
        frames = [decode_frames(v.data, v.index, v.indices, v.quarter_turns) for v in videos]
        out = self.video_processor(videos=frames, video_metadata=[metadata(v) for v in videos],
                                   do_sample_frames=False, cap_pixels_per_frame=self.cap_pixels_per_frame,
                                   return_tensors="pt")
        return out["pixel_values_videos"], out["video_grid_thw"]

    def _key(self, data) -> str:
        if isinstance(data, (VideoFile, CachedVideo)):
            return self.cache.key(data.key_bytes())
        return self.cache.key(data)

    def encode(self, per_request: list[list["bytes | CachedImage | VideoFile"]]) -> list[VisualFeatures | Exception]:
        """One vision forward for all images and videos of all requests that the cache lacks;
        results assembled per request (images' rows, then videos'). A request with an
        undecodable image or video gets its ImageError or VideoError back
        (a CachedImage the cache lacks: NotCached); the others still run. `self.last`
        describes what this call did (metrics)."""
        keys = [[self._key(b) for b in req] for req in per_request]
        # Decode only what the cache lacks, once per distinct image or video.
        todo: dict[str, Image.Image] = {}
        todo_videos: dict[str, VideoFile] = {}
        failed: dict[int, Exception] = {}
        hits = 0
        for r, (req, req_keys) in enumerate(zip(per_request, keys)):
            for i, (data, key) in enumerate(zip(req, req_keys)):
                if key in todo or key in todo_videos:
                    continue
                if self.cache.get(key) is not None:
                    hits += 1
                    continue
                if isinstance(data, CachedImage):
                    failed[r] = NotCached(f"images[{i}] is not in the encoder's cache: send the image itself")
                    break
                if isinstance(data, CachedVideo):
                    failed[r] = NotCached("a video is not in the encoder's cache: send the video itself")
                    break
                if isinstance(data, VideoFile):
                    todo_videos[key] = data  # decoded by preprocess_videos (the frames it needs only)
                    continue
                try:
                    todo[key] = decode_image(data, i)
                except ImageError as e:
                    failed[r] = e
                    break
        if todo_videos:
            # Videos are decoded here, one at a time: a file that fails fails its request only.
            for key, video in list(todo_videos.items()):
                try:
                    todo_videos[key] = (video, *self.preprocess_videos([video]))
                except InvalidInput as e:
                    del todo_videos[key]
                    for r, req_keys in enumerate(keys):
                        if key in req_keys:
                            failed.setdefault(r, e)
        if todo or todo_videos:
            if self.fault_sha256:
                self._inject_fault(per_request)
            parts = [self.preprocess(list(todo.values()))] if todo else []
            parts += [(pixels, grid) for _, pixels, grid in todo_videos.values()]
            pixels, grids = torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
            features = self.tower(pixels, grids)
            for key, f in zip(todo, features):
                self.cache.put(key, f)
            for (key, (video, _, _)), f in zip(todo_videos.items(), features[len(todo):]):
                self.cache.put(key, VisualFeatures(
                    f.visual_embeds, f.deepstack_embeds, torch.empty(0, 3, dtype=torch.int64), f.image_grid_thw,
                    torch.tensor(video.timestamps, dtype=torch.float64)))
        encoded = len(todo) + len(todo_videos)
        self.last = EncodeReport(requests=len(per_request), images=sum(map(len, per_request)),
                                 cache_hits=hits, encoded=encoded, forwards=1 if encoded else 0)
        results = [failed.get(r) or VisualFeatures.concat([self.cache.get(k) for k in req_keys], self.config)
                   for r, req_keys in enumerate(keys)]
        self.cache.unpin()
        return results

    def _inject_fault(self, per_request: list[list]) -> None:
        files = (b.data if isinstance(b, VideoFile) else b for req in per_request for b in req
                 if isinstance(b, (bytes, VideoFile)))
        if any(hashlib.sha256(b).hexdigest() == self.fault_sha256 for b in files):
            raise RuntimeError("injected fault (inject_fault_image_sha256)")
