"""Admission control before any vision work: from each image file's header (size, EXIF
orientation) the visual tokens exactly as the checkpoint's processor will make them, then the
per-request limits and the context window.

The grid comes from transformers' own `smart_resize` (`models/qwen2_vl/image_processing_qwen2_vl`,
the resize that Qwen3-VL's image processor runs, with the checkpoint's `size` {shortest_edge,
longest_edge}, `patch_size` and `merge_size`): an image of H x W pixels becomes a grid of
(1, H'/patch, W'/patch) patches, (H'/patch)(W'/patch)/merge**2 visual tokens. vLLM sizes its
multimodal inputs the same way (`get_number_of_image_patches`). A request over a limit is refused
with INVALID_ARGUMENT naming the limit and its setting, never an out-of-memory later.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from .. import contract
from ..errors import InvalidInput
from ..model.config import ModelConfig
from ..model.prompt import PromptBuilder, VideoLayout, check_context_window
from ..settings import ServingConfig
from .cache import CachedImage
from .images import ImageError, ImageHeader, read_header
from .video import VideoFile


@dataclass(frozen=True)
class Estimate:
    """What a request will cost, computed from its image headers and text alone."""
    grids: list[tuple[int, int, int]]  # per image (t, h, w) in patches, as image_grid_thw
    visual_tokens: list[int]           # per image, then per video
    prompt_tokens: int | None          # the whole prompt, visual tokens included (None: no text)
    transfer_bytes: int                # E->L: visual + deepstack rows of every image

    @property
    def total_visual_tokens(self) -> int:
        return sum(self.visual_tokens)


class Admission:
    """The per-request limits of `settings` (max_images_per_request, max_videos_per_request,
    max_image_pixels, max_visual_tokens_per_request, max_model_len), checked from the files'
    headers and the text. `default_max_tokens`: the checkpoint's, for a request that gives none."""

    def __init__(self, image_processor, prompts: PromptBuilder | None, config: ModelConfig, settings: ServingConfig,
                 default_max_tokens: int):
        self.processor, self.prompts, self.config, self.settings = image_processor, prompts, config, settings
        self.max_model_len = settings.context_window(config.text.max_position_embeddings)
        self.default_max_tokens = default_max_tokens
        size = image_processor.size
        self.min_pixels, self.max_pixels = size["shortest_edge"], size["longest_edge"]
        self.patch, self.merge = image_processor.patch_size, image_processor.merge_size
        # bytes per visual token on the wire: its embedding row and one row per deepstack layer
        self.bytes_per_token = ((1 + config.deepstack_layers) * config.visual_hidden_size
                                * config.dtype.itemsize)

    def grid(self, header: ImageHeader, index: int) -> tuple[int, int, int]:
        """(1, h, w) patches for an image of the header's size. Raises ImageError for an aspect
        ratio the processor refuses (over 200:1)."""
        try:
            height, width = smart_resize(header.height, header.width, self.patch * self.merge,
                                         min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:  # the processor's own check: "absolute aspect ratio must be smaller than 200"
            raise ImageError(f"{contract.IMAGES}[{index}] is {header.width}x{header.height} pixels: {e}") from None
        return 1, height // self.patch, width // self.patch

    def check(self, files: list, text: str | None = None, max_tokens: int | None = None,
              videos: list[VideoFile] = ()) -> Estimate:
        """The request's estimate, or InvalidInput naming the limit it is over. `files`: image
        bytes (a CachedImage, named by digest, is counted by its number only); `videos`: the
        request's videos as VideoPlanner planned them (from their headers: frames, grid,
        timestamps)."""
        s = self.settings
        if len(files) > s.max_images_per_request:
            raise InvalidInput(f"{len(files)} images in one request; the limit is {s.max_images_per_request} "
                               "(max_images_per_request)")
        if len(videos) > s.max_videos_per_request:
            raise InvalidInput(f"{len(videos)} videos in one request; the limit is {s.max_videos_per_request} "
                               "(max_videos_per_request)")
        grids = []
        for i, data in enumerate(files):
            if isinstance(data, CachedImage):
                continue
            header = read_header(data, i)
            pixels = header.width * header.height
            if pixels > s.max_image_pixels:
                raise ImageError(f"{contract.IMAGES}[{i}] is {header.width}x{header.height} = {pixels} pixels; "
                                 f"the limit is {s.max_image_pixels} (max_image_pixels)")
            grids.append(self.grid(header, i))
        tokens = [t * h * w // self.merge**2 for t, h, w in grids]
        layouts = [VideoLayout(v.grid[1] * v.grid[2] // self.merge**2, v.timestamps) for v in videos]
        all_tokens = tokens + [len(v.timestamps) * v.group_tokens for v in layouts]
        if sum(all_tokens) > s.max_visual_tokens_per_request:
            raise InvalidInput(f"the images and videos need {sum(all_tokens)} visual tokens "
                               f"({', '.join(map(str, all_tokens))}); the limit is {s.max_visual_tokens_per_request} "
                               "(max_visual_tokens_per_request)")
        prompt_tokens = None
        if text is not None and self.prompts is not None:
            self.prompts.check_size(text, self.max_model_len)
        # The exact prompt where there is vision work to spare; a text-only request's prompt is
        # built once, by the language model, which checks the context window the same way.
        if text is not None and self.prompts is not None and len(grids) == len(files) and (files or videos):
            prompt_tokens = len(self.prompts.expanded_ids(text, tokens, layouts))
            # No max_tokens: the checkpoint's default, or what the window leaves (the engine's rule).
            left = max(1, self.max_model_len - prompt_tokens)
            generated = max_tokens if max_tokens is not None else min(self.default_max_tokens, left)
            check_context_window(prompt_tokens, generated, self.max_model_len, visual_tokens=sum(all_tokens))
        return Estimate(grids, all_tokens, prompt_tokens, sum(all_tokens) * self.bytes_per_token)
