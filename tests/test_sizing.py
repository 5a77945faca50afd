"""qwen3vl-sizing's numbers (README "Operating it", Sizing) against the real thing on the tiny
checkpoint: the weights a model loads, the KV pool's bytes per token, and the E->L tensors the
vision encoder makes per visual token."""

from __future__ import annotations

import json

import torch
from transformers import AutoProcessor

from conftest import png
from qwen3vl.engine.model_runner import PagedKVCache
from qwen3vl.model.checkpoint import load_tensors
from qwen3vl.model.config import ModelConfig
from qwen3vl.tools import sizing as sz


def test_sizing_equals_what_the_servers_allocate(checkpoint, capsys):
    s = sz.sizing(checkpoint, "float32")
    config = ModelConfig.load(checkpoint, device="cpu", dtype="float32")
    for prefixes, want in ((sz.LANGUAGE_PREFIXES, s.language_weight_bytes), (sz.VISION_PREFIXES, s.vision_weight_bytes)):
        tensors = load_tensors(checkpoint, prefixes, torch.float32, progress=lambda line: None)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == want
    assert s.kv_bytes_per_token * 16 == PagedKVCache.bytes_per_block(config.text, 16, torch.float32)

    from qwen3vl.encoder.encoder import VisionEncoder

    encoder = VisionEncoder(config, AutoProcessor.from_pretrained(checkpoint).image_processor)
    (features,) = encoder.encode([[png(96, 64, 7)]])
    n = features.visual_embeds.shape[0]
    assert features.visual_embeds.nbytes + features.deepstack_embeds.nbytes == s.e2l_bytes(n)

    capsys.readouterr()  # the tower's loading lines
    assert sz.main(["--checkpoint", str(checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_bytes_per_token"] == sz.sizing(checkpoint).kv_bytes_per_token
    assert sz.sizing(checkpoint).kv_bytes_per_token * 2 == s.kv_bytes_per_token  # bf16 is half of fp32
