"""`qwen3_language`'s service, on three threads (engine/worker.py runs the last two):

- Triton's `execute()` thread: `LanguageService.submit` turns a request's inputs into a
  validated sequence (engine.py) and submits it to the engine loop with its ResponseStream and
  its sender's `is_cancelled`; a cancel request flags the sequence it names.
- the engine thread steps the engine and hands each step's outputs to
- the response thread: a request's ResponseStream turns its steps into responses (or its
  failure into an error response), and LanguageMetrics turns the engine's prefill reports and
  gauges into metrics.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import torch

from .. import contract
from ..engine.engine import Engine, PrefillReport
from ..engine.sequence import Sequence, Step
from ..engine.structured import StructuredOutputs
from ..engine.worker import EngineLoop
from ..errors import InvalidInput, NotFound, Unavailable
from ..features import VisualFeatures
from ..parallel.engine import parallel_engine
from ..settings import ServingConfig
from .io import error_response, model_config, request_parameters, scalar, torch_input
from .metrics import LANGUAGE_COUNTERS, LANGUAGE_GAUGES, LANGUAGE_HISTOGRAMS, Counters, Gauges, Histograms

TOKENS_PER_COUNT = 32


def response(pb, text: str, ids: list[int], finish_reason: str, num_input_tokens: int):
    return pb.InferenceResponse(output_tensors=[
        pb.Tensor(contract.TEXT_OUTPUT, np.array([text.encode("utf-8")], dtype=object)),
        pb.Tensor(contract.OUTPUT_IDS, np.array(ids, dtype=np.int32)),
        pb.Tensor(contract.FINISH_REASON, np.array([finish_reason.encode()], dtype=object)),
        pb.Tensor(contract.NUM_INPUT_TOKENS, np.array([num_input_tokens], dtype=np.int32)),
    ])


def stop_strings(value) -> tuple[str, ...]:
    """The request parameter `stop` (contract.STOP): a JSON array of strings, as text. Raises
    InvalidInput naming it when it is anything else."""
    if value is None:
        return ()
    try:
        stops = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        stops = None
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidInput(f"the request parameter {contract.STOP} must be a JSON array of strings, got {value!r}")
    return tuple(stops)


def switch(params: dict, name: str) -> bool:
    """A boolean request parameter (absent: False). Raises InvalidInput naming it otherwise."""
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"the request parameter {name} must be a boolean, got {value!r}")
    return value


class ResponseStream:
    """Sends one request's steps: each as it comes when streaming, else one response at the end
    (engine/worker.py's OutputStream; called on the response thread)."""

    def __init__(self, pb, sender, stream: bool, metrics: Counters, histograms: Histograms | None = None):
        self.pb, self.sender, self.stream, self.metrics, self.histograms = pb, sender, stream, metrics, histograms
        self.text, self.ids = [], []
        self.start, self.first = time.perf_counter(), True
        self.first_token_s = 0.0  # time to first token, once sent
        self.generated = 0
        self.counted = 0  # of `generated`, added to the tokens counter
        self.num_input_tokens = 0  # the prompt's tokens, set once the prompt is built
        self.seq: Sequence | None = None  # once built (its admission time: queue time)
        self.on_done = lambda: None

    def _response(self, text: str, ids: list[int], finish_reason: str):
        return response(self.pb, text, ids, finish_reason, self.num_input_tokens)

    def emit(self, step: Step) -> None:
        done = bool(step.finish_reason)
        if self.first and step.token_ids:
            self.first_token_s = time.perf_counter() - self.start
            self.metrics.add("ttft", self.first_token_s)
            self.first = False
        self.generated += len(step.token_ids)
        # The tokens counter in batches (each increment is an IPC, as is each streamed
        # response): every TOKENS_PER_COUNT tokens and at the end, before the final response.
        if done or self.generated - self.counted >= TOKENS_PER_COUNT:
            self.metrics.add("tokens", self.generated - self.counted)
            self.counted = self.generated
        if done:
            self.metrics.add("requests", 1)
            self._observe()
            self.on_done()
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if self.stream:
            self.sender.send(self._response(step.text, step.token_ids, step.finish_reason), flags=final if done else 0)
            return
        self.text.append(step.text)
        self.ids += step.token_ids
        if done:
            self.sender.send(self._response("".join(self.text), self.ids, step.finish_reason), flags=final)

    def _observe(self) -> None:
        """The finished request's histograms (on the response thread, before its last response)."""
        h = self.histograms
        if h is None:
            return
        e2e = time.perf_counter() - self.start
        if self.generated:
            h.observe("ttft", self.first_token_s)
        if self.generated >= 2:
            h.observe("itl", (e2e - self.first_token_s) / (self.generated - 1))
        h.observe("e2e", e2e)
        if self.seq is not None and self.seq.admitted:
            h.observe("queue", max(0.0, self.seq.admitted - self.seq.arrival))
        h.observe("prompt_tokens", self.num_input_tokens)
        h.observe("generated_tokens", self.generated)

    def fail(self, error: Exception) -> None:
        self.on_done()
        self.metrics.add("failures", 1)
        self.sender.send(error_response(self.pb, error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class LanguageMetrics:
    """The engine's reports -> the model's counters and gauges (engine/worker.py's
    EngineMetrics; called on the response thread, since each update is an IPC)."""

    def __init__(self, counters: Counters, gauges: Gauges):
        self.counters, self.gauges = counters, gauges

    def prefill(self, report: PrefillReport) -> None:
        self.counters.add("prefill_tokens", report.computed_tokens)
        self.counters.add("prefix_cached_tokens", report.cached_tokens)
        self.counters.add("prefix_cache_hits", int(report.cached_tokens > 0))

    def stats(self, stats: dict[str, int]) -> None:
        self.gauges.set(stats)


class LanguageService:
    """The engine, its thread and its response thread, built from the served model's settings.
    With tensor_parallel_size > 1 the engine's model is rank 0's share and `group` the other
    ranks (parallel/): when one dies, new requests fail at once naming it, the engine's fail
    as they reach a step, and the model unloads itself so Triton reports it not ready."""

    MODEL_NAME = "qwen3_language"

    def __init__(self, pb, settings: ServingConfig):
        self.pb, self.settings = pb, settings
        self.config = model_config(settings)
        self.group = None
        if settings.tensor_parallel_size > 1:
            self.engine, self.group = parallel_engine(self.config, settings)
        else:
            self.engine = Engine.from_checkpoint(self.config, settings)
        blocks = self.engine.blocks
        print(f"qwen3_language: {blocks.num_blocks} KV blocks of {blocks.block_size} tokens "
              f"({blocks.num_blocks * blocks.block_size} tokens), max_num_seqs {settings.max_num_seqs}, "
              f"max_num_batched_tokens {settings.max_num_batched_tokens}, torch threads {torch.get_num_threads()}",
              flush=True)
        labels = {"model": "qwen3_language"}
        self.metrics = Counters(pb, LANGUAGE_COUNTERS, labels)
        self.gauges = Gauges(pb, LANGUAGE_GAUGES, labels)
        self.histograms = Histograms(pb, LANGUAGE_HISTOGRAMS, labels)
        self.gauges.set(self.engine.stats())
        self.loop = EngineLoop(self.engine, LanguageMetrics(self.metrics, self.gauges))
        self.cancellable: dict[str, Sequence] = {}  # cancel_token -> its sequence, until it finishes
        if self.group is not None:
            self.group.on_failure(self._parallel_failure)

    def _parallel_failure(self, message: str) -> None:
        """A rank died (on the group's watch thread): the model unloads itself, so its readiness
        (and the ensemble's, and the server's) says so; Triton 2.51's Python backend has no
        per-instance readiness hook. Requests meanwhile fail with `message`."""
        def unload():
            try:
                self.pb.unload_model(self.MODEL_NAME)
            except Exception as e:  # noqa: BLE001 - not in explicit model control: say so, requests still fail
                print(f"{self.MODEL_NAME}: could not unload itself after the failure: {e}", flush=True)

        threading.Thread(target=unload, name="qwen3vl-tp-unload", daemon=True).start()

    def submit(self, request) -> None:
        """Validate and enqueue one request (tokenized here, so bad input fails at once, alone)."""
        pb = self.pb
        sender = request.get_response_sender()
        params = request_parameters(request)
        if contract.CANCEL in params:
            self._cancel(sender, str(params[contract.CANCEL]))
            return
        stream = ResponseStream(pb, sender, False, self.metrics, self.histograms)
        try:
            if self.group is not None and self.group.failure:
                raise Unavailable(self.group.failure)
            stream.stream = bool(scalar(pb, request, contract.STREAM, bool) or False)
            seq = self._sequence(request, stream, stop_strings(params.get(contract.STOP)),
                                 switch(params, contract.RAW_PROMPT))
            token = params.get(contract.CANCEL_TOKEN)
            if token:
                self.cancellable[str(token)] = seq
                stream.on_done = lambda: self.cancellable.pop(str(token), None)
            self.loop.submit(seq, stream, sender.is_cancelled)
        except Exception as e:  # noqa: BLE001 - bad input: this request fails, the model carries on
            stream.fail(e)

    def _cancel(self, sender, token: str) -> None:
        """A cancel request: the generation named by `token` leaves at the next engine step
        (finish_reason `cancelled`). The reply: one response with finish_reason `cancelled`, or
        NOT_FOUND when no running generation has that token (finished already, or unknown)."""
        pb = self.pb
        seq = self.cancellable.get(token)
        if seq is None:
            sender.send(error_response(pb, NotFound("no running request has this cancel token")),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        seq.cancel_requested = True
        sender.send(response(pb, "", [], "cancelled", 0), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _sequence(self, request, stream: ResponseStream, stop: tuple[str, ...] = (), raw: bool = False) -> Sequence:
        pb = self.pb
        text = scalar(pb, request, contract.TEXT_INPUT, str)
        if text is None:
            raise InvalidInput(f"{contract.TEXT_INPUT} is required")
        if self.settings.log_requests:  # debug only: prompts are the users' data
            print(f"qwen3_language request: text_input={text!r} max_tokens="
                  f"{scalar(pb, request, contract.MAX_TOKENS, int)}", flush=True)
        params = self.engine.params(
            max_tokens=scalar(pb, request, contract.MAX_TOKENS, int),
            temperature=scalar(pb, request, contract.TEMPERATURE, float),
            top_p=scalar(pb, request, contract.TOP_P, float),
            top_k=scalar(pb, request, contract.TOP_K, int),
            seed=scalar(pb, request, contract.SEED, int),
            ignore_eos=scalar(pb, request, contract.IGNORE_EOS, bool),
            stop=stop or None,
        )
        structured = scalar(pb, request, contract.STRUCTURED_OUTPUTS, str)
        tools = self._tools(request)
        if raw and tools:
            raise InvalidInput(f"{contract.TOOLS} are rendered by the chat template; a raw prompt has none")
        seq = self.engine.new_sequence(text, self._features(request), params, raw,
                                       structured=StructuredOutputs.parse(structured) if structured else None,
                                       tools=tools)
        stream.num_input_tokens, stream.seq = seq.prompt_len, seq
        return seq

    def _tools(self, request) -> list | None:
        """The `tools` input: a JSON list of OpenAI function definitions, or None. Raises
        InvalidInput naming what is wrong."""
        text = scalar(self.pb, request, contract.TOOLS, str)
        if not text:
            return None
        try:
            tools = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidInput(f"{contract.TOOLS} is not valid JSON: {e}") from None
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise InvalidInput(f"{contract.TOOLS} must be a JSON list of tool objects "
                               "({\"type\": \"function\", \"function\": {...}})")
        return tools or None

    def _features(self, request) -> VisualFeatures:
        grids = torch_input(self.pb, request, contract.IMAGE_GRID_THW)
        video_grids = torch_input(self.pb, request, contract.VIDEO_GRID_THW)
        timestamps = torch_input(self.pb, request, contract.VIDEO_TIMESTAMPS)
        no_videos = video_grids is None or video_grids.shape[0] == 0
        if (grids is None or grids.shape[0] == 0) and no_videos:
            return VisualFeatures.empty(self.config)
        if grids is None:
            grids = torch.empty(0, 3, dtype=torch.int64)
        embeds = torch_input(self.pb, request, contract.VISUAL_EMBEDS)
        deepstack = torch_input(self.pb, request, contract.DEEPSTACK_EMBEDS)
        if embeds is None or deepstack is None:
            raise InvalidInput(f"{contract.IMAGE_GRID_THW} was given without {contract.VISUAL_EMBEDS} "
                               f"and {contract.DEEPSTACK_EMBEDS}")
        if grids.shape[0] > self.settings.max_images_per_request:
            raise InvalidInput(f"{grids.shape[0]} images in one request; the limit is "
                               f"{self.settings.max_images_per_request} (max_images_per_request)")
        if embeds.shape[0] > self.settings.max_visual_tokens_per_request:
            raise InvalidInput(f"{embeds.shape[0]} visual tokens in one request; the limit is "
                               f"{self.settings.max_visual_tokens_per_request} (max_visual_tokens_per_request)")
        if no_videos:
            return VisualFeatures(embeds, deepstack, grids.to(torch.int64))
        if video_grids.shape[0] > self.settings.max_videos_per_request:
            raise InvalidInput(f"{video_grids.shape[0]} videos in one request; the limit is "
                               f"{self.settings.max_videos_per_request} (max_videos_per_request)")
        if timestamps is None:
            raise InvalidInput(f"{contract.VIDEO_GRID_THW} was given without {contract.VIDEO_TIMESTAMPS}")
        return VisualFeatures(embeds, deepstack, grids.to(torch.int64), video_grids.to(torch.int64),
                              timestamps.to(torch.float64).reshape(-1))

    def stop(self) -> None:
        self.loop.stop()
        self.engine.grammars.close()  # compiles not yet started are dropped
        if self.group is not None:
            self.group.stop()
