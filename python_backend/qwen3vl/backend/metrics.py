"""The models' metrics on Triton's metrics endpoint (`pb_utils.MetricFamily`): every table
declared here, once, for both shells (and for the dashboard and docs/operating.md, which are checked
against these tables); the classes that update them.

Each set, increment or observe is an IPC from the stub to the server: the language model
updates its metrics on its response thread, the encoder its histograms on a metrics thread,
never on the engine's step or a vision forward. Buckets follow vllm_backend's
(`vllm:time_to_first_token_seconds` and so on), so the dashboards people have for vLLM read
these the same way.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..jobs import JobThread

log = logging.getLogger(__name__)

# -- buckets (vllm_backend src/utils/metrics.py)
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]


def buckets_1_2_5(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(float(m * scale))
        scale *= 10


# Token counts per request or image: vLLM bounds these by max_model_len; a fixed bound keeps
# the buckets the same on every server (Qwen3-VL's context is 256K tokens).
TOKEN_BUCKETS = buckets_1_2_5(500_000)

# -- the tables: key -> (metric name, description[, buckets])
LANGUAGE_COUNTERS = {
    "requests": ("qwen3vl_language_requests_total", "Generation requests finished"),
    "failures": ("qwen3vl_language_failures_total", "Generation requests failed"),
    "tokens": ("qwen3vl_language_generated_tokens_total",
               "Tokens generated (added every 32 tokens of a request and at its end)"),
    "ttft": ("qwen3vl_language_first_token_seconds_total", "Sum of time to first token"),
    "prefill_tokens": ("qwen3vl_language_prefill_tokens_total", "Prompt tokens run through the model"),
    "prefix_cached_tokens": ("qwen3vl_language_prefix_cache_tokens_total",
                             "Prompt tokens restored from the prefix cache instead"),
    "prefix_cache_hits": ("qwen3vl_language_prefix_cache_hits_total",
                          "Requests that restored part of their prompt from the prefix cache"),
}

LANGUAGE_GAUGES = {
    "running": ("qwen3vl_language_running_requests", "Requests in the running batch"),
    "waiting": ("qwen3vl_language_waiting_requests", "Requests waiting for a slot"),
    "kv_blocks_used": ("qwen3vl_language_kv_blocks_used", "KV cache blocks held by running requests"),
    "kv_blocks_total": ("qwen3vl_language_kv_blocks_total", "KV cache blocks in all"),
    "batch_size": ("qwen3vl_language_batch_size", "Sequences in the engine's last step (0 when idle)"),
}

LANGUAGE_HISTOGRAMS = {
    "ttft": ("qwen3vl_language_time_to_first_token_seconds",
             "From the request's arrival at the model to its first token sent", TTFT_BUCKETS),
    "itl": ("qwen3vl_language_inter_token_latency_seconds",
            "A request's mean time between output tokens: (end-to-end - TTFT) / (tokens - 1), "
            "one observation per request of 2 tokens or more", TPOT_BUCKETS),
    "e2e": ("qwen3vl_language_request_latency_seconds",
            "From the request's arrival at the model to its last token sent", LATENCY_BUCKETS),
    "queue": ("qwen3vl_language_queue_time_seconds",
              "From the request's arrival at the model to its admission into the running batch", LATENCY_BUCKETS),
    "prompt_tokens": ("qwen3vl_language_request_prompt_tokens",
                      "Prompt tokens per finished request (visual tokens included)", TOKEN_BUCKETS),
    "generated_tokens": ("qwen3vl_language_request_generated_tokens",
                         "Tokens generated per finished request", TOKEN_BUCKETS),
}

ENCODER_COUNTERS = {
    # labelled with the mode: local (the vision tower runs here) or remote (fetched from encoder servers)
    "requests": ("qwen3vl_encoder_requests_total", "Requests answered"),
    "failures": ("qwen3vl_encoder_failures_total", "Requests answered with an error"),
    "images": ("qwen3vl_encoder_images_total", "Images and videos in requests"),
    "forwards": ("qwen3vl_encoder_forwards_total", "Vision tower forwards (one per batch)"),
    "cache_hits": ("qwen3vl_encoder_cache_hits_total", "Images and videos served from the feature cache"),
    "cache_misses": ("qwen3vl_encoder_cache_misses_total", "Images and videos run through the vision tower"),
    "seconds": ("qwen3vl_encoder_seconds_total", "Time encoding (local) or fetching (remote)"),
    "chunks_sent": ("qwen3vl_transfer_chunks_sent_total", "E->L chunks sent to language servers"),
    "bytes_sent": ("qwen3vl_transfer_bytes_sent_total", "E->L bytes sent to language servers"),
    "shm_bytes_sent": ("qwen3vl_transfer_shm_bytes_sent_total",
                       "E->L bytes written into language servers' shared memory"),
    "chunks_received": ("qwen3vl_transfer_chunks_received_total", "E->L chunks received from encoders"),
    "bytes_received": ("qwen3vl_transfer_bytes_received_total", "E->L bytes received from encoders"),
    "shm_bytes_received": ("qwen3vl_transfer_shm_bytes_received_total", "E->L bytes received through shared memory"),
    "transfer_seconds": ("qwen3vl_transfer_seconds_total",
                         "Time fetching E->L tensors, per image from first request to assembled, summed"),
    "resumes": ("qwen3vl_transfer_resumes_total", "Transfers resumed after a broken connection or encoder"),
    "failovers": ("qwen3vl_transfer_failovers_total", "Transfers moved to another encoder"),
}

ENCODER_HISTOGRAMS = {
    "visual_tokens": ("qwen3vl_encoder_image_visual_tokens",
                      "Visual tokens per image answered (t*h*w / merge^2 of its grid)", TOKEN_BUCKETS),
    "encode_seconds": ("qwen3vl_encoder_batch_seconds",
                       "One encode call: a vision forward of a batch (local), fetching a batch's images (remote)",
                       TTFT_BUCKETS),
    "transfer_seconds": ("qwen3vl_transfer_image_seconds",
                         "E->L transfer of one image, from its first request to its assembled tensors (remote)",
                         TTFT_BUCKETS),
}

TABLES = {
    "qwen3_language": {"counter": LANGUAGE_COUNTERS, "gauge": LANGUAGE_GAUGES, "histogram": LANGUAGE_HISTOGRAMS},
    "qwen3_encoder": {"counter": ENCODER_COUNTERS, "histogram": ENCODER_HISTOGRAMS},
}


def exposed_names() -> dict[str, str]:
    """Every series name the models expose -> its kind (a histogram's _bucket, _sum, _count)."""
    out = {}
    for tables in TABLES.values():
        for kind, table in tables.items():
            for name, *_ in table.values():
                if kind == "histogram":
                    out.update({f"{name}{suffix}": kind for suffix in ("_bucket", "_sum", "_count")})
                else:
                    out[name] = kind
    return out


def _buckets(b: list[float]) -> str:
    if b == TOKEN_BUCKETS:
        return "1, 2, 5, 10, ... 500000"
    return ", ".join(f"{x:g}" for x in b)


def metrics_table() -> str:
    """docs/operating.md's list of the models' metrics (markdown), generated from the tables."""
    rows = ["| metric | kind | model (labels) | meaning | buckets |", "|---|---|---|---|---|"]
    for model, tables in TABLES.items():
        labels = "`model`, `mode`" if model == "qwen3_encoder" else "`model`"
        for kind, table in tables.items():
            for name, description, *rest in table.values():
                buckets = _buckets(rest[0]) if rest else ""
                rows.append(f"| `{name}` | {kind} | {model} ({labels}) | {description} | {buckets} |")
    return "\n".join(rows)


# -- updating them
class Counters:
    """`spec`: {key: (metric name, description)}; every counter carries `labels`. Each
    increment is an IPC to the server: zero increments are skipped."""

    kind = "COUNTER"

    def __init__(self, pb, spec: dict[str, tuple], labels: dict[str, str]):
        kind = getattr(pb.MetricFamily, self.kind)
        # The family must outlive its metric: keep both.
        self.families = {k: pb.MetricFamily(name=name, description=description, kind=kind)
                         for k, (name, description, *_) in spec.items()}
        self.metrics = {k: self._metric(family, labels, spec[k]) for k, family in self.families.items()}

    @staticmethod
    def _metric(family, labels: dict[str, str], spec: tuple):
        return family.Metric(labels=labels)

    def add(self, key: str, value: float) -> None:
        if value:
            self.metrics[key].increment(value)


class Gauges(Counters):
    """Like Counters, set instead of incremented; a value equal to the last one set is skipped
    (each set is an IPC)."""

    kind = "GAUGE"

    def __init__(self, pb, spec: dict[str, tuple], labels: dict[str, str]):
        super().__init__(pb, spec, labels)
        self.last: dict[str, float] = {}

    def set(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key in self.metrics and self.last.get(key) != value:
                self.metrics[key].set(value)
                self.last[key] = value


class Histograms(Counters):
    """`spec`: {key: (metric name, description, buckets)}. Each observation is an IPC: call
    `observe` from a thread that the model's work does not wait on."""

    kind = "HISTOGRAM"

    @staticmethod
    def _metric(family, labels: dict[str, str], spec: tuple):
        return family.Metric(labels=labels, buckets=list(spec[2]))

    def observe(self, key: str, value: float) -> None:
        self.metrics[key].observe(float(value))


class MetricsThread(JobThread[Callable[[], None]]):
    """Runs metric updates (each an IPC) in order on a thread of its own, off the work's path:
    `submit(update)`."""

    stop_timeout_s = 10.0  # an update is one IPC: at shutdown, one that hangs is not waited on long

    def __init__(self, name: str = "qwen3vl-metrics"):
        super().__init__(name)

    def _run(self) -> None:
        while (fn := self.jobs.get()) is not None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - metrics must never stop the model
                log.exception("metric update failed")
