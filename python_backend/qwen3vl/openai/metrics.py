"""The service's own Prometheus metrics (`GET /metrics`), as its clients see them; Triton's
metrics port has the model's. One registry per application."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# vllm_backend's buckets (time to first token; end-to-end latency)
TTFT_BUCKETS = (.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10)
LATENCY_BUCKETS = (.3, .5, .8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen3vl_openai_requests", "Chat completion requests answered, by HTTP status",
                                ["status", "stream"], registry=r)
        self.in_flight = Gauge("qwen3vl_openai_requests_in_flight", "Chat completion requests in progress",
                               registry=r)
        self.ttft = Histogram("qwen3vl_openai_time_to_first_token_seconds",
                              "Streamed requests: from the request's arrival to its first content sent",
                              buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("qwen3vl_openai_request_duration_seconds",
                                 "From the request's arrival to its last byte sent", ["stream"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qwen3vl_openai_prompt_tokens", "Prompt tokens of answered requests",
                                     registry=r)
        self.completion_tokens = Counter("qwen3vl_openai_completion_tokens", "Tokens generated for answered requests",
                                         registry=r)
        self.cancelled = Counter("qwen3vl_openai_cancelled_requests",
                                 "Triton requests cancelled before they finished, by reason", ["reason"], registry=r)
        for reason in ("client_disconnected",):
            self.cancelled.labels(reason)

    def answered(self, status: int, stream: bool) -> None:
        self.requests.labels(str(status), str(bool(stream)).lower()).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
