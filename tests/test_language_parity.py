"""Our decoder against transformers: prefill logits within 1e-4, prompts token for token,
and both expert layouts give identical outputs."""

from __future__ import annotations

import pytest
import torch

from conftest import IMAGE_CASES, reference_inputs
from qwen3vl.model.config import ModelConfig
from qwen3vl.model.reference import prefill_logits
from qwen3vl.engine.engine import Engine
from qwen3vl.tools.make_checkpoint import make_checkpoint
from qwen3vl.encoder.encoder import VisionEncoder

CASES = IMAGE_CASES
PROMPT = "What is in the picture? Answer in one sentence."


@pytest.fixture(scope="module")
def served(checkpoint, reference):
    config = ModelConfig.load(checkpoint, device="cpu")
    return Engine.from_checkpoint(config), VisionEncoder(config, reference[1].image_processor)


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_match_transformers(served, reference, case):
    engine, encoder = served
    model, processor = reference
    images = CASES[case]
    inputs = reference_inputs(processor, PROMPT, images)
    with torch.no_grad():
        ref = model(**inputs).logits[0]
    features = encoder.encode([images])[0]
    prompt = engine.prepare(PROMPT, features)
    assert torch.equal(prompt.input_ids, inputs["input_ids"][0])
    assert prompt.num_visual_tokens == (int(inputs["image_grid_thw"].prod(-1).sum()) // 4 if images else 0)
    got = prefill_logits(engine, PROMPT, features)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert ref.std() > 0.1  # logits that carry information, not a flat vacuous match


def test_hub_and_transformers_layouts_give_identical_outputs(tmp_path, reference):
    processor = reference[1]
    outputs = []
    for layout in ("hub", "transformers"):
        config = ModelConfig.load(make_checkpoint(tmp_path / layout, "tiny", seed=0, layout=layout), device="cpu")
        engine, encoder = Engine.from_checkpoint(config), VisionEncoder(config, processor.image_processor)
        features = encoder.encode([CASES["one-image"]])[0]
        logits = prefill_logits(engine, PROMPT, features)
        tokens = [t for step in engine.generate(PROMPT, features, engine.params(max_tokens=6, temperature=0.0))
                  for t in step.token_ids]
        outputs.append((features, logits, tokens))
    (f1, l1, t1), (f2, l2, t2) = outputs
    assert torch.equal(f1.visual_embeds, f2.visual_embeds) and torch.equal(f1.deepstack_embeds, f2.deepstack_embeds)
    assert torch.equal(l1, l2)
    assert t1 == t2


def test_transposed_experts_are_rejected(tmp_path):
    """A checkpoint whose expert tensor fits neither layout fails loudly, naming the tensor."""
    import json

    from safetensors.torch import load_file, save_file

    ckpt = make_checkpoint(tmp_path / "bad", "tiny", seed=0)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "model.language_model.layers.0.mlp.experts.down_proj"
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].contiguous()  # [E, I-1, H]: no layout has this shape
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="down_proj.*fits neither"):
        Engine.from_checkpoint(ModelConfig.load(ckpt, device="cpu"))


def test_grouped_matmul_fast_and_loop_paths_agree():
    """torch's grouped GEMM and the per-expert loop compute the same function, empty groups too."""
    from qwen3vl.kernels.reference import grouped_mm

    x, w = torch.randn(11, 64), torch.randn(5, 64, 96)
    offsets = torch.tensor([3, 3, 7, 11, 11], dtype=torch.int32)  # experts 1 and 4 get no rows
    want = torch.cat([x[0:3] @ w[0], x[3:7] @ w[2], x[7:11] @ w[3]])
    torch.testing.assert_close(grouped_mm(x, w, offsets, fast=False), want)
    torch.testing.assert_close(grouped_mm(x, w, offsets, fast=True), want)
