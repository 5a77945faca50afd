"""The encoder's per-image feature cache: LRU, bounded in bytes (cachetools), keyed by a hash
of the image file plus the image processor's settings."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from cachetools import LRUCache

from ..features import VisualFeatures


@dataclass(frozen=True)
class CachedImage:
    """An image named by the SHA-256 of its file instead of sent again: a resume or a repeat
    between servers costs no upload. Served from the cache, or NotCached."""
    digest: bytes


@dataclass(frozen=True)
class CachedVideo:
    """A video named by the SHA-256 of its file and the frames per second it is sampled at."""
    digest: bytes
    fps: float

    def key_bytes(self) -> bytes:
        return self.digest + video_key_settings(self.fps)


def video_key_settings(fps: float) -> bytes:
    """What besides the file and the processor's settings decides a video's features: its
    sampling rate (the frame indices follow from the file, the rate and the processor)."""
    return repr(("video", float(fps))).encode()


def features_nbytes(features: VisualFeatures) -> int:
    return features.nbytes + sum(t.numel() * t.element_size() for t in (
        features.image_grid_thw, features.video_grid_thw, features.video_timestamps))


class FeatureCache:
    """Per-image features, LRU, bounded in bytes. Key: a hash of the image bytes plus the image
    processor's settings (the same bytes under other settings give other features)."""

    def __init__(self, max_bytes: int, settings: str):
        self.salt = hashlib.sha256(settings.encode()).digest()
        self.items: LRUCache = LRUCache(maxsize=max_bytes, getsizeof=features_nbytes)
        self.lock = threading.Lock()
        # Features of the current batch stay reachable even if the cache is too small to keep
        # them; the batch's results are assembled before the next batch runs.
        self.pinned: dict[str, VisualFeatures] = {}

    def key(self, data: "bytes | CachedImage") -> str:
        """`data`: an image file, a CachedImage, or a video's `key_bytes()`."""
        digest = data.digest if isinstance(data, CachedImage) else hashlib.sha256(data).digest()
        return hashlib.sha256(self.salt + digest).hexdigest()

    def get(self, key: str) -> VisualFeatures | None:
        with self.lock:
            found = self.items.get(key)
            return found if found is not None else self.pinned.get(key)

    def put(self, key: str, features: VisualFeatures) -> None:
        with self.lock:
            self.pinned[key] = features
            if key not in self.items and features_nbytes(features) <= self.items.maxsize:
                self.items[key] = features

    def unpin(self) -> None:
        with self.lock:
            self.pinned.clear()
