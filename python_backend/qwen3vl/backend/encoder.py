"""`qwen3_encoder`'s service, local (the vision tower runs here) or remote (a language server:
the tensors are fetched from encoder servers): a request's inputs -> an encode job; its result
-> the responses that `disagg.protocol.plan_responses` plans."""

from __future__ import annotations

import numpy as np
import torch

from .. import contract
from ..disagg import shm
from ..disagg.fetch import TransferStats
from ..disagg.protocol import ChunkRequest, Response, plan_responses
from ..encoder.admission import Admission
from ..encoder.batcher import EncodeBatcher, EncodeJob
from ..encoder.cache import CachedImage, CachedVideo
from ..encoder.encoder import EncodeReport
from ..encoder.images import image_file_bytes
from ..encoder.video import VideoPlanner, video_file_bytes
from ..engine.sampling import generation_defaults
from ..errors import InvalidInput, Unavailable
from ..model.prompt import PromptBuilder
from ..settings import ServingConfig
from .io import bytes_list, error_response, input_array, model_config, scalar, torch_output
from .metrics import ENCODER_COUNTERS, ENCODER_HISTOGRAMS, Counters, Histograms, MetricsThread


def build_encoder(settings: ServingConfig, config, image_processor, video_processor=None):
    """The local VisionEncoder or the remote fetcher, as `settings.encoder_mode` says."""
    if settings.encoder_mode == "local":
        from ..encoder.encoder import VisionEncoder

        return VisionEncoder(config, image_processor, video_processor, settings)
    if settings.encoder_mode == "remote":
        from ..disagg.remote import RemoteEncoder

        return RemoteEncoder(config, settings)
    raise InvalidInput(f"encoder_mode must be local or remote, not {settings.encoder_mode!r}")


