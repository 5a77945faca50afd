"""perf_analyzer (the binary from the tritonclient 2.41 wheel) against the real aggregated server:
streamed gRPC load on the ensemble, text-only and with a real PNG, and the images really decoded."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import urllib.request

import pytest

from conftest import png, video
from qwen3vl.tools import perf


@pytest.fixture(scope="module")
def perf_analyzer():
    try:
        return perf.ensure_perf_analyzer()
    except perf.PerfAnalyzerError as e:  # e.g. no package index reachable and nothing cached in .work/
        pytest.skip(f"perf_analyzer unavailable: {e}")


def request_counts(server) -> dict[tuple[str, str], float]:
    """{(metric, model): value} for Triton's request success/failure counters."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    counts = {}
    for m in re.finditer(r'^(nv_inference_request_(?:success|failure))\{([^}]*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = (m.group(1), labels["model"])
        counts[key] = counts.get(key, 0.0) + float(m.group(3))
    return counts


def run(perf_analyzer, server, input_path, csv_path, concurrency="1:2"):
    binary, env = perf_analyzer
    cmd = perf.perf_command(binary, server.grpc_url, input_path, concurrency=concurrency, measurement_ms=1500,
                            stability=100, csv_path=csv_path, extra=["--max-trials", "5"])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_input_data_carries_raw_image_bytes(tmp_path):
    a, b = png(32, 32, seed=1), png(48, 32, seed=2)
    path = perf.write_input_data(tmp_path / "in.json", ["one", "two"], [a, b], max_tokens=5)
    steps = json.loads(path.read_text())["data"]
    assert [s["text_input"] for s in steps] == [["one"], ["two"]]
    step = steps[0]
    assert step["max_tokens"] == [5] and step["temperature"] == [0.0] and step["stream"] == [True]
    assert step["images"]["shape"] == [2]
    wire, items = base64.b64decode(step["images"]["b64"]), []
    while wire:
        (n,), wire = struct.unpack("<I", wire[:4]), wire[4:]
        items.append(wire[:n])
        wire = wire[n:]
    assert items == [a, b]


def test_input_data_carries_raw_video_bytes_and_fps(tmp_path):
    clip = video(8, 4, seed=1)
    step = json.loads(perf.write_input_data(tmp_path / "in.json", ["one"], videos=[clip], video_fps=1.0).read_text())["data"][0]
    assert step["videos"]["shape"] == [1] and step["video_fps"] == [1.0] and "images" not in step
    assert base64.b64decode(step["videos"]["b64"]) == struct.pack("<I", len(clip)) + clip


@pytest.mark.parametrize("media", ["text", "png", "video"])
def test_perf_analyzer_streams_against_the_ensemble(server, perf_analyzer, tmp_path, media):
    images = [png(64, 48, seed=7)] if media == "png" else []
    videos = [video(8, 4, seed=7)] if media == "video" else []
    input_path = perf.write_input_data(tmp_path / "in.json", ["Describe this.", "What is it?"], images, max_tokens=4,
                                       videos=videos)
    before = request_counts(server)
    done = run(perf_analyzer, server, input_path, tmp_path / "report.csv")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "error" not in out.lower(), out
    rows = perf.read_csv(tmp_path / "report.csv")
    assert [r["Concurrency"] for r in rows] == [1.0, 2.0]
    for r in rows:
        assert r["Inferences/Second"] > 0
        # decoupled and streamed: several responses per request (4 tokens -> several pieces)
        assert r["Response Throughput"] > r["Inferences/Second"]
    after = request_counts(server)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert delta[("nv_inference_request_failure", "ensemble")] == 0  # an undecodable image would count here
    assert delta[("nv_inference_request_success", "ensemble")] > 0
    assert delta[("nv_inference_request_success", "qwen3_encoder")] > 0
    assert server.alive()


def test_json_string_images_arrive_undecoded(server, perf_analyzer, tmp_path):
    """Why write_input_data uses {"b64": ...}: a base64 string under "content" reaches the model
    as that text, not as the image it encodes (the encoder rejects it, so perf_analyzer fails)."""
    step = perf.input_step("Describe this.", max_tokens=2)
    step["images"] = {"content": [base64.b64encode(png(32, 32, seed=3)).decode()], "shape": [1]}
    (tmp_path / "in.json").write_text(json.dumps({"data": [step]}))
    before = request_counts(server)
    done = run(perf_analyzer, server, tmp_path / "in.json", None, concurrency="1:1")
    assert done.returncode != 0
    assert "is not a decodable image" in done.stdout + done.stderr
    # and the ensemble's failure counter, which the streaming test reads, sees it (the decoupled
    # encoder's own counters don't: its error responses count as successful requests)
    after = request_counts(server)
    key = ("nv_inference_request_failure", "ensemble")
    assert after.get(key, 0.0) > before.get(key, 0.0)
    assert server.alive()
