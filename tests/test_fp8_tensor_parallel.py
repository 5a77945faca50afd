"""fp8_mode native under tensor / expert parallel (model/fp8_linear.py, parallel/shard.py), on
the CPU with gloo, 2 ranks and Triton's interpreter:

- each rank keeps its share of the FP8 weights and their 128x128 block scales as stored, and
  they are the one-process native model's slices (column-parallel rows, row-parallel columns,
  a fused expert tensor's gate and up halves each, whole experts under expert parallel): the
  rank's FP8 bytes and scale bytes are exactly half;
- the parallel engine (rank 1 spawned) gives the one-process native engine's greedy tokens on
  mixed requests (text, one and two images, chunks cutting through images), its logits within
  LOGITS_ATOL, with the experts split by intermediate size (hub-fused experts) and with expert
  parallel (the release's per-expert layout).
- a real tritonserver at `--tensor-parallel-size 2 --kernels triton --fp8-mode native` gives
  the one-process native model's greedy tokens, both ranks keeping their FP8 shares.

The checkpoint is the tiny-fp8tp preset block-quantized: every split dim is 2 x 128 (q, k, v:
256 rows, o_proj 256 columns, experts' I = 256), so each rank's share is whole scale blocks.
The refusal of a split that would cut a block is tested in tests/test_fp8_native.py.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from conftest import IMAGE_CASES, LOG_DIR
from qwen3vl.client import infer
from qwen3vl.encoder.encoder import VisionEncoder
from qwen3vl.engine.engine import Engine
from qwen3vl.kernels.fp8_reference import FP8_DTYPE
from qwen3vl.launch.server import Server
from qwen3vl.model.config import ModelConfig
from qwen3vl.model.text import LanguageModel
from qwen3vl.parallel.engine import parallel_engine
from qwen3vl.parallel.shard import Shard
from qwen3vl.settings import ServingConfig
from qwen3vl.tools.make_checkpoint import make_checkpoint
from test_tensor_parallel import mixed_requests, run_capturing

# fp32 logits of 2 ranks against one process, both native W8A8: the all-reduces sum in another
# order (measured max |diff| 7e-7 split by intermediate size, 0 with expert parallel, on logits
# up to ~4). Each rank's activation groups of 128 are the one-process groups (the splits fall on
# them), so no activation is quantized differently; a last-ulp change of a hidden state could
# still move one fp8 rounding by a whole e4m3 step, which this bound would catch.
LOGITS_ATOL = 2e-5
PROMPT = "Write a haiku about rain."
CASES = [("hub", False), ("per-expert", True)]     # (expert layout, expert parallel)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8tp")
    return {layout: make_checkpoint(root / layout, "tiny-fp8tp", seed=0, fp8=True, layout=layout)
            for layout in ("hub", "per-expert")}


def native(ckpt) -> ModelConfig:
    return ModelConfig.load(ckpt, device="cpu", kernels="triton", fp8_mode="native")


def halve(t: torch.Tensor, dim: int, rank: int, pieces: int = 1) -> torch.Tensor:
    """Rank `rank`'s half of each of `pieces` equal parts of t along dim, concatenated."""
    return torch.cat([p.chunk(2, dim)[rank] for p in t.chunk(pieces, dim)], dim)


def expected_share(name: str, t: torch.Tensor, rank: int, ep: bool) -> torch.Tensor:
    """The one-process native model's tensor `name` (an FP8 weight or its scales) cut as rank
    `rank` of 2 holds it: the scales along the same dims as their weight."""
    if "experts.w13" in name:
        return halve(t, 0, rank) if ep else halve(t, -2, rank, pieces=2)   # gate rows, then up rows
    if "experts.w2" in name:
        return halve(t, 0, rank) if ep else halve(t, -1, rank)
    if "o_proj" in name:
        return halve(t, -1, rank)
    return halve(t, -2, rank)                                               # q, k, v rows