def build_admission(settings: ServingConfig, config) -> Admission:
    """Admission control with the checkpoint's processor (image sizes, chat template) and the
    settings' limits; both modes run it, so a language server refuses before fetching."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(config.checkpoint)
    prompts = PromptBuilder(processor, config.image_token_id, config.spatial_merge_size,
                            settings.allow_special_tokens_in_prompt)
    defaults, _ = generation_defaults(config.checkpoint)
    admission = Admission(processor.image_processor, prompts, config, settings, defaults.max_tokens)
    admission.videos = VideoPlanner(processor, settings)
    return admission


class EncoderService:
    def __init__(self, pb, settings: ServingConfig):
        self.pb, self.settings = pb, settings
        self.config = model_config(settings)
        labels = {"model": "qwen3_encoder", "mode": settings.encoder_mode}
        self.metrics = Counters(pb, ENCODER_COUNTERS, labels)
        # Counters go before the responses they count (the tests read them right after); the
        # histograms' observations (one per image) go to a thread of their own.
        self.histograms = Histograms(pb, ENCODER_HISTOGRAMS, labels)
        self.observer = MetricsThread("qwen3vl-encoder-metrics")
        self.admission = build_admission(settings, self.config)
        self.encoder = build_encoder(settings, self.config, self.admission.processor,
                                     self.admission.videos.video_processor)
        self.regions = shm.RegionWriter()
        self.batcher = EncodeBatcher(self.encoder, max_delay_s=settings.encoder_max_queue_delay_ms / 1000,
                                     max_images=settings.encoder_max_batch_images, on_batch=self._count_batch)

    # -- requests in
    def submit(self, request) -> None:
        """Validate and enqueue one request; bad input fails it alone, at once."""
        sender = request.get_response_sender()
        try:
            files, chunking, passthrough = self._read(request)
            if self.batcher.jobs.qsize() >= self.settings.max_queued_requests:
                raise Unavailable(f"server busy: {self.batcher.jobs.qsize()} requests are waiting for the vision "
                                  f"encoder (max_queued_requests {self.settings.max_queued_requests}); retry later")
            self.batcher.submit(EncodeJob(files, lambda result: self._respond(sender, result, passthrough, chunking)))
        except Exception as e:  # noqa: BLE001 - bad input: this request fails, the model carries on
            self._fail(sender, e)

    def _read(self, request):
        pb = self.pb
        chunking = ChunkRequest(chunk_tokens=scalar(pb, request, contract.CHUNK_TOKENS, int),
                                resume_from=scalar(pb, request, contract.RESUME_FROM, int) or 0,
                                max_chunks=scalar(pb, request, contract.MAX_CHUNKS, int) or 0,
                                shm_region=scalar(pb, request, contract.SHM_REGION, str))
        # Copied: the request's buffers are not ours once execute() has returned.
        passthrough = [pb.Tensor(name, t.as_numpy().copy()) for name in contract.LANGUAGE_REQUEST_INPUTS
                       if (t := pb.get_input_tensor_by_name(request, name)) is not None]
        media = [input_array(pb, request, name) for name in (contract.IMAGES, contract.IMAGE_DIGESTS,
                                                             contract.VIDEOS, contract.VIDEO_DIGESTS)]
        if (passthrough and passthrough[0].name() != contract.TEXT_INPUT) or (
                not passthrough and all(m is None for m in media)):
            # An ensemble request without text_input (declared optional there for this): a
            # request to encode always names its images or videos, an empty list included.
            raise InvalidInput(f"{contract.TEXT_INPUT} is required")
        files = [image_file_bytes(b, i) for i, b in enumerate(bytes_list(pb, request, contract.IMAGES))]
        digests = bytes_list(pb, request, contract.IMAGE_DIGESTS)
        if digests:
            if files:
                raise InvalidInput(f"send either {contract.IMAGES} or {contract.IMAGE_DIGESTS}, not both")
            files = [CachedImage(d) for d in digests]
        videos, cached_videos = self._videos(request)
        # Before any vision work: the images' sizes, the videos' headers, the limits, the context window.
        self.admission.check(files, scalar(pb, request, contract.TEXT_INPUT, str),
                             scalar(pb, request, contract.MAX_TOKENS, int), videos)
        return files + videos + cached_videos, chunking, passthrough

    def _videos(self, request) -> tuple[list, list]:
        """The request's videos planned from their headers (frame indices by the processor's
        own sample_frames, timestamps, grid), or InvalidInput for one over a limit; and the
        videos named by digest (an encode request from a language server: video_fps given)."""
        pb = self.pb
        raw = bytes_list(pb, request, contract.VIDEOS)
        digests = bytes_list(pb, request, contract.VIDEO_DIGESTS)
        fps = scalar(pb, request, contract.VIDEO_FPS, float)
        if fps is None and self.settings.video_fps > 0:
            fps = self.settings.video_fps
        planner = self.admission.videos
        if fps is not None:  # what travels as FP32: the same rate, and the same cache key, everywhere
            fps = float(np.float32(fps))
        if raw and digests:
            raise InvalidInput(f"send either {contract.VIDEOS} or {contract.VIDEO_DIGESTS}, not both")
        if len(raw) + len(digests) > self.settings.max_videos_per_request:
            raise InvalidInput(f"{len(raw) + len(digests)} videos in one request; the limit is "
                               f"{self.settings.max_videos_per_request} (max_videos_per_request)")
        if digests:
            return [], [CachedVideo(d, fps if fps is not None else float(planner.video_processor.fps))
                        for d in digests]
        return [planner.plan(video_file_bytes(b, i), i, fps) for i, b in enumerate(raw)], []

    # -- responses out
    def _respond(self, sender, result, passthrough: list, chunking: ChunkRequest) -> None:
        if isinstance(result, Exception):
            self._fail(sender, result)
            return
        try:
            responses = plan_responses(result, chunking, self.regions.write)
        except Exception as e:  # noqa: BLE001 - bad chunking inputs, an unwritable region
            self._fail(sender, e)
            return
        for response in responses:
            try:
                self._send(sender, response, passthrough)
            except Exception as e:  # noqa: BLE001 - never leave a request without its final response
                self._fail(sender, e)
                return
        self.metrics.add("requests", 1)
        merge = self.config.spatial_merge_size ** 2
        tokens = (result.image_grid_thw.prod(-1) // merge).tolist()
        self.observer.submit(lambda: [self.histograms.observe("visual_tokens", n) for n in tokens])

    def _send(self, sender, response: Response, passthrough: list) -> None:
        pb, f = self.pb, response.features
        tensors = [torch_output(pb, contract.VISUAL_EMBEDS, f.visual_embeds),
                   torch_output(pb, contract.DEEPSTACK_EMBEDS, f.deepstack_embeds),
                   torch_output(pb, contract.IMAGE_GRID_THW, f.image_grid_thw.to(torch.int64)),
                   pb.Tensor(contract.VIDEO_GRID_THW, f.video_grid_thw.to(torch.int64).numpy().reshape(-1, 3)),
                   pb.Tensor(contract.VIDEO_TIMESTAMPS, f.video_timestamps.to(torch.float64).numpy().reshape(-1))]
        if response.chunk_start is None:
            tensors += passthrough
        else:
            tensors += [pb.Tensor(contract.CHUNK_START, np.array([response.chunk_start], dtype=np.int64)),
                        pb.Tensor(contract.TOTAL_TOKENS, np.array([response.total_tokens], dtype=np.int64))]
            self.metrics.add("chunks_sent", 1)
            self.metrics.add("bytes_sent", f.nbytes)
            self.metrics.add("shm_bytes_sent", response.shm_bytes)
        sender.send(pb.InferenceResponse(output_tensors=tensors),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if response.final else 0)

    def _fail(self, sender, error: Exception) -> None:
        self.metrics.add("requests", 1)
        self.metrics.add("failures", 1)
        sender.send(error_response(self.pb, error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    # -- metrics of each batch
    def _count_batch(self, report: EncodeReport | TransferStats | None, seconds: float) -> None:
        add = self.metrics.add
        add("seconds", seconds)
        per_image = list(report.media_transfer_seconds) if isinstance(report, TransferStats) else []

        def observe():
            self.histograms.observe("encode_seconds", seconds)
            for s in per_image:
                self.histograms.observe("transfer_seconds", s)

        self.observer.submit(observe)
        if isinstance(report, TransferStats):
            add("chunks_received", report.chunks)
            add("bytes_received", report.bytes)
            add("shm_bytes_received", report.shm_bytes)
            add("transfer_seconds", report.transfer_seconds)
            add("resumes", report.resumes)
            add("failovers", len(report.failovers))
            add("images", report.images)
        elif isinstance(report, EncodeReport):
            add("images", report.images)
            add("forwards", report.forwards)
            add("cache_hits", report.cache_hits)
            add("cache_misses", report.encoded)

    def stop(self) -> None:
        self.batcher.stop()
        self.observer.stop()
        self.regions.close()
        if hasattr(self.encoder, "close"):
            self.encoder.close()  # remote: free the shared-memory regions, close the gRPC clients
