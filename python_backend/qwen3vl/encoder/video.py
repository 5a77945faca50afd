"""Video files as requests carry them: raw bytes or base64 `data:video/...` URLs, read with PyAV
(its wheels bundle FFmpeg: MP4, WebM, MKV, AVI, ...).

What transformers 5.24 does for Qwen3-VL video, and what we do the same way:
- frame indices: the checkpoint's `Qwen3VLVideoProcessor.sample_frames` itself (called, not
  copied) on the file's frame count and rate, at `fps` frames per second (default the processor's);
- frames: decoded in order up to the last sampled index and kept at the sampled indices, as
  transformers' `load_video(..., backend="pyav")` does (RGB24);
- timestamps: `Qwen3VLProcessor._calculate_timestamps` (float64; each temporal group's time is
  the mean of its first and last frame's);
- the grid: the video processor's `smart_resize` over the whole clip, with the per-frame pixel
  cap (`cap_pixels_per_frame`) set explicitly (transformers 5.24 leaves it off by default).

A clip of one frame (the reference raises: `t:1 must be larger than temporal_factor:2`) is given
its frame twice (indices [0, 0], timestamp 0.0), as vLLM does: a still image sent as a video works.

The frames are those that play, as players show the file: its video packets are counted (no
decoding), leaving out those before the presentation start. An MP4 trimmed without re-encoding
declares every frame it holds (30, say) while its edit list hides the lead-in ones (5): FFmpeg
flags or drops them and the decoder never outputs them, so the clip is sampled over the 25 that
play, the first of them at 0 s. A file that does not declare its frames (0) is counted the same
way. A rate the file does not give: the processor's default (24 fps, as `sample_frames` does).

A rotation in the file's display matrix (a phone holding the camera upright writes landscape
frames and a matrix that turns them; what `ffprobe` shows as "rotation of -90.00 degrees") is
applied to the decoded frames as players and FFmpeg's CLI apply it, by quarter turns, as images
get their EXIF orientation (images.py): the model sees the clip upright, and the header's size
(the grid, the limits) is the displayed one. Other angles and mirrored matrices are left as the
frames are stored. The reference (transformers' `load_video`) applies neither: on such files it
is not followed.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import contract
from ..errors import InvalidInput
from ..settings import ServingConfig
from .images import data_url_payload



class VideoError(InvalidInput):
    """An input that is not a usable video; the message names which one."""


@dataclass(frozen=True)
class VideoFile:
    """One video of a request: its file and how it is sampled (the encoder's cache key holds
    all of it), with what admission control read from its header."""
    data: bytes
    index: int                 # its place in the request's `videos`
    total_frames: int
    src_fps: float | None      # the file's frame rate (None: the file does not say)
    width: int                 # as displayed (its rotation applied)
    height: int
    indices: tuple[int, ...]   # sampled frame indices (a 1-frame clip: (0, 0))
    fps: float                 # frames sampled per second (the request's or the checkpoint's)
    timestamps: tuple[float, ...]  # per temporal group, float64 seconds
    grid: tuple[int, int, int]     # video_grid_thw row (patches)
    quarter_turns: int = 0         # counter-clockwise quarter turns that display its frames upright

    def key_bytes(self) -> bytes:
        """The feature cache's key material: the file's SHA-256 and the sampling rate (the
        cache's salt adds the processor's settings); a CachedVideo of the same names it."""
        from .cache import video_key_settings

        return hashlib.sha256(self.data).digest() + video_key_settings(self.fps)


def video_file_bytes(data: bytes, index: int) -> bytes:
    """The video file itself: raw bytes, or the payload of a base64 `data:video/...` URL."""
    return data_url_payload(data, f"{contract.VIDEOS}[{index}]", "video", VideoError)


def _open(data: bytes, index: int):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise _undecodable(data, index, e) from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{contract.VIDEOS}[{index}] ({len(data)} bytes) is not a decodable video: no video stream found")
    return container


class VideoHeader(NamedTuple):
    frames: int            # the frames that play
    fps: float | None      # frames per second (None: the file does not say)
    width: int             # as displayed: the stored size, turned by the rotation
    height: int
    quarter_turns: int     # counter-clockwise quarter turns from the stored frames to the displayed ones


def read_header(data: bytes, index: int) -> VideoHeader:
    """The video's header: frame rate and size from the container; the frames that play counted
    over its packets (no decoding); the rotation from its display matrix (the first frame's)."""
    import av

    container = _open(data, index)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        start = stream.start_time or 0
        declared = int(stream.frames or 0)
        try:  # hidden by an edit list: flagged to discard, or presented before the start
            frames = sum(1 for packet in container.demux(stream)
                         if packet.size and not packet.is_discard and (packet.pts is None or packet.pts >= start))
        except av.error.FFmpegError as e:
            raise _undecodable(data, index, e) from None
        if declared > 0:
            frames = min(frames, declared)
        width, height = int(stream.width or 0), int(stream.height or 0)
    finally:
        container.close()
    turns = quarter_turns(data, index) if frames else 0
    if turns % 2:
        width, height = height, width
    return VideoHeader(frames, fps, width, height, turns)


def quarter_turns(data: bytes, index: int) -> int:
    """The counter-clockwise quarter turns (0 to 3) of the file's display matrix, read from its
    first decoded frame (PyAV exposes the matrix on frames: `VideoFrame.rotation`, degrees
    counter-clockwise, -90 for a phone held upright); 0 for another angle, as FFmpeg's CLI does."""
    import av

    container = _open(data, index)
    try:
        frame = next(iter(container.decode(video=0)), None)
    except av.error.FFmpegError as e:
        raise _undecodable(data, index, e) from None
    finally:
        container.close()
    degrees = frame.rotation if frame is not None else 0
    return (degrees // 90) % 4 if degrees % 90 == 0 else 0


def _undecodable(data: bytes, index: int, e: Exception) -> VideoError:
    return VideoError(f"{contract.VIDEOS}[{index}] ({len(data)} bytes) is not a decodable video: "
                      f"{type(e).__name__}: {e}")


def decode_frames(data: bytes, index: int, indices, turns: int = 0) -> np.ndarray:
    """[n, H, W, 3] uint8 RGB frames at `indices` (sorted, repeats allowed) of the frames that
    play, decoded in order up to the last one, as transformers' `read_video_pyav` does; each
    turned `turns` quarter turns counter-clockwise (the file's rotation, read_header)."""
    import av

    wanted = sorted(set(int(i) for i in indices))
    last = wanted[-1]
    found: dict[int, np.ndarray] = {}
    container = _open(data, index)
    try:
        for i, frame in enumerate(container.decode(video=0)):
            if i > last:
                break
            if i in wanted:
                found[i] = frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise _undecodable(data, index, e) from None
    finally:
        container.close()
    missing = [i for i in wanted if i not in found]
    if missing:
        raise VideoError(f"{contract.VIDEOS}[{index}]: the file declares frames it does not hold "
                         f"(frame {missing[0]} of {last + 1} is missing)")
    frames = np.stack([found[int(i)] for i in indices])
    return np.ascontiguousarray(np.rot90(frames, turns, axes=(1, 2))) if turns else frames


def metadata(video: VideoFile):
    """transformers' VideoMetadata of the sampled clip (what the processor gets)."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=video.total_frames, fps=video.src_fps,
                         duration=video.total_frames / video.src_fps if video.src_fps else None,
                         video_backend="pyav", height=video.height, width=video.width,
                         frames_indices=list(video.indices))


class VideoPlanner:
    """From a video file's header: its sampled indices, timestamps and grid, or VideoError
    naming the limit it is over. `processor` is the checkpoint's Qwen3VLProcessor; the limits
    are the settings' max_video_bytes, max_video_seconds, max_video_frames and
    max_video_frame_pixels."""

    def __init__(self, processor, settings: ServingConfig):
        self.processor = processor
        self.video_processor = processor.video_processor
        self.settings, self.cap_pixels_per_frame = settings, settings.video_cap_pixels_per_frame

    def plan(self, data: bytes, index: int, fps: float | None) -> VideoFile:
        from transformers.video_utils import VideoMetadata

        s, vp = self.settings, self.video_processor
        name = f"{contract.VIDEOS}[{index}]"
        if len(data) > s.max_video_bytes:
            raise VideoError(f"{name} is {len(data)} bytes; the limit is {s.max_video_bytes} (max_video_bytes)")
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise VideoError(f"{contract.VIDEO_FPS} must be a positive number, got {fps}")
        total, src_fps, width, height, turns = read_header(data, index)
        if total < 1 or width < 1 or height < 1:
            raise VideoError(f"{name} ({len(data)} bytes) holds no video frames")
        if width * height > s.max_video_frame_pixels:
            raise VideoError(f"{name} frames are {width}x{height} = {width * height} pixels; the limit is "
                             f"{s.max_video_frame_pixels} (max_video_frame_pixels)")
        seconds = total / (src_fps or 24)
        if seconds > s.max_video_seconds:
            raise VideoError(f"{name} is {seconds:.1f} s long ({total} frames); the limit is {s.max_video_seconds:g} s "
                             "(max_video_seconds)")
        # transformers' own sampling (a copy of the metadata: sample_frames fills in a missing fps)
        meta = VideoMetadata(total_num_frames=total, fps=src_fps)
        indices = [int(i) for i in vp.sample_frames(meta, fps=fps)]
        if len(indices) > s.max_video_frames:
            raise VideoError(f"{name} samples to {len(indices)} frames; the limit is {s.max_video_frames} "
                             "(max_video_frames: send a lower video_fps or a shorter clip)")
        if len(indices) == 1:  # the documented choice: a 1-frame clip is its frame twice
            indices = [indices[0], indices[0]]
        rate = src_fps if src_fps else 24.0  # what the processor's timestamps use without a rate
        timestamps = self.processor._calculate_timestamps(list(indices), rate, vp.temporal_patch_size)
        grid = self.grid(len(indices), height, width, index)
        return VideoFile(data, index, total, src_fps, width, height, tuple(indices),
                         float(fps if fps is not None else vp.fps), tuple(float(t) for t in timestamps), grid, turns)

    def grid(self, frames: int, height: int, width: int, index: int) -> tuple[int, int, int]:
        """video_grid_thw of `frames` frames of height x width, as the video processor's resize
        and patchify make it (its smart_resize, its per-frame cap when set)."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        vp = self.video_processor
        factor = vp.patch_size * vp.merge_size
        max_pixels = vp.size["longest_edge"]
        if self.cap_pixels_per_frame:  # Qwen3VLVideoProcessor.resize's cap, with its own settings
            frame_cap = vp.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, vp.size["longest_edge"] // frames), int(vp.size["shortest_edge"] * 1.05))
            max_pixels = per_frame * frames
        try:
            h, w = smart_resize(num_frames=frames, height=height, width=width, factor=factor,
                                temporal_factor=vp.temporal_patch_size, min_pixels=vp.size["shortest_edge"],
                                max_pixels=max_pixels)
        except ValueError as e:
            raise VideoError(f"{contract.VIDEOS}[{index}] is {width}x{height} pixels: {e}") from None
        return -(-frames // vp.temporal_patch_size), h // vp.patch_size, w // vp.patch_size
