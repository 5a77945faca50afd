"""fp8_mode native: Qwen's FP8 weights kept FP8 in the served model (model/fp8_linear.py) and run
by the block-FP8 Triton kernels (W8A8), checked on the CPU under Triton's interpreter.

The checkpoint is the tiny preset block-quantized with its experts fused ([E, 2I, H], the
`transformers` layout: the tiny I = 48 is not a multiple of 128, so the release's per-expert
layout cannot stack gate and up natively and is refused; that refusal is tested too). The oracle
is the torch emulation of W8A8 block FP8 (kernels/fp8_reference.py: the same fp8 weights and
scales, activations quantized per token group by torch) in the same model. The emulation gets
the kernel path's own SiLU * up: an activation quantized to fp8 moves a whole e4m3 step when a
last-ulp difference upstream crosses a rounding boundary, so only the FP8 GEMMs may differ
between the two for a 1e-5 bound to mean anything. The same model's other ops run in torch
in-process (the interpreter is slow); the served test runs every op in Triton
(`--kernels triton --fp8-mode native`) and must give the oracle's greedy tokens.

What W8A8 costs against W8A16 (the dequantized path, same fp8 weights) is printed, not bounded.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch

from conftest import IMAGE_CASES, LOG_DIR
from qwen3vl.client import infer
from qwen3vl.encoder.encoder import VisionEncoder
from qwen3vl.engine.engine import Engine
from qwen3vl.errors import InvalidInput
from qwen3vl.kernels import kernel_ops
from qwen3vl.kernels.fp8_reference import FP8_DTYPE, dequantize_block_fp8, fused_moe_fp8_torch, quantize_block_fp8
from qwen3vl.launch.server import Server
from qwen3vl.model.config import ModelConfig
from qwen3vl.model.fp8 import resolve_fp8_mode
from qwen3vl.model.checkpoint import load_tensors
from qwen3vl.model.fp8_linear import (Fp8Experts, Fp8Linear, check_native_fp8, fp8_shard_check, native_fp8_here,
                                      runs_natively, stack_experts)
from qwen3vl.model.reference import prefill_logits
from qwen3vl.model.text import LanguageModel
from qwen3vl.parallel.shard import Shard
from qwen3vl.tools.make_checkpoint import make_checkpoint

PROMPT = "What is in the picture? Answer in one sentence."
CASES = {"text-only": IMAGE_CASES["text-only"], "one-image": IMAGE_CASES["one-image"]}
MAX_NEW = 4              # each decode step runs the kernels under the interpreter


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8native")
    return {"fused": make_checkpoint(root / "fused", "tiny", seed=0, fp8=True, layout="transformers"),
            "per-expert": make_checkpoint(root / "per-expert", "tiny", seed=0, fp8=True)}


def native_engine(ckpt, fp8_ops: str) -> Engine:
    """An engine on `ckpt` with fp8_mode native, its other ops in torch, its FP8 modules running
    `fp8_ops`: "triton" (the kernels the server runs) or "emulation" (fp8_reference in torch,
    with the Triton path's SiLU * up inside the MoE; see the module docstring)."""
    config = dataclasses.replace(ModelConfig.load(ckpt, device="cpu"), fp8_mode="native")
    engine = Engine.from_checkpoint(config)
    triton = kernel_ops("triton")
    for module in engine.model.modules():
        if isinstance(module, Fp8Linear):
            module.linear = triton.w8a8_block_fp8_linear if fp8_ops == "triton" else module.linear
        elif isinstance(module, Fp8Experts):
            module.fused_moe_fp8 = (triton.fused_moe_fp8 if fp8_ops == "triton"
                                    else functools.partial(fused_moe_fp8_torch, silu_mul=triton.silu_mul))
    return engine


@pytest.fixture(scope="module")
def engines(ckpts):
    from transformers import AutoProcessor

    ckpt = ckpts["fused"]
    encoder = VisionEncoder(ModelConfig.load(ckpt, device="cpu"), AutoProcessor.from_pretrained(ckpt).image_processor)
    return {"native": native_engine(ckpt, "triton"), "emulation": native_engine(ckpt, "emulation"),
            "dequantized": Engine.from_checkpoint(ModelConfig.load(ckpt, device="cpu")), "encoder": encoder}


def greedy(engine, features, prompt=PROMPT, max_tokens=MAX_NEW) -> list[int]:
    steps = engine.generate(prompt, features, engine.params(max_tokens=max_tokens, temperature=0.0))
    return [t for step in steps for t in step.token_ids]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.fixture(scope="module")
def expected(engines):
    """The oracle's greedy tokens (the torch emulation of W8A8)."""
    return {case: greedy(engines["emulation"], engines["encoder"].encode([images])[0]) for case, images in CASES.items()}


# --- the mode and what can run natively ------------------------------------------------------

def test_resolve_fp8_mode_native_rule():
    """native: kernels=triton and a CUDA GPU of compute capability 8.9+, or the CPU (where
    kernels=triton means the interpreter); auto never picks the interpreter."""
    assert resolve_fp8_mode("auto", "cuda:0", (9, 0)) == "native"              # kernels default: triton on CUDA
    assert resolve_fp8_mode("auto", "cuda:0", (8, 9), kernels="triton") == "native"
    assert resolve_fp8_mode("native", "cuda:0", (9, 0), kernels="triton") == "native"
    assert resolve_fp8_mode("auto", "cuda:0", (8, 0)) == "dequantize"
    assert resolve_fp8_mode("auto", "cuda:0", (9, 0), kernels="torch") == "dequantize"
    assert resolve_fp8_mode("native", "cpu", kernels="triton") == "native"
    assert resolve_fp8_mode("auto", "cpu", kernels="triton") == "dequantize"
    with pytest.raises(InvalidInput, match="the kernels are torch, and native FP8 runs the Triton block-FP8 kernels"):
        resolve_fp8_mode("native", "cuda:0", (9, 0), kernels="torch")
    with pytest.raises(InvalidInput, match="the kernels are torch.*TRITON_INTERPRET=1"):
        resolve_fp8_mode("native", "cpu")
    with pytest.raises(InvalidInput, match="compute capability 8.0, and FP8 tensor cores need 8.9"):
        resolve_fp8_mode("native", "cuda:0", (8, 0), kernels="triton")
    with pytest.raises(InvalidInput, match="the device is mps"):
        resolve_fp8_mode("native", "mps")


def test_native_loads_on_the_interpreter_and_per_expert_with_a_ragged_i_is_refused(ckpts):
    fused = ModelConfig.load(ckpts["fused"], device="cpu", kernels="triton", fp8_mode="native")
    assert fused.fp8_mode == "native" and fused.kernels == "triton"
    assert ModelConfig.load(ckpts["fused"], device="cpu", kernels="triton").fp8_mode == "dequantize"   # auto
    with pytest.raises(ValueError, match=r"fp8_mode=native cannot run .*layers.0.mlp.experts.0.gate_proj.weight: "
                                         r"per-expert FP8 experts need moe_intermediate_size \(48\) to be a multiple"):
        ModelConfig.load(ckpts["per-expert"], device="cpu", kernels="triton", fp8_mode="native")
    lines = []
    assert check_native_fp8(ckpts["per-expert"], "native", "auto", 8, 48, lines.append) == "dequantize"
    assert len(lines) == 1 and lines[0].startswith("fp8_mode auto: dequantizing at load, not native: ")
    assert "moe_intermediate_size (48)" in lines[0]
    assert check_native_fp8(ckpts["fused"], "native", "auto", 8, 48, lines.append) == "native"
    assert check_native_fp8(ckpts["per-expert"], "dequantize", "auto", 8, 48, lines.append) == "dequantize"


def test_per_expert_experts_stack_into_the_fused_moe_layout():
    """The release's per-expert weights (I a multiple of 128) stack into w13 [E, 2I, H] with their
    scale grids concatenated, exactly; fused hub [E, H, 2I] weights transpose with their scales."""
    e, h, i = 2, 64, 128
    g = torch.Generator().manual_seed(0)
    tensors, raw = {}, {}
    for x in range(e):
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            name = f"layers.0.mlp.experts.{x}.{proj}.weight"
            raw[x, proj] = quantize_block_fp8(torch.randn(shape, generator=g))
            tensors[name], tensors[name + "_scale_inv"] = raw[x, proj]
    w13, s13, w2, s2 = stack_experts(dict(tensors), "layers.0.mlp.experts", e, h, i)
    assert w13.dtype == FP8_DTYPE and tuple(w13.shape) == (e, 2 * i, h) and tuple(s13.shape) == (e, 2, 1)
    for x in range(e):
        want = torch.cat((dequantize_block_fp8(*raw[x, "gate_proj"]), dequantize_block_fp8(*raw[x, "up_proj"])))
        assert torch.equal(dequantize_block_fp8(w13[x], s13[x]), want)
        assert torch.equal(dequantize_block_fp8(w2[x], s2[x]), dequantize_block_fp8(*raw[x, "down_proj"]))
    hub_q, hub_s = quantize_block_fp8(torch.randn(e, h, 2 * i, generator=g))
    down_q, down_s = quantize_block_fp8(torch.randn(e, i, h, generator=g))
    fused = {"l.experts.gate_up_proj": hub_q, "l.experts.gate_up_proj_scale_inv": hub_s,
             "l.experts.down_proj": down_q, "l.experts.down_proj_scale_inv": down_s}
    w13, s13, w2, s2 = stack_experts(fused, "l.experts", e, h, i)
    assert w13.is_contiguous() and tuple(w13.shape) == (e, 2 * i, h) and not fused
    assert torch.equal(dequantize_block_fp8(w13, s13), dequantize_block_fp8(hub_q, hub_s).transpose(1, 2))
    assert torch.equal(dequantize_block_fp8(w2, s2), dequantize_block_fp8(down_q, down_s).transpose(1, 2))
    del tensors["layers.0.mlp.experts.1.up_proj.weight"]
    with pytest.raises(ValueError, match=r"experts.1.up_proj.weight: missing"):
        stack_experts(tensors, "layers.0.mlp.experts", e, h, i)


def test_fp8_shard_check_refuses_a_shard_that_splits_a_scale_block():
    assert fp8_shard_check("q_proj.weight", (4096, 2048), -2, 4) == 1024        # 30B q_proj, column parallel
    assert fp8_shard_check("o_proj.weight", (2048, 4096), -1, 8) == 512         # row parallel
    assert fp8_shard_check("w13", (128, 1536, 2048), 1, 2) == 768               # 235B-style I/TP
    assert fp8_shard_check("k_proj.weight", (512, 2048), 0, 1) == 512
    with pytest.raises(ValueError, match=r"k_proj.weight: FP8 weight \[512, 2048\] cannot be split 8 ways along "
                                         r"dim -2: each shard would hold 64 of its 512.*128-wide scale blocks"):
        fp8_shard_check("k_proj.weight", (512, 2048), -2, 8)                    # 30B k_proj at TP8
    with pytest.raises(ValueError, match=r"w2: FP8 weight \[128, 2048, 768\] cannot be split 4 ways along dim -1: "
                                         r"each shard would hold 192"):
        fp8_shard_check("w2", (128, 2048, 768), -1, 4)                          # 30B experts' I at TP4
    with pytest.raises(ValueError, match="would hold 85.3333"):
        fp8_shard_check("x", (256, 256), -1, 3)
    with pytest.raises(ValueError, match="dim 0 of \\[8, 256, 256\\] is not one of the two block-scaled dims"):
        fp8_shard_check("experts", (8, 256, 256), 0, 2)


# --- the engine and the server against the emulation -----------------------------------------

def test_native_keeps_the_fp8_weights_as_loaded(engines):
    """No dequantized copy: every FP8 module holds float8_e4m3fn weights and fp32 scales whose
    product is the dequantized engine's weight, tile for tile; the rest is the same tensor."""
    native, dequantized = engines["native"].model, engines["dequantized"].model.state_dict()
    linears = [m for m in native.modules() if isinstance(m, Fp8Linear)]
    experts = [m for m in native.modules() if isinstance(m, Fp8Experts)]
    assert len(linears) == 4 * 4 and len(experts) == 4
    for name, t in native.state_dict().items():
        if name.endswith("_scale_inv"):
            assert t.dtype == torch.float32, name
        elif name.endswith((".weight", "w13_weight", "w2_weight")) and ("_proj." in name or "experts." in name):
            assert t.dtype == FP8_DTYPE, name
            scale = native.state_dict()[name + "_scale_inv"]
            if "experts." in name:
                hub = name.replace("w13_weight", "gate_up_proj").replace("w2_weight", "down_proj")
                assert torch.equal(dequantize_block_fp8(t, scale).transpose(1, 2), dequantized[hub]), name
            else:
                assert torch.equal(dequantize_block_fp8(t, scale), dequantized[name]), name
        else:
            assert t.dtype == torch.float32 and torch.equal(t, dequantized[name]), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_native_engine_equals_the_w8a8_emulation(engines, expected, case):
    """Prefill logits within 1e-5 (fp32, relative to the largest) of the torch emulation of W8A8
    on the same fp8 weights, and the same greedy tokens."""
    features = engines["encoder"].encode([CASES[case]])[0]
    got = prefill_logits(engines["native"], PROMPT, features)
    want = prefill_logits(engines["emulation"], PROMPT, features)
    assert got.shape == want.shape and want.std() > 0.1
    error = relative_error(got, want)
    print(f"native vs emulation, {case}: {error:.2e}")
    assert error <= 1e-5
    assert greedy(engines["native"], features) == expected[case]


def test_the_w8a8_gap_to_w8a16_is_measured(engines, capsys):
    """W8A8 (native: the emulation, equal to the kernels as above) against W8A16 (the same fp8
    weights dequantized, activations unrounded): the activations' fp8 rounding alone. Printed,
    not bounded: these random weights amplify any change layer by layer."""
    w8a8, w8a16, encoder = engines["emulation"], engines["dequantized"], engines["encoder"]
    prompts = [(PROMPT, CASES["text-only"]), (PROMPT, CASES["one-image"]), ("Tell me a story about a lighthouse.", [])]
    lines = []
    for text, images in prompts:
        features = encoder.encode([images])[0]
        got, ref = prefill_logits(w8a8, text, features), prefill_logits(w8a16, text, features)
        assert not torch.equal(got, ref)                       # the activations are rounded
        a, b = greedy(w8a8, features, text, 12), greedy(w8a16, features, text, 12)
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        lines.append(f"W8A8 vs W8A16 (tiny, random, fused FP8 experts), {len(images)} images: max logit error "
                     f"{relative_error(got, ref):.3f} of the largest logit, last position "
                     f"{relative_error(got[-1], ref[-1]):.3f}, top-1 agrees at {top1:.0%} of prompt positions, greedy "
                     f"tokens agree for {agree} of {len(b)}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_a_served_native_fp8_checkpoint_gives_the_emulations_greedy_tokens(ckpts, expected):
    """A real tritonserver with `--kernels triton --fp8-mode native` (every op in Triton, under the
    interpreter): the oracle's greedy tokens for an image request (the text-only path is the same
    language model, checked in-process above; the interpreter makes each served token slow)."""
    with Server(ckpts["fused"], LOG_DIR / "fp8-native.log", models=("ensemble", "qwen3_encoder", "qwen3_language"),
                extra=["--device", "cpu", "--kernels", "triton", "--fp8-mode", "native"],
                env={"TRITON_INTERPRET": "1"}) as server:
        # one image request (the encoder and the language model both serve it); two tokens: a
        # prefill and a decode step, each running every kernel under the interpreter
        answer = infer(server.http_url, "http", prompt=PROMPT, images=CASES["one-image"], max_tokens=2,
                       temperature=0.0)
        assert answer.token_ids == expected["one-image"][:2]
        assert server.alive()
    log = (LOG_DIR / "fp8-native.log").read_text()
    assert "24 FP8 tensors kept FP8 with their scales (native)" in log


def test_native_under_tensor_parallel_refuses_a_share_that_splits_a_scale_block(ckpts, capsys):
    """The tiny preset's k_proj [64, 64] split 2 ways would give each rank 32 rows of one 128-row
    scale block (its experts go whole with expert parallel): native asked for is refused naming
    the tensor and the sizes, auto dequantizes each rank's share and says why; the loader itself
    refuses to keep such a share FP8. The wired case: tests/test_fp8_tensor_parallel.py."""
    config = ModelConfig.load(ckpts["fused"], device="cpu", kernels="triton", fp8_mode="native")
    shard = Shard(0, 2, expert_parallel=True)
    assert native_fp8_here(config, Shard())
    why = (r"tensor_parallel_size 2 with expert parallel: model.language_model.layers.0.self_attn.k_proj.weight: "
           r"FP8 weight \[64, 64\] cannot be split 2 ways along dim -2: each shard would hold 32 of its 64, which is "
           r"not a whole number of 128-wide scale blocks")
    with pytest.raises(InvalidInput, match="fp8_mode=native cannot run under " + why):
        native_fp8_here(config, shard)
    with pytest.raises(InvalidInput, match=why):
        LanguageModel.from_checkpoint(config, shard)
    lines = []
    auto = dataclasses.replace(config, fp8_setting="auto")
    assert not native_fp8_here(auto, shard, lines.append)
    assert len(lines) == 1 and re.match("fp8_mode auto: dequantizing at load, not native: " + why, lines[0]), lines
    capsys.readouterr()
    model = LanguageModel.from_checkpoint(auto, shard)
    assert "fp8_mode auto: dequantizing at load, not native: tensor_parallel_size 2" in capsys.readouterr().out
    assert not any(isinstance(m, (Fp8Linear, Fp8Experts)) for m in model.modules())
    assert model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    assert not native_fp8_here(ModelConfig.load(ckpts["fused"], device="cpu"), shard)       # dequantize

    def select(name, shape):
        return shard.reads(name.removeprefix("model.language_model."), shape, config.text)

    with pytest.raises(ValueError, match=r"layers.0.self_attn.k_proj.weight: this rank's share .* splits a "
                                         "128x128 scale block; it cannot be kept FP8"):
        load_tensors(ckpts["fused"], ("model.language_model.",), torch.float32, select=select,
                     keep_fp8=runs_natively)
