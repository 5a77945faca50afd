"""The launcher and the demo, as a user runs them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
import sys
import time

import pytest

from conftest import LOG_DIR, metric, png
from qwen3vl.client import ServerError, infer
from qwen3vl.launch.server import Server, free_ports


def test_sigterm_shuts_the_server_down_cleanly(checkpoint):
    server = Server(checkpoint, LOG_DIR / "sigterm.log",
                    extra=["--device", "cpu", "--max-model-len", "200", "--no-enable-prefix-caching"]).start()
    assert infer(server.http_url, "http", prompt="hi", max_tokens=2, temperature=0.0).finish_reason == "length"
    with pytest.raises(ServerError, match="exceeds the context window of 200 tokens"):  # --max-model-len reached it
        infer(server.http_url, "http", prompt="hi", max_tokens=200, temperature=0.0)
    image = [png(64, 64, 5)]  # --no-enable-prefix-caching reached it: a repeat prefills everything again
    for _ in range(2):
        infer(server.http_url, "http", prompt="hi", images=image, max_tokens=2, temperature=0.0)
    assert metric(server, "qwen3vl_language_prefix_cache_hits_total") == 0
    assert metric(server, "qwen3vl_language_prefill_tokens_total") > 0
    start = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - start < 60
    assert "successfully unloaded 'qwen3_language'" in server.tail(200)


def test_a_port_in_use_is_refused_before_tritonserver_starts(checkpoint):
    """A port another program listens on, or one given twice: a clear error at once, naming the
    flag, before any model loads."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    http, grpc, metrics_port = free_ports(3)
    try:
        cases = [(["--http-port", str(taken.getsockname()[1]), "--grpc-port", str(grpc)],
                  rf"--http-port {taken.getsockname()[1]} on 127.0.0.1: another program listens on it"),
                 (["--http-port", str(http), "--grpc-port", str(grpc), "--openai-port", str(http)],
                  rf"--openai-port {http} is also --http-port's port")]
        for ports, message in cases:
            start = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "qwen3vl.cli.serve", "--checkpoint", str(checkpoint),
                                  "--metrics-port", str(metrics_port), *ports],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode != 0 and re.search(message, out.stderr), out.stderr
            assert "nothing started" in out.stderr
            assert time.monotonic() - start < 30
    finally:
        taken.close()


def test_a_cpu_servers_log_holds_no_gpu_errors(server):
    """On a host without a GPU, qwen3vl-serve keeps tritonserver off GPU metrics and pinned
    memory: none of their errors in the log (the two Triton 2.51 logs regardless are in the
    Troubleshooting, docs/troubleshooting.md)."""
    from qwen3vl.launch.tritonserver import gpu_present

    if gpu_present():
        pytest.skip("a GPU host: these features are on")
    infer(server.http_url, "http", prompt="hi", max_tokens=2, temperature=0.0)  # a request: pinned memory's turn
    log = (LOG_DIR / "aggregated.log").read_text()
    for removed in ("Failed to initialize NVML", "DCGM unable to start", "Unable to allocate pinned system memory"):
        assert removed not in log, removed
    documented = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    for harmless in ("CudaDriverHelper has not been initialized", "unable to create stream for ensemble"):
        assert harmless not in log or harmless in documented, harmless


def test_metrics_count_requests_and_tokens(server):
    def value(name):
        return metric(server, name)

    requests, tokens = value("qwen3vl_language_requests_total"), value("qwen3vl_language_generated_tokens_total")
    infer(server.http_url, "http", prompt="count me", max_tokens=5, temperature=0.0)
    assert value("qwen3vl_language_requests_total") == requests + 1
    assert value("qwen3vl_language_generated_tokens_total") == tokens + 5


def test_demo_prints_a_streamed_answer(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qwen3vl.tools.demo", "--preset", "tiny", "--checkpoint",
                          str(tmp_path / "ckpt"), "--max-tokens", "8"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    streamed = re.search(r"(\d+) streamed responses, 8 tokens, finish_reason=length", out.stdout)
    assert streamed and int(streamed.group(1)) > 1, out.stdout
    assert "TTFT" in out.stdout


def test_client_cli_json(server):
    out = subprocess.run([sys.executable, "-m", "qwen3vl.cli.client", "--url", server.grpc_url, "--prompt", "hello",
                          "--max-tokens", "4", "--temperature", "0", "--stream", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    answer = json.loads(out.stdout)
    assert len(answer["output_ids"]) == 4 and answer["finish_reason"] == "length" and answer["ttft_s"] > 0


@pytest.mark.parametrize("protocol, name, flag", [("grpc", "gRPC", "--grpc-port"), ("http", "HTTP", "--http-port")])
def test_client_cli_says_when_no_server_answers(protocol, name, flag):
    (port,) = free_ports(1)
    out = subprocess.run([sys.executable, "-m", "qwen3vl.cli.client", "--url", f"127.0.0.1:{port}", "--protocol", protocol,
                          "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"no server answers at 127.0.0.1:{port} over {name} (Connection refused)" in out.stderr, out.stderr
    assert f"qwen3vl-serve {flag}" in out.stderr and "Traceback" not in out.stderr


def test_client_cli_reports_server_errors(server):
    out = subprocess.run([sys.executable, "-m", "qwen3vl.cli.client", "--url", server.http_url, "--protocol", "http",
                          "--prompt", "hi", "--max-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "max_tokens must be >= 1" in out.stderr


def test_every_entry_points_help_is_whole():
    """Each console script's --help: a description that ends its sentence, help for every flag."""
    import argparse
    import importlib
    import tomllib

    class Parsed(Exception):
        pass

    def parser_of(main, argv):
        def grab(parser, *args, **kwargs):
            raise Parsed(parser)

        original, argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_args, grab
        try:
            main(argv)
        except Parsed as got:
            return got.args[0]
        finally:
            argparse.ArgumentParser.parse_args = original
        raise AssertionError(f"{main} parsed no arguments")

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    entries = [(name, target, []) for name, target in scripts.items()]
    entries.append(("qwen3vl-bench demo-accuracy", scripts["qwen3vl-bench"], ["demo-accuracy"]))
    for name, target, argv in entries:
        module, _, function = target.partition(":")
        parser = parser_of(getattr(importlib.import_module(module), function), argv)
        assert parser.prog == name, (parser.prog, name)
        assert re.search(r"[.)]$", (parser.description or "").strip()), (name, parser.description)
        assert all(a.help for a in parser._actions), (name, [a.option_strings for a in parser._actions if not a.help])
