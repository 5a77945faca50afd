"""Metrics: the histograms, gauges and counters of backend/metrics.py's tables, scraped from a real
server's Prometheus endpoint after known requests and parsed with prometheus_client's parser;
counts equal the requests sent, sums equal what the client received. Plus the weight-loading
lines in that server's log, and the tables' own consistency."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import LOG_DIR, png
from qwen3vl.backend import metrics as m
from qwen3vl.client import ask
from qwen3vl.launch.server import Server


def scrape(server) -> dict[str, dict]:
    """{family name: {sample name: [(labels, value)]}} of the model metrics."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(family.name, {}).setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(scraped: dict, sample: str, model: str, **labels) -> float:
    """A sample's value summed over the series of `model` matching `labels` (0 if absent)."""
    total = 0.0
    for samples in scraped.values():
        for labels_, v in samples.get(sample, []):
            if labels_.get("model") == model and all(labels_.get(k) == x for k, x in labels.items()):
                total += v
    return total


def histogram(scraped: dict, name: str, model: str) -> tuple[float, float, list[tuple[float, float]]]:
    """(count, sum, [(le, cumulative count)]) of one histogram, summed over its series."""
    buckets: dict[float, float] = {}
    for samples in scraped.values():
        for labels, v in samples.get(name + "_bucket", []):
            if labels.get("model") == model:
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + v
    return value(scraped, name + "_count", model), value(scraped, name + "_sum", model), sorted(buckets.items())


def delta(before: dict, after: dict, name: str, model: str) -> tuple[float, float]:
    c0, s0, _ = histogram(before, name, model)
    c1, s1, _ = histogram(after, name, model)
    return c1 - c0, s1 - s0


LANG, ENC = "qwen3_language", "qwen3_encoder"


