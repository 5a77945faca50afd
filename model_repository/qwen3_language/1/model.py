"""Thin decoupled Triton shell over qwen3vl.engine: requests in, streamed responses out."""

import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from qwen3vl import contract
from qwen3vl.engine import Engine, Job, Step, Worker
from qwen3vl.triton_io import e2l_outputs, model_config_from_env, scalar, served_dtype_name, setting
from qwen3vl.vision import VisualFeatures

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(text: str, ids: list[int], finish_reason: str):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor(contract.TEXT_OUTPUT, np.array([text.encode("utf-8")], dtype=object)),
        pb_utils.Tensor(contract.OUTPUT_IDS, np.array(ids, dtype=np.int32)),
        pb_utils.Tensor(contract.FINISH_REASON, np.array([finish_reason.encode()], dtype=object)),
    ])


class _Metrics:
    def __init__(self):
        self.families, self.counters = [], {}
        for key, name, description in (
            ("requests", "qwen3vl_language_requests_total", "Generation requests finished"),
            ("failures", "qwen3vl_language_failures_total", "Generation requests failed"),
            ("tokens", "qwen3vl_language_generated_tokens_total", "Tokens generated"),
            ("ttft", "qwen3vl_language_first_token_seconds_total", "Sum of time to first token"),
            ("prefill_tokens", "qwen3vl_language_prefill_tokens_total", "Prompt tokens run through the model"),
            ("prefix_cached_tokens", "qwen3vl_language_prefix_cache_tokens_total",
             "Prompt tokens restored from the prefix cache instead"),
            ("prefix_cache_hits", "qwen3vl_language_prefix_cache_hits_total",
             "Requests that restored part of their prompt from the prefix cache"),
        ):
            # The family must outlive its metric: keep both.
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
            self.families.append(family)
            self.counters[key] = family.Metric(labels={"model": "qwen3_language"})

    def add(self, key: str, value: float) -> None:
        if value:
            self.counters[key].increment(value)

    def prefill(self, report) -> None:
        self.add("prefill_tokens", report.computed_tokens)
        self.add("prefix_cached_tokens", report.cached_tokens)
        self.add("prefix_cache_hits", int(report.cached_tokens > 0))


class _Stream:
    """Sends a request's steps: each as it comes when streaming, else one response at the end."""

    def __init__(self, sender, stream: bool, metrics: _Metrics):
        self.sender, self.stream, self.metrics = sender, stream, metrics
        self.text, self.ids = [], []
        self.start, self.first = time.perf_counter(), True

    def emit(self, step: Step) -> None:
        done = bool(step.finish_reason)
        if self.first:
            self.metrics.add("ttft", time.perf_counter() - self.start)
            self.first = False
        self.metrics.add("tokens", len(step.token_ids))
        if done:
            self.metrics.add("requests", 1)
        if self.stream:
            self.sender.send(_response(step.text, step.token_ids, step.finish_reason), flags=FINAL if done else 0)
            return
        self.text.append(step.text)
        self.ids += step.token_ids
        if done:
            self.sender.send(_response("".join(self.text), self.ids, step.finish_reason), flags=FINAL)

    def fail(self, error: Exception) -> None:
        self.metrics.add("failures", 1)
        self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))), flags=FINAL)


def _input(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _visual_input(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    # cloned: the request's buffers are not ours to keep once execute() has returned
    return None if t is None else torch.from_dlpack(t.to_dlpack()).clone()


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        for tensor in e2l_outputs(served_dtype_name()):
            auto_complete_model_config.add_input({**tensor, "optional": True})
        return auto_complete_model_config

    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters")
        self.config = model_config_from_env(params)
        self.engine = Engine.from_checkpoint(
            self.config, int(setting(params, "max_model_len", "0")) or None,
            prefix_cache_bytes=int(float(setting(params, "prefix_cache_mb", "1024")) * 2**20))
        self.metrics = _Metrics()
        self.engine.on_prefill = self.metrics.prefill
        self.worker = Worker(self.engine)

    def _job(self, request, stream: _Stream) -> Job:
        text = scalar(_input(request, contract.TEXT_INPUT), str)
        params = self.engine.params(
            max_tokens=scalar(_input(request, contract.MAX_TOKENS), int),
            temperature=scalar(_input(request, contract.TEMPERATURE), float),
            top_p=scalar(_input(request, contract.TOP_P), float),
            top_k=scalar(_input(request, contract.TOP_K), int),
            seed=scalar(_input(request, contract.SEED), int),
        )
        grids = _visual_input(request, contract.IMAGE_GRID_THW)
        if grids is None or grids.shape[0] == 0:
            features = VisualFeatures.empty(self.config)
        else:
            embeds = _visual_input(request, contract.VISUAL_EMBEDS)
            deepstack = _visual_input(request, contract.DEEPSTACK_EMBEDS)
            if embeds is None or deepstack is None:
                raise ValueError("image_grid_thw was given without visual_embeds and deepstack_embeds")
            features = VisualFeatures(embeds, deepstack, grids.to(torch.int64))
        sender = request.get_response_sender()
        return Job(text, features, params, stream.emit, stream.fail, sender.is_cancelled)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            stream = _Stream(sender, bool(scalar(_input(request, contract.STREAM), bool) or False), self.metrics)
            try:
                self.worker.submit(self._job(request, stream))
            except Exception as e:  # bad input: this request fails, the model carries on
                stream.fail(e)
        return None

    def finalize(self):
        self.worker.stop()
