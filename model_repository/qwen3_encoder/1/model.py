"""Thin Triton shell over qwen3vl.vision (local mode) or qwen3vl.transfer (remote mode).

local:  the vision tower runs here (aggregated and encoder servers).
remote: the same inputs and outputs, served by fetching from encoder servers (language servers).
A request with `chunk_tokens` gets one response per chunk of visual tokens (from `resume_from`);
without it, one response with everything (the ensemble's way). With `shm_region` as well, the
chunk's tensors go straight into that shared-memory region on this host (qwen3vl.shm) and the
response carries them empty.
"""

import itertools
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from qwen3vl import contract, shm, transfer
from qwen3vl.triton_io import bytes_list, e2l_outputs, model_config_from_env, scalar, served_dtype_name, setting
from qwen3vl.vision import VisualFeatures

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

METRICS = {
    # key: (name, description); counters labelled with the mode
    "requests": ("qwen3vl_encoder_requests_total", "Requests answered"),
    "failures": ("qwen3vl_encoder_failures_total", "Requests answered with an error"),
    "images": ("qwen3vl_encoder_images_total", "Images in requests"),
    "forwards": ("qwen3vl_encoder_forwards_total", "Vision tower forwards (one per batch)"),
    "cache_hits": ("qwen3vl_encoder_cache_hits_total", "Images served from the feature cache"),
    "cache_misses": ("qwen3vl_encoder_cache_misses_total", "Images run through the vision tower"),
    "seconds": ("qwen3vl_encoder_seconds_total", "Time encoding (local) or fetching (remote)"),
    "chunks_sent": ("qwen3vl_transfer_chunks_sent_total", "E->L chunks sent to language servers"),
    "bytes_sent": ("qwen3vl_transfer_bytes_sent_total", "E->L bytes sent to language servers"),
    "shm_bytes_sent": ("qwen3vl_transfer_shm_bytes_sent_total", "E->L bytes written into language servers' shared memory"),
    "chunks_received": ("qwen3vl_transfer_chunks_received_total", "E->L chunks received from encoders"),
    "bytes_received": ("qwen3vl_transfer_bytes_received_total", "E->L bytes received from encoders"),
    "shm_bytes_received": ("qwen3vl_transfer_shm_bytes_received_total", "E->L bytes received through shared memory"),
    "transfer_seconds": ("qwen3vl_transfer_seconds_total",
                         "Time fetching E->L tensors, per image from first request to assembled, summed"),
    "resumes": ("qwen3vl_transfer_resumes_total", "Transfers resumed after a broken connection or encoder"),
    "failovers": ("qwen3vl_transfer_failovers_total", "Transfers moved to another encoder"),
}


def _tensor(name, t: torch.Tensor):
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(t.contiguous()))


def _nbytes(features) -> int:
    return sum(t.numel() * t.element_size() for t in (features.visual_embeds, features.deepstack_embeds))