def fp8_tensors(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The FP8 weights and their scales of `model`'s native modules."""
    sd = model.state_dict()
    weights = {k: v for k, v in sd.items() if v.dtype == FP8_DTYPE}
    return {**weights, **{k + "_scale_inv": sd[k + "_scale_inv"] for k in weights}}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("layout,ep", CASES, ids=["tp-hub", "ep-per-expert"])
def test_each_rank_keeps_its_share_of_the_fp8_weights_and_scales(ckpts, layout, ep, capsys):
    config = native(ckpts[layout])
    full = fp8_tensors(LanguageModel.from_checkpoint(config))
    assert len(full) == 2 * 6 * config.text.num_hidden_layers    # q k v o w13 w2, weight + scales
    for rank in range(2):
        capsys.readouterr()
        part = fp8_tensors(LanguageModel.from_checkpoint(config, Shard(rank, 2, ep)))
        log = capsys.readouterr().out
        assert "FP8 tensors kept FP8 with their scales (native)" in log and "dequantized" not in log, log
        assert part.keys() == full.keys()
        for name, t in part.items():
            want = expected_share(name, full[name], rank, ep)
            assert t.dtype == full[name].dtype and t.shape == want.shape, name
            assert torch.equal(t.view(torch.uint8) if t.dtype == FP8_DTYPE else t,
                               want.view(torch.uint8) if want.dtype == FP8_DTYPE else want), name
        weights = [t for n, t in part.items() if t.dtype == FP8_DTYPE]
        scales = [t for n, t in part.items() if t.dtype != FP8_DTYPE]
        assert 2 * nbytes(weights) == nbytes(t for t in full.values() if t.dtype == FP8_DTYPE)
        assert 2 * nbytes(scales) == nbytes(t for t in full.values() if t.dtype != FP8_DTYPE)


@pytest.mark.parametrize("layout,ep,kernels", [("hub", False, "triton"), ("per-expert", True, "torch")],
                         ids=["tp-hub-interpreter", "ep-per-expert-emulation"])
def test_two_native_fp8_ranks_give_one_process_tokens_and_logits(ckpts, layout, ep, kernels):
    """kernels triton: every op in Triton's interpreter (slow: three requests); torch: the same
    model with the torch emulation of the W8A8 kernels (kernels/fp8_reference.py) and torch ops,
    all four requests (one sampled)."""
    from transformers import AutoProcessor

    config = native(ckpts[layout])
    if kernels == "torch":   # not a served combination (native needs the Triton kernels): the oracle's ops
        config = dataclasses.replace(config, kernels="torch")
    encoder = VisionEncoder(config, AutoProcessor.from_pretrained(ckpts[layout]).image_processor)
    requests = mixed_requests(encoder)[:3 if kernels == "triton" else 4]
    settings = dict(kv_cache_mb=16, enable_prefix_caching=False, max_num_batched_tokens=24)  # chunks cut images
    one_tokens, one_logits = run_capturing(Engine.from_checkpoint(config, ServingConfig(**settings)), requests)
    engine, group = parallel_engine(config, ServingConfig(**settings, tensor_parallel_size=2,
                                                          enable_expert_parallel=ep))
    try:
        assert sum(isinstance(m, torch.nn.Module) and type(m).__name__ == "Fp8Linear"
                   for m in engine.model.modules()) == 4 * config.text.num_hidden_layers
        tp_tokens, tp_logits = run_capturing(engine, requests)
    finally:
        group.stop()
    worst = max((a - b).abs().max().item() for a, b in zip(tp_logits, one_logits) if a.numel())
    scale = max(b.abs().max().item() for b in one_logits if b.numel())
    print(f"\nnative FP8 {'EP' if ep else 'TP'} 2 ranks ({layout} experts, kernels {kernels}): max |logits diff| {worst:.2e} "
          f"(logits up to {scale:.2f}); tokens {tp_tokens}")
    assert tp_tokens == one_tokens
    assert len(tp_logits) == len(one_logits)
    assert worst <= LOGITS_ATOL, worst
    assert not any(p.is_alive() for p in group.procs)


def test_a_served_native_fp8_tp2_server_gives_the_one_process_tokens(ckpts):
    """A real tritonserver with `--tensor-parallel-size 2 --kernels triton --fp8-mode native`
    (every op in Triton under the interpreter, on both ranks): the one-process native model's
    greedy tokens (the torch emulation of the same W8A8 kernels: equal tokens in-process above)
    for a text-only request; both ranks kept their FP8 shares native."""
    from transformers import AutoProcessor

    ckpt = ckpts["hub"]
    config = dataclasses.replace(native(ckpt), kernels="torch")
    encoder = VisionEncoder(config, AutoProcessor.from_pretrained(ckpt).image_processor)
    engine = Engine.from_checkpoint(config)
    steps = engine.generate(PROMPT, encoder.encode([IMAGE_CASES["text-only"]])[0],
                            engine.params(max_tokens=3, temperature=0.0))
    want = [t for step in steps for t in step.token_ids]
    log = LOG_DIR / "fp8-native-tp2.log"
    with Server(ckpt, log, models=("ensemble", "qwen3_encoder", "qwen3_language"),
                extra=["--device", "cpu", "--tensor-parallel-size", "2", "--kernels", "triton",
                       "--fp8-mode", "native", "--kv-cache-mb", "16"],
                env={"TRITON_INTERPRET": "1"}) as server:
        answer = infer(server.http_url, "http", prompt=PROMPT, images=IMAGE_CASES["text-only"], max_tokens=3,
                       temperature=0.0)
        assert answer.token_ids == want
        assert server.alive()
    text = log.read_text()
    for rank in range(2):
        assert re.search(rf"language model rank {rank}/2: loaded .* 12 FP8 tensors kept FP8 with their scales "
                         r"\(native\); this rank's shares", text), text[-3000:]
    assert "dequantiz" not in text
