"""Thin Triton shell over qwen3vl.vision: requests in, batched encode, tensors out."""

import json

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from qwen3vl import contract
from qwen3vl.triton_io import bytes_list, e2l_outputs, model_config_from_env, served_dtype_name, setting

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _tensor(name, t: torch.Tensor):
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(t.contiguous()))


def _counter(families, name, description):
    # The family must outlive its metrics: keep both.
    family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
    families.append(family)
    return family.Metric(labels={"model": "qwen3_encoder"})


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        for output in e2l_outputs(served_dtype_name()):
            auto_complete_model_config.add_output(output)
        return auto_complete_model_config

    def initialize(self, args):
        from transformers import AutoImageProcessor

        from qwen3vl.vision import EncodeBatcher, VisionEncoder

        params = json.loads(args["model_config"]).get("parameters")
        self.config = model_config_from_env(params)
        encoder = VisionEncoder(self.config, AutoImageProcessor.from_pretrained(self.config.checkpoint))
        self.metric_families = []
        f = self.metric_families
        self.metrics = {
            "requests": _counter(f, "qwen3vl_encoder_requests_total", "Requests encoded"),
            "images": _counter(f, "qwen3vl_encoder_images_total", "Images encoded"),
            "forwards": _counter(f, "qwen3vl_encoder_forwards_total", "Vision tower forwards (one per batch)"),
            "seconds": _counter(f, "qwen3vl_encoder_forward_seconds_total", "Time in preprocessing and forwards"),
            "failures": _counter(f, "qwen3vl_encoder_failures_total", "Requests answered with an error"),
        }
        self.batcher = EncodeBatcher(
            encoder,
            max_delay_s=float(setting(params, "encoder_max_queue_delay_ms", "0")) / 1000,
            max_images=int(setting(params, "encoder_max_batch_images", "64")),
            on_batch=self._count_batch,
        )

    def _count_batch(self, requests, images, seconds):
        self.metrics["requests"].increment(requests)
        self.metrics["images"].increment(images)
        self.metrics["forwards"].increment(1 if images else 0)
        self.metrics["seconds"].increment(seconds)

    def execute(self, requests):
        from qwen3vl.vision import EncodeJob

        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, contract.IMAGES)
            sender = request.get_response_sender()
            passthrough = [pb_utils.Tensor(name, t.as_numpy().copy()) for name in contract.LANGUAGE_REQUEST_INPUTS
                           if (t := pb_utils.get_input_tensor_by_name(request, name)) is not None]
            self.batcher.submit(EncodeJob(
                bytes_list(images.as_numpy() if images is not None else None),
                lambda result, sender=sender, passthrough=passthrough: self._respond(sender, result, passthrough)))
        return None

    def _respond(self, sender, result, passthrough):
        if isinstance(result, Exception):
            self.metrics["failures"].increment(1)
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))), flags=FINAL)
            return
        sender.send(pb_utils.InferenceResponse(output_tensors=[
            _tensor(contract.VISUAL_EMBEDS, result.visual_embeds),
            _tensor(contract.DEEPSTACK_EMBEDS, result.deepstack_embeds),
            _tensor(contract.IMAGE_GRID_THW, result.image_grid_thw.to(torch.int64)),
            *passthrough,
        ]), flags=FINAL)

    def finalize(self):
        self.batcher.stop()
