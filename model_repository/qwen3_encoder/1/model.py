"""Thin Triton shell over qwen3vl.vision: requests in, package call, tensors out."""

import json

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from qwen3vl import contract
from qwen3vl.triton_io import bytes_list, e2l_outputs, model_config_from_env, served_dtype_name


def _tensor(name, t: torch.Tensor):
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(t.contiguous()))


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        for output in e2l_outputs(served_dtype_name()):
            auto_complete_model_config.add_output(output)
        return auto_complete_model_config

    def initialize(self, args):
        from transformers import AutoImageProcessor

        from qwen3vl.vision import VisionEncoder

        model_config = json.loads(args["model_config"])
        self.config = model_config_from_env(model_config.get("parameters"))
        image_processor = AutoImageProcessor.from_pretrained(self.config.checkpoint)
        self.encoder = VisionEncoder(self.config, image_processor)

    def execute(self, requests):
        per_request = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, contract.IMAGES)
            per_request.append(bytes_list(images.as_numpy() if images is not None else None))
        try:
            results = self.encoder.encode(per_request)
        except Exception as e:  # a failed forward fails these requests, not the server
            results = [RuntimeError(f"vision encoder failed: {e}")] * len(requests)
        responses = []
        for result in results:
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                _tensor(contract.VISUAL_EMBEDS, result.visual_embeds),
                _tensor(contract.DEEPSTACK_EMBEDS, result.deepstack_embeds),
                _tensor(contract.IMAGE_GRID_THW, result.image_grid_thw.to(torch.int64)),
            ]))
        return responses
