"""One serving config: environment over model parameters over defaults; docs/serving.md's table is
the one generated from it; qwen3vl-serve's flags are its flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qwen3vl.cli.serve import parse_args, settings_from_args
from qwen3vl.errors import InvalidInput
from qwen3vl.settings import ServingConfig, settings_table

SERVING_DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"


def test_environment_over_parameters_over_defaults():
    params = {"kv_cache_mb": {"string_value": "16"}, "encoder_mode": {"string_value": "remote"},
              "transfer_shared_memory": {"string_value": "true"}}
    s = ServingConfig.load(params, environ={"QWEN3VL_KV_CACHE_MB": "8", "QWEN3VL_ENCODER_URLS": "a:1,b:2"})
    assert s.kv_cache_mb == 8.0 and s.encoder_mode == "remote" and s.transfer_shared_memory is True
    assert s.encoder_url_list == ["a:1", "b:2"]
    assert s.transfer_chunk_tokens == 1024  # default
    assert ServingConfig.load({}, environ={}) == ServingConfig()


def test_a_bad_value_names_the_setting():
    with pytest.raises(InvalidInput, match="encoder_timeout_s.*'soon' is not a float"):
        ServingConfig.load({}, environ={"QWEN3VL_ENCODER_TIMEOUT_S": "soon"})
    with pytest.raises(InvalidInput, match="transfer_shared_memory"):
        ServingConfig.load({"transfer_shared_memory": {"string_value": "maybe"}}, environ={})


def test_env_round_trips():
    s = ServingConfig(checkpoint="/ckpt", max_model_len=512, transfer_shared_memory=True, encoder_urls="a:1")
    assert ServingConfig.load({}, environ=s.env()) == s
    assert "QWEN3VL_DEVICE" not in s.env()  # defaults are not written
    assert s.env({"device"}) == {"QWEN3VL_DEVICE": "auto"}


def test_serve_flags_are_the_settings_flags(tmp_path):
    args = parse_args(["--checkpoint", str(tmp_path), "--encoder-url", "h:1", "--encoder-url", "h:2",
                       "--shared-memory", "--chunk-tokens", "64", "--max-model-len", "100", "--no-enable-prefix-caching",
                       "--max-num-seqs", "8"])
    settings, given = settings_from_args(args)
    assert settings == ServingConfig(checkpoint=str(tmp_path.resolve()), encoder_urls="h:1,h:2",
                                     transfer_shared_memory=True, transfer_chunk_tokens=64, max_model_len=100,
                                     enable_prefix_caching=False, max_num_seqs=8)
    assert given == {"checkpoint", "encoder_urls", "transfer_shared_memory", "transfer_chunk_tokens",
                     "max_model_len", "enable_prefix_caching", "max_num_seqs"}
    assert settings.env(given)["QWEN3VL_ENABLE_PREFIX_CACHING"] == "0"
    flags = {f.metadata["flag"] for f in dataclasses.fields(ServingConfig) if f.metadata["flag"]}
    assert flags == {"--checkpoint", "--device", "--dtype", "--cpu-threads", "--max-model-len", "--max-num-seqs",
                     "--max-num-batched-tokens", "--enable-chunked-prefill", "--enable-prefix-caching", "--block-size",
                     "--kv-cache-mb", "--kernels", "--fp8-mode", "--gpu-memory-utilization", "--tensor-parallel-size",
                     "--enable-expert-parallel", "--distributed-timeout-s", "--enforce-eager", "--encoder-url", "--chunk-tokens", "--shared-memory",
                     "--max-queued-requests", "--max-queue-time-s", "--max-images-per-request",
                     "--max-visual-tokens-per-request", "--max-image-pixels", "--allow-special-tokens-in-prompt",
                     "--log-requests", "--max-videos-per-request", "--max-video-bytes", "--max-video-seconds",
                     "--max-video-frames", "--max-video-frame-pixels", "--video-fps", "--video-cap-pixels-per-frame"}


def test_the_documented_table_is_the_generated_one():
    assert settings_table() in SERVING_DOC.read_text(), \
        "docs/serving.md's settings table is stale: paste qwen3vl.settings.settings_table() into it"
