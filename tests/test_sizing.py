"""qwen3vl-sizing's numbers (docs/operating.md, Sizing) against the real thing on the tiny
checkpoint: the weights a model loads, the KV pool's bytes per token, and the E->L tensors the
vision encoder makes per visual token."""

from __future__ import annotations

import json
import math

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


def test_sizing_counts_an_fp8_checkpoint_both_ways(tmp_path, capsys):
    """Dequantized (what loads today): every weight in the dtype, scales dropped, equal to what
    the loader returns; native: 1 byte per FP8 weight + 4 per scale + the rest in the dtype."""
    from qwen3vl.model.checkpoint import shard_header, weight_map
    from qwen3vl.tools.make_checkpoint import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "fp8", "tiny", fp8=True)
    s = sz.sizing(ckpt, "float32")
    tensors = load_tensors(ckpt, sz.LANGUAGE_PREFIXES, torch.float32, progress=lambda line: None)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == s.language_weight_bytes
    header = {}
    for shard in set(weight_map(ckpt).values()):
        header |= shard_header(ckpt / shard)
    native = fp8 = 0
    for name, info in header.items():
        if name.startswith(sz.LANGUAGE_PREFIXES):
            n = math.prod(info["shape"])
            native += {"F8_E4M3": 1, "F32": 4}[info["dtype"]] * n if info["dtype"] != "BF16" else 4 * n
            fp8 += n if info["dtype"] == "F8_E4M3" else 0
    assert (s.language_fp8_params, s.language_fp8_weight_bytes, s.vision_fp8_params) == (fp8, native, 0)
    assert 0 < fp8 < s.language_params and native < s.language_weight_bytes   # tiny: embeddings, lm_head dominate
    assert sz.sizing(make_checkpoint(tmp_path / "bf16", "tiny")).language_fp8_params == 0
    capsys.readouterr()
    assert sz.main(["--checkpoint", str(ckpt)]) == 0
    assert "kept FP8 (native: 1 byte a weight + fp32 scales)" in capsys.readouterr().out


def test_sizing_says_which_fp8_mode_it_assumes(tmp_path, capsys):
    """Native bytes are what a native model holds (fused experts: native runs them); a per-expert
    checkpoint with I = 48 cannot run natively, and sizing says so and why."""
    import dataclasses

    from qwen3vl.model.config import ModelConfig
    from qwen3vl.model.text import LanguageModel
    from qwen3vl.tools.make_checkpoint import make_checkpoint

    fused = make_checkpoint(tmp_path / "fused", "tiny", fp8=True, layout="transformers")
    s = sz.sizing(fused, "float32")
    config = dataclasses.replace(ModelConfig.load(fused, device="cpu"), fp8_mode="native")
    model = LanguageModel.from_checkpoint(config)
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == s.language_fp8_weight_bytes
    assert s.fp8_native_refused == ""
    capsys.readouterr()
    assert sz.main(["--checkpoint", str(fused)]) == 0
    out = capsys.readouterr().out
    assert "to the sizes above (fp8_mode dequantize)" in out and "what fp8_mode auto picks on a GPU" in out
    per_expert = sz.sizing(make_checkpoint(tmp_path / "per-expert", "tiny", fp8=True))
    assert per_expert.fp8_native_refused.startswith("model.language_model.layers.0.mlp.experts.0.gate_proj.weight: "
                                                    "per-expert FP8 experts need moe_intermediate_size (48)")
    assert sz.main(["--checkpoint", str(tmp_path / "per-expert")]) == 0
    assert "native cannot run this checkpoint (model.language_model.layers.0" in capsys.readouterr().out
    # 2 ranks with expert parallel: the experts go whole, but k_proj [64, 64] would split a scale block
    tp = sz.sizing(fused, "float32", 2, True)
    assert tp.fp8_native_refused.startswith("tensor_parallel_size 2: model.language_model.layers.0.self_attn.k_proj."
                                            "weight: FP8 weight [64, 64] cannot be split 2 ways"), tp.fp8_native_refused
    assert sz.main(["--checkpoint", str(fused), "--tensor-parallel-size", "2", "--enable-expert-parallel"]) == 0
    assert "kept FP8, native: refused here, each rank dequantizes)" in capsys.readouterr().out
