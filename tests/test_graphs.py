"""The static-buffer decode step (engine/graph_runner.py: what CUDA graphs replay on a GPU), run on
the CPU without capture: it gives the eager step's tokens over a mixed workload (batch sizes
that pad, sequences finishing and others joining, an image prompt, seeded sampling), on the
torch kernels and on the Triton kernels under the interpreter; the step reads nothing back to
the host; and `bench/gpu_check.py --smoke` runs the GPU check's code paths end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import IMAGE_CASES
from qwen3vl.encoder.encoder import VisionEncoder
from qwen3vl.engine.engine import Engine, gpu_kv_budget
from qwen3vl.errors import InvalidInput
from qwen3vl.engine.graph_runner import DecodeGraphRunner, capture_sizes, graphs_wanted
from qwen3vl.features import VisualFeatures
from qwen3vl.model.config import ModelConfig
from qwen3vl.settings import ServingConfig

ROOT = Path(__file__).resolve().parents[1]


def engine_for(config, static: bool, **settings) -> Engine:
    """An engine on the CPU; static: pure-decode steps through the static-buffer path, uncaptured."""
    settings = ServingConfig(**{"kv_cache_mb": 16, "max_model_len": 512, **settings})
    engine = Engine.from_checkpoint(config, settings)
    assert engine.runner.decode is None  # never on a CPU by default
    for pool in engine.kv.k + engine.kv.v:  # what an unwritten slot may hold: nothing may read it
        pool.fill_(float("nan"))
    if static:
        engine.runner.decode = DecodeGraphRunner(engine.runner, settings.max_num_seqs, engine.max_model_len,
                                                 capture=False)
    return engine


def drive(engine: Engine, requests: list[tuple[str, object, dict, int]]) -> tuple[list[list[int]], list[int]]:
    """Each request (text, features, params, the step it arrives at) run to its end; returns the
    token ids of each and, for every step, how many sequences it decoded through the static path."""
    decode = engine.runner.decode
    static_sizes: list[int] = []
    if decode is not None:
        execute = decode.execute
        decode.execute = lambda batch: static_sizes.append(len(batch)) or execute(batch)
    seqs: dict[int, object] = {}
    tokens: list[list[int]] = [[] for _ in requests]
    step = 0
    while step == 0 or engine.has_work() or len(seqs) < len(requests):
        for i, (text, features, params, arrival) in enumerate(requests):
            if arrival == step:
                seqs[i] = engine.new_sequence(text, features, engine.params(**params))
                engine.add(seqs[i])
        out = engine.step()
        assert not out.failures, out.failures
        for i, seq in seqs.items():
            if seq.request_id in out.steps:
                tokens[i] += out.steps[seq.request_id].token_ids
        step += 1
        assert step < 2_000
    return tokens, static_sizes


@pytest.fixture(scope="module")
def encoder(checkpoint, reference):
    return VisionEncoder(ModelConfig.load(checkpoint, device="cpu"), reference[1].image_processor)


def workload(encoder) -> list[tuple[str, object, dict, int]]:
    """Seven requests: three at once, then one joining every few steps while others finish
    (decode batches of 1 to 5: 3 and 5 pad to 4 and 8); text and an image prompt (its decode
    positions carry the MRoPE delta), greedy and seeded sampling."""
    empty = encoder.encode([[]])[0]
    image = encoder.encode([IMAGE_CASES["one-image"]])[0]
    greedy, sampled = dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=5)
    return [
        ("Write a haiku about rain.", empty, dict(max_tokens=14, **greedy), 0),
        ("Describe <image>.", image, dict(max_tokens=9, **greedy), 0),
        ("Tell me a story.", empty, dict(max_tokens=20, **sampled), 0),
        ("Count to ten.", empty, dict(max_tokens=6, **greedy), 3),
        ("What is in <image>?", image, dict(max_tokens=11, temperature=1.0, top_k=20, seed=9), 5),
        ("Short.", empty, dict(max_tokens=1, **greedy), 6),
        ("Name three colours.", empty, dict(max_tokens=12, **greedy), 9),
    ]


def test_capture_sizes_and_when_graphs_are_wanted():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 32]
    assert capture_sizes(1000)[-2:] == [496, 512]  # larger decode batches run eagerly
    assert graphs_wanted("cuda", "triton", False) and graphs_wanted("cuda:1", "triton", False)
    assert not graphs_wanted("cuda", "triton", True)   # --enforce-eager
    assert not graphs_wanted("cuda", "torch", False)   # the torch MoE reads offsets on the host (below)
    assert not graphs_wanted("cpu", "triton", False)


def test_the_kv_pool_on_a_gpu_is_vllms_share_of_the_card():
    gib = 1 << 30
    # alone on an 80 GiB card, 60 GiB of weights: 0.9 of the card less the weights and the 2 GiB reserve
    assert gpu_kv_budget(80 * gib, 19 * gib, 60 * gib, 0.9) == 72 * gib - 60 * gib - 2 * gib
    # another process holds 30 GiB of a 141 GiB card: it does not count against this model's share,
    # but the pool never takes more than is free
    assert gpu_kv_budget(141 * gib, 50 * gib, 60 * gib, 0.9) == 48 * gib
    with pytest.raises(InvalidInput, match="no GPU memory left for the KV cache: the model holds 60.0 GiB"):
        gpu_kv_budget(80 * gib, 19 * gib, 60 * gib, 0.7)


def test_static_decode_step_gives_the_eager_steps_tokens(checkpoint, encoder):
    config = ModelConfig.load(checkpoint, device="cpu")
    requests = workload(encoder)
    eager, none = drive(engine_for(config, static=False, max_num_seqs=8), requests)
    assert none == []
    static_engine = engine_for(config, static=True, max_num_seqs=8)
    static, sizes = drive(static_engine, requests)
    assert static == eager
    assert [len(t) for t in static] == [p["max_tokens"] for _, _, p, _ in requests]
    decode = static_engine.runner.decode
    assert {3, 5} <= set(sizes) and {decode.padded(n) for n in sizes} >= {4, 8}  # padded batches ran
    assert static_engine.blocks.num_used == 0


def test_static_decode_step_on_the_triton_kernels_reads_nothing_on_the_host(checkpoint):
    """kernels=triton (the path graphs capture), under the interpreter: a decode batch of three
    (padded to four) through the static path gives the eager step's logits, and nothing in it
    reads a tensor back to the host (.item, .tolist, bool(), nonzero, boolean masks...: a host
    sync on a GPU, which capture forbids). Triton's interpreter's own copies are not counted."""
    config = ModelConfig.load(checkpoint, device="cpu", kernels="triton")
    engine = engine_for(config, static=False, max_num_seqs=4, max_num_batched_tokens=256)
    empty = VisualFeatures.empty(config)  # the image prompts' decode positions: the test above
    for text in ("Hello there.", "Tell me something.", "A long story."):
        engine.add(engine.new_sequence(text, empty, engine.params(max_tokens=8, temperature=0.0)))
    engine.step()  # every prompt prefilled (one step), one token each
    batch = engine.scheduler.schedule()
    assert len(batch) == 3 and all(s.num_tokens == 1 for s in batch)
    eager = engine.runner.execute(batch)
    decode = DecodeGraphRunner(engine.runner, 4, engine.max_model_len, capture=False)
    with HostReads(ignore=decode.host_buffers()) as reads:
        size = decode.run_padded(batch)
        with torch.inference_mode():
            whole = decode.forward(size)  # the block table at its full width, as captured
    assert size == 4 and reads.found == []
    with torch.inference_mode():
        static = engine.model.lm_head(decode.hidden[:3]).float()
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-5)
    assert torch.equal(static.argmax(-1), eager.argmax(-1))
    assert torch.equal(whole[:3], decode.hidden[:3])


def test_the_torch_kernels_read_on_the_host_so_graphs_need_triton(checkpoint):
    """Why graphs_wanted asks for kernels=triton: the torch MoE path reads its expert offsets
    on the host (what HostReads finds; capture would fail on it)."""
    engine = engine_for(ModelConfig.load(checkpoint, device="cpu"), static=False, max_num_seqs=4)
    empty = VisualFeatures.empty(engine.config)
    for text in ("a", "b b", "c c c"):
        engine.add(engine.new_sequence(text, empty, engine.params(max_tokens=4, temperature=0.0)))
    engine.step()
    decode = DecodeGraphRunner(engine.runner, 4, engine.max_model_len, capture=False)
    with HostReads(ignore=decode.host_buffers()) as reads:
        decode.run_padded(engine.scheduler.schedule())
    assert reads.found and all(r.startswith("tolist") for r in reads.found)


def test_host_reads_finds_what_syncs():
    x = torch.arange(4.0)
    with HostReads() as reads:
        x.tolist(), x[x > 1], bool(x.sum() > 0), x.nonzero(), x.cumsum(0), x.argmax()
    assert [r.split(" ")[0] for r in reads.found] == ["tolist", "__getitem__", "__bool__", "nonzero"]


class HostReads(TorchFunctionMode):
    """Records calls that read a tensor's values on the host (on a GPU: a sync), outside triton
    and other than of the host tensors `ignore` (the step's own staging)."""

    READS = {"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
             "unique", "unique_consecutive", "bincount", "masked_select", "argwhere"}

    def __init__(self, ignore: list[torch.Tensor] = ()):
        super().__init__()
        self.found: list[str] = []
        self.ignore = {t.data_ptr() for t in ignore}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        boolean_index = name in ("__getitem__", "__setitem__") and _has_bool_tensor(args[1:2])
        own = bool(args) and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.ignore
        if (name in self.READS or boolean_index) and not own and not _called_from_triton():
            self.found.append(f"{name} at {_caller()}")
        return func(*args, **kwargs)


def _has_bool_tensor(items) -> bool:
    for item in items:
        if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
            return True
        if isinstance(item, tuple) and _has_bool_tensor(item):
            return True
    return False


def _called_from_triton() -> bool:
    """Whether triton's own code (its interpreter moving arguments to numpy) made the call."""
    import triton

    package = str(Path(triton.__file__).parent) + os.sep
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(package):
            return True
        frame = frame.f_back
    return False


def _caller() -> str:
    frame = sys._getframe(3)
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def test_gpu_check_smoke(tmp_path):
    """bench/gpu_check.py --smoke: every part of the GPU check on the CPU at tiny dims."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check-cpu-smoke.json").read_text())
    assert (tmp_path / "gpu_check-cpu-smoke.md").is_file()
    assert result["smoke"] and {p["dtype"] for p in result["parity"]} == {"float32"}
    for p in result["parity"]:
        assert p["greedy_tokens_equal"] == p["greedy_tokens"] == 32 and p["logits_rel_err"] < 1e-4, p
    assert {row["batch"] for row in result["decode"]} == {1, 8, 32, 64}
    assert all(row["tokens_per_s"] > 0 and row["floor_ratio"] > 0 for row in result["decode"])
    assert result["prefill_1024"]["prompt_tokens"] == 1024 and result["image_ttft"]["ttft_ms"] > 0
    assert result["vision"]["images_per_s"] > 0 and result["graphs"]["eager_over_graph"] > 0