def _optional(request, name, cast):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else scalar(t.as_numpy(), cast)


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        for output in e2l_outputs(served_dtype_name()):
            auto_complete_model_config.add_output(output)
        return auto_complete_model_config

    def initialize(self, args):
        from qwen3vl.vision import EncodeBatcher

        params = json.loads(args["model_config"]).get("parameters")
        self.config = model_config_from_env(params)
        self.mode = setting(params, "encoder_mode", "local")
        # The family must outlive its metrics: keep both.
        self.families = {k: pb_utils.MetricFamily(name=n, description=d, kind=pb_utils.MetricFamily.COUNTER)
                         for k, (n, d) in METRICS.items()}
        self.metrics = {k: f.Metric(labels={"model": "qwen3_encoder", "mode": self.mode})
                        for k, f in self.families.items()}
        if self.mode == "local":
            from transformers import AutoImageProcessor

            from qwen3vl.vision import VisionEncoder

            encoder = VisionEncoder(self.config, AutoImageProcessor.from_pretrained(self.config.checkpoint),
                                    cache_bytes=int(float(setting(params, "encoder_cache_mb", "1024")) * 2**20))
        elif self.mode == "remote":
            urls = [u for u in setting(params, "encoder_urls").replace(",", " ").split() if u]
            encoder = transfer.RemoteEncoder(
                urls, self.config,
                chunk_tokens=int(setting(params, "transfer_chunk_tokens", "1024")),
                timeout_s=float(setting(params, "encoder_timeout_s", "30")),
                same_encoder_wait_s=float(setting(params, "encoder_same_wait_s", "3")),
                shared_memory=setting(params, "transfer_shared_memory", "0").lower() in ("1", "true", "yes"),
                shm_region_mib=float(setting(params, "transfer_shm_region_mib", "64")),
            )
        else:
            raise ValueError(f"encoder_mode must be local or remote, not {self.mode!r}")
        self.regions = shm.RegionWriter()
        self.batcher = EncodeBatcher(
            encoder,
            max_delay_s=float(setting(params, "encoder_max_queue_delay_ms", "0")) / 1000,
            max_images=int(setting(params, "encoder_max_batch_images", "64")),
            on_batch=self._count_batch,
        )

    def _count(self, key, value):
        if value:
            self.metrics[key].increment(value)

    def _count_batch(self, report, seconds):
        self._count("seconds", seconds)
        if isinstance(report, transfer.TransferStats):
            self._count("chunks_received", report.chunks)
            self._count("bytes_received", report.bytes)
            self._count("shm_bytes_received", report.shm_bytes)
            self._count("transfer_seconds", report.transfer_seconds)
            self._count("resumes", report.resumes)
            self._count("failovers", len(report.failovers))
            self._count("images", report.images)
            return
        self._count("images", report.images)
        self._count("forwards", report.forwards)
        self._count("cache_hits", report.cache_hits)
        self._count("cache_misses", report.encoded)

    def execute(self, requests):
        from qwen3vl.vision import CachedImage, EncodeJob, image_file_bytes

        for request in requests:
            sender = request.get_response_sender()
            try:
                images = pb_utils.get_input_tensor_by_name(request, contract.IMAGES)
                chunk_tokens = _optional(request, transfer.CHUNK_TOKENS, int)
                shm_region = _optional(request, transfer.SHM_REGION, str)
                if shm_region is not None and chunk_tokens is None:
                    raise ValueError(f"{transfer.SHM_REGION} needs {transfer.CHUNK_TOKENS}: the region's size in visual tokens")
                chunking = (chunk_tokens, _optional(request, transfer.RESUME_FROM, int),
                            _optional(request, transfer.MAX_CHUNKS, int), shm_region)
                passthrough = [pb_utils.Tensor(name, t.as_numpy().copy()) for name in contract.LANGUAGE_REQUEST_INPUTS
                               if (t := pb_utils.get_input_tensor_by_name(request, name)) is not None]
                files = [image_file_bytes(b, i) for i, b in enumerate(bytes_list(
                    images.as_numpy() if images is not None else None))]
                digests = pb_utils.get_input_tensor_by_name(request, transfer.IMAGE_DIGESTS)
                if digests is not None:
                    if files:
                        raise ValueError(f"send either {contract.IMAGES} or {transfer.IMAGE_DIGESTS}, not both")
                    files = [CachedImage(d) for d in bytes_list(digests.as_numpy())]
                self.batcher.submit(EncodeJob(
                    files,
                    lambda result, s=sender, p=passthrough, c=chunking: self._respond(s, result, p, *c)))
            except Exception as e:  # bad input: this request fails, the model carries on
                self._fail(sender, e)
        return None

    def _fail(self, sender, error):
        self._count("requests", 1)
        self._count("failures", 1)
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))), flags=FINAL)

    def _respond(self, sender, result, passthrough, chunk_tokens, resume_from, max_chunks, shm_region):
        if isinstance(result, Exception):
            self._fail(sender, result)
            return
        if chunk_tokens is None:
            self._count("requests", 1)
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                _tensor(contract.VISUAL_EMBEDS, result.visual_embeds),
                _tensor(contract.DEEPSTACK_EMBEDS, result.deepstack_embeds),
                _tensor(contract.IMAGE_GRID_THW, result.image_grid_thw.to(torch.int64)),
                *passthrough,
            ]), flags=FINAL)
            return
        try:
            # islice: a one-token probe must not slice every chunk of the image first.
            pieces = list(itertools.islice(transfer.chunks(result, chunk_tokens, resume_from or 0), max_chunks or None))
        except ValueError as e:
            self._fail(sender, e)
            return
        if shm_region is not None:
            # One chunk (chunk_tokens: what the region holds) goes into the region. The response
            # keeps its grids but carries its tensors as empty slices ([0, H], [L, 0, H]), so the
            # receiver still checks their dtype and width.
            start, piece = pieces[0]
            try:
                self.regions.write(shm_region, piece)
            except Exception as e:  # noqa: BLE001 - whatever it is, the language side can use gRPC
                message = str(e) if shm.UNAVAILABLE in str(e) else f"{shm.UNAVAILABLE}: {type(e).__name__}: {e}"
                self._fail(sender, ValueError(message))
                return
            self._count("shm_bytes_sent", _nbytes(piece))
            pieces = [(start, VisualFeatures(piece.visual_embeds[:0], piece.deepstack_embeds[:, :0],
                                             piece.image_grid_thw))]
        total = np.array([result.visual_embeds.shape[0]], dtype=np.int64)
        for i, (start, piece) in enumerate(pieces):
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                _tensor(contract.VISUAL_EMBEDS, piece.visual_embeds),
                _tensor(contract.DEEPSTACK_EMBEDS, piece.deepstack_embeds),
                _tensor(contract.IMAGE_GRID_THW, piece.image_grid_thw.to(torch.int64)),
                pb_utils.Tensor(transfer.CHUNK_START, np.array([start], dtype=np.int64)),
                pb_utils.Tensor(transfer.TOTAL_TOKENS, total),
            ]), flags=FINAL if i == len(pieces) - 1 else 0)
            self._count("chunks_sent", 1)
            self._count("bytes_sent", _nbytes(piece))
        self._count("requests", 1)

    def finalize(self):
        self.batcher.stop()
        self.regions.close()
        if self.mode == "remote":
            self.batcher.encoder.close()  # free the shared-memory regions, close the gRPC clients