def test_histograms_count_the_requests_sent_and_sum_what_the_client_received(server, checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    images = [[], [png(120, 90, 41)], [png(64, 200, 42), png(150, 100, 43)], []]
    requests = [dict(prompt=f"Count {i} things", images=imgs, max_tokens=3 + i, temperature=0.0,
                     ignore_eos=True, stream=i % 2 == 0) for i, imgs in enumerate(images)]
    requests.append(dict(prompt="One token only", images=[], max_tokens=1, temperature=0.0, ignore_eos=True,
                         stream=False))
    before = scrape(server)
    with ThreadPoolExecutor(3) as pool:  # some of them share the engine's batch
        answers = list(pool.map(lambda r: ask(server.grpc_url, "grpc", timeout_s=120, **r), requests))
    n = len(requests)
    tokens = [len(a.token_ids) for a in answers]
    assert tokens == [r["max_tokens"] for r in requests]  # ignore_eos: exactly max_tokens each

    after = scrape(server)
    lang = {k: delta(before, after, name, LANG) for k, (name, *_) in m.LANGUAGE_HISTOGRAMS.items()}
    for key in ("ttft", "e2e", "queue", "prompt_tokens", "generated_tokens"):
        assert lang[key][0] == n, (key, lang[key])
    assert lang["itl"][0] == sum(t >= 2 for t in tokens)  # one observation per request of 2+ tokens
    assert lang["generated_tokens"][1] == sum(tokens)
    assert lang["prompt_tokens"][1] == sum(a.num_input_tokens for a in answers)
    # the counters agree with the histograms
    assert value(after, "qwen3vl_language_requests_total", LANG) - value(before, "qwen3vl_language_requests_total", LANG) == n
    assert value(after, "qwen3vl_language_generated_tokens_total", LANG) - \
        value(before, "qwen3vl_language_generated_tokens_total", LANG) == sum(tokens)
    assert lang["ttft"][1] == pytest.approx(value(after, "qwen3vl_language_first_token_seconds_total", LANG)
                                            - value(before, "qwen3vl_language_first_token_seconds_total", LANG))
    # times: each request's TTFT <= its end-to-end latency, queue time <= its TTFT
    assert 0 < lang["ttft"][1] <= lang["e2e"][1] and 0 <= lang["queue"][1] <= lang["ttft"][1]
    # buckets as declared, cumulative, +Inf = count
    for key, (name, _, bounds) in m.LANGUAGE_HISTOGRAMS.items():
        count, _, buckets = histogram(after, name, LANG)
        assert [le for le, _ in buckets] == [*bounds, float("inf")], key
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])) and buckets[-1][1] == count

    # encoder: one visual-token observation per image, summing to the processor's count
    # (observed on the encoder's metrics thread: a moment after the response)
    sent = [img for r in requests for img in r["images"]]
    merge = processor.image_processor.merge_size ** 2
    visual = int((processor.image_processor(images=[_pil(b) for b in sent], return_tensors="pt")
                  ["image_grid_thw"].prod(-1) // merge).sum())
    name = m.ENCODER_HISTOGRAMS["visual_tokens"][0]
    deadline = time.monotonic() + 10
    while delta(before, after, name, ENC)[0] < len(sent) and time.monotonic() < deadline:
        time.sleep(0.1)
        after = scrape(server)
    assert delta(before, after, name, ENC) == (len(sent), visual)
    batches, seconds = delta(before, after, m.ENCODER_HISTOGRAMS["encode_seconds"][0], ENC)
    assert 1 <= batches <= n  # every request passes the encoder (text-only ones with no image)
    assert seconds == pytest.approx(value(after, "qwen3vl_encoder_seconds_total", ENC)
                                    - value(before, "qwen3vl_encoder_seconds_total", ENC))


def test_disaggregated_transfer_histograms_count_each_image(checkpoint):
    """A language server fetching from an encoder server: one E->L transfer-time observation per
    image it fetched (mode="remote"), summing to its transfer-seconds counter; the encoder server
    (mode="local") observes the same images' visual tokens."""
    with Server(checkpoint, LOG_DIR / "metrics-encoder.log", role="encoder", models=("qwen3_encoder",),
                extra=["--device", "cpu"]) as enc, \
            Server(checkpoint, LOG_DIR / "metrics-language.log", role="language",
                   extra=["--device", "cpu", "--chunk-tokens", "8", "--encoder-url", enc.grpc_url]) as lang:
        images = [[png(100, 80, 51)], [png(64, 64, 52), png(90, 130, 53)]]
        for imgs in images:
            ask(lang.grpc_url, "grpc", stream=False, prompt="Describe.", images=imgs, max_tokens=2,
                temperature=0.0, timeout_s=120)
        n = sum(map(len, images))
        name = m.ENCODER_HISTOGRAMS["transfer_seconds"][0]
        deadline = time.monotonic() + 10
        while True:  # observed on the metrics thread: a moment after the response
            scraped, enc_scraped = scrape(lang), scrape(enc)
            count, total, _ = histogram(scraped, name, ENC)
            visual = histogram(enc_scraped, m.ENCODER_HISTOGRAMS["visual_tokens"][0], ENC)
            if (count >= n and visual[0] >= n) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert count == n
        assert total == pytest.approx(value(scraped, "qwen3vl_transfer_seconds_total", ENC))
        assert value(scraped, name + "_count", ENC, mode="remote") == n
        # the language server's qwen3_encoder answers with the same grids: equal visual tokens
        assert visual[:2] == histogram(scraped, m.ENCODER_HISTOGRAMS["visual_tokens"][0], ENC)[:2]
        assert visual[0] == n
        assert histogram(scraped, m.LANGUAGE_HISTOGRAMS["ttft"][0], LANG)[0] == len(images)


def _pil(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def test_engine_gauges_are_exposed_and_settle_when_idle(server):
    deadline = time.monotonic() + 10
    while True:
        scraped = scrape(server)
        gauges = {k: value(scraped, name, LANG) for k, (name, _) in m.LANGUAGE_GAUGES.items()}
        if gauges["running"] == gauges["waiting"] == gauges["batch_size"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(name in scraped for name, _ in m.LANGUAGE_GAUGES.values())
    assert gauges["running"] == gauges["waiting"] == gauges["batch_size"] == gauges["kv_blocks_used"] == 0
    assert gauges["kv_blocks_total"] > 0


def test_every_declared_metric_is_exposed(server):
    """The tables (which the dashboard and docs/operating.md are checked against) are what the server
    exposes; the mode-specific encoder histograms exist as families even before an observation."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    missing = set(m.exposed_names()) - exposed
    assert not missing, missing


def test_loading_prints_progress_and_one_summary_line_per_model(server):
    """The server's log: a line per shard with bytes so far, then `loaded N GiB in S s` once for
    the vision tower and once for the language model."""
    log = server.log_path.read_text(errors="replace")
    for model in ("vision tower", "language model"):
        summaries = [line for line in log.splitlines() if line.startswith(f"{model}: loaded ")]
        assert len(summaries) == 1, (model, summaries)
        assert " GiB in " in summaries[0] and summaries[0].split(" GiB in ")[1].split(" ")[1] == "s"
        assert any(line.startswith(f"{model}: shard ") and "(100%)" in line for line in log.splitlines())


# --- the tables themselves ------------------------------------------------------------


def test_tables_have_unique_names_and_vllm_buckets():
    names = [name for tables in m.TABLES.values() for table in tables.values() for name, *_ in table.values()]
    assert len(names) == len(set(names))
    assert all(n.startswith("qwen3vl_") for n in names)
    assert all(n.endswith("_total") for n in (x[0] for x in m.LANGUAGE_COUNTERS.values()))
    assert m.buckets_1_2_5(100) == [1, 2, 5, 10, 20, 50, 100]
    assert m.TTFT_BUCKETS[0] == 0.001 and m.TTFT_BUCKETS[-1] == 10 and len(m.TTFT_BUCKETS) == 16
    assert m.LATENCY_BUCKETS[-1] == 7680 and len(m.LATENCY_BUCKETS) == 21
    # no histogram collides with a counter once a parser strips `_total`
    counters = {x[0].removesuffix("_total") for t in m.TABLES.values() for x in t.get("counter", {}).values()}
    histograms = {x[0] for t in m.TABLES.values() for x in t.get("histogram", {}).values()}
    assert not counters & histograms


class FakeMetric:
    def __init__(self, family, labels, buckets=None):
        self.family, self.labels, self.buckets, self.calls = family, labels, buckets, []

    def increment(self, v):
        self.calls.append(("inc", v))

    def set(self, v):
        self.calls.append(("set", v))

    def observe(self, v):
        self.calls.append(("observe", v))


class FakePb:
    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name, description, kind):
            self.name, self.kind = name, kind

        def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' name
            return FakeMetric(self, labels, buckets)


def test_remote_encoder_observes_each_images_transfer_off_its_thread():
    """A language server's qwen3_encoder (remote mode): one transfer-time observation per
    image fetched, one encode-time observation per batch, on the metrics thread."""
    from qwen3vl.backend.encoder import EncoderService
    from qwen3vl.disagg.fetch import TransferStats

    svc = EncoderService.__new__(EncoderService)
    labels = {"model": ENC, "mode": "remote"}
    svc.metrics = m.Counters(FakePb, m.ENCODER_COUNTERS, labels)
    svc.histograms = m.Histograms(FakePb, m.ENCODER_HISTOGRAMS, labels)
    svc.observer = m.MetricsThread()
    stats = TransferStats(requests=1, images=2)
    for seconds in (0.25, 0.5):
        stats.add(TransferStats(transfer_seconds=seconds, media_transfer_seconds=[seconds], chunks=2))
    svc._count_batch(stats, 0.6)
    svc.observer.stop()
    h = svc.histograms.metrics
    assert h["transfer_seconds"].calls == [("observe", 0.25), ("observe", 0.5)]
    assert h["encode_seconds"].calls == [("observe", 0.6)]
    assert h["transfer_seconds"].buckets == m.TTFT_BUCKETS
    assert svc.metrics.metrics["chunks_received"].calls == [("inc", 4)]
