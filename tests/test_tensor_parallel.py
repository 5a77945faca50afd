"""Tensor and expert parallel language model (parallel/), on the CPU with gloo and 2 ranks:

- each rank loads only its slices of each tensor, and they are the one-process model's slices
  (hub, transformers and per-expert FP8 layouts);
- in one process (the engine, rank 1 spawned): mixed requests batched together with prefill
  chunks cutting through images give the one-process engine's greedy tokens, with logits
  within LOGITS_ATOL of it (fp32), with and without expert parallel, and with the KV head
  replicated (the tiny-kv1 checkpoint: 1 KV head, 2 ranks); each rank holds about half the
  weights;
- through real tritonservers: greedy tokens equal transformers' and the one-process server's
  for text-only, one and two images, with chunked prefill, concurrent requests too; a worker
  killed mid-generation fails its request within seconds naming the rank, the language model,
  the ensemble and the server report not ready, and no process is left behind.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import IMAGE_CASES, LOG_DIR, reference_generate
from qwen3vl.client import ServerError, stream_grpc
from qwen3vl.encoder.encoder import VisionEncoder
from qwen3vl.engine.engine import Engine
from qwen3vl.errors import InvalidInput
from qwen3vl.launch.processes import process_table
from qwen3vl.launch.server import Server
from qwen3vl.model.config import ModelConfig
from qwen3vl.model.text import LanguageModel
from qwen3vl.parallel.engine import parallel_engine
from qwen3vl.parallel.shard import Shard
from qwen3vl.settings import ServingConfig
from qwen3vl.tools.make_checkpoint import make_checkpoint
from qwen3vl.tools.sizing import sizing

# fp32 logits of 2 ranks against one process: the all-reduces sum in another order than one
# process does (measured max |diff| ~1.5e-6 on logits of magnitude ~4).
LOGITS_ATOL = 2e-5
MAX_NEW = 6
PROMPT = "Describe the picture."


@pytest.fixture(scope="module")
def kv1_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-kv1", "tiny-kv1", seed=0)


# ---- loading: each rank reads its slices, and they are the right ones
@pytest.mark.parametrize("layout", ["hub", "transformers", "fp8"])
@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_each_rank_loads_only_its_slices_of_the_one_process_model(tmp_path_factory, checkpoint, layout, ep, capsys):
    if layout == "hub":
        ckpt = checkpoint
    else:
        ckpt = make_checkpoint(tmp_path_factory.getbasetemp() / f"tiny-{layout}", "tiny",
                               layout="transformers" if layout == "transformers" else None, fp8=layout == "fp8")
    config = ModelConfig.load(ckpt, device="cpu")
    cfg = config.text
    if layout == "fp8" and not ep:   # 48 / 2 experts' columns: off the 128-wide FP8 blocks
        with pytest.raises(InvalidInput, match="use --enable-expert-parallel"):
            LanguageModel.from_checkpoint(config, Shard(0, 2))
        return
    full = dict(LanguageModel.from_checkpoint(config).named_parameters())
    total = sum(p.numel() for p in full.values())
    held = 0
    for rank in range(2):
        shard = Shard(rank, 2, ep)
        capsys.readouterr()
        part = dict(LanguageModel.from_checkpoint(config, shard).named_parameters())
        assert part.keys() == full.keys()
        held = sum(p.numel() for p in part.values())
        # what it read of the files: its share (bf16 in the file), not the model (FP8: whole blocks)
        read = float(re.search(r"this rank's shares: ([0-9.e-]+) GiB read", capsys.readouterr().out).group(1))
        if layout != "fp8":
            assert read * 2**30 == pytest.approx(2 * held, rel=2e-3)
        assert held < 0.56 * total     # ~1/2: only norms and routers are whole on every rank
        if rank == 0:   # qwen3vl-sizing's per-GPU weights are what a rank loads (rank 0 holds the most)
            s = sizing(ckpt, "float32", 2, ep)
            assert s.language_weight_bytes_per_gpu == 4 * held
            assert s.kv_bytes_per_token_per_gpu * 2 == s.kv_bytes_per_token
        q, kv, inter = shard.q_heads(cfg) * cfg.head_dim, shard.kv_heads(cfg) * cfg.head_dim, shard.moe_inter(cfg)
        first, end = shard.experts(cfg)
        col = 0 if ep else rank * inter   # the experts' intermediate columns this rank holds
        rows = shard.vocab_rows(cfg)
        for name, p in part.items():
            w = full[name]
            if name.endswith("q_proj.weight"):
                want = w[rank * q:(rank + 1) * q]
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                want = w[shard.kv_head_start(cfg) * cfg.head_dim:][:kv]
            elif name.endswith("o_proj.weight"):
                want = w[:, rank * q:(rank + 1) * q]
            elif name.endswith("experts.gate_up_proj"):
                i = cfg.moe_intermediate_size
                gate, up = w[first:end, :, :i], w[first:end, :, i:]
                want = torch.cat((gate[..., col:col + inter], up[..., col:col + inter]), -1)
            elif name.endswith("experts.down_proj"):
                want = w[first:end, col:col + inter]
            elif name in ("embed_tokens.weight", "lm_head.weight"):
                want = w[rank * rows:(rank + 1) * rows]
            else:
                want = w
            assert torch.equal(p, want), name


def test_a_split_that_does_not_fit_is_refused_naming_the_size(checkpoint):
    cfg = ModelConfig.load(checkpoint, device="cpu").text   # 4 heads, 2 KV heads, 8 experts of 48
    with pytest.raises(InvalidInput, match="4 attention heads"):
        Shard(0, 3).check(cfg)
    with pytest.raises(InvalidInput, match="6 experts"):
        Shard(0, 4, expert_parallel=True).check(dataclasses.replace(cfg, num_experts=6))
    with pytest.raises(InvalidInput, match="intermediate size 50 .*--enable-expert-parallel"):
        Shard(0, 4).check(dataclasses.replace(cfg, moe_intermediate_size=50))
    # 235B's shapes in FP8: TP8 splits each expert to 192 columns, off the 128-wide blocks (vLLM
    # refuses it too); TP4 (384) and TP8 with whole experts are fine; 4 KV heads replicate at TP8
    big = dataclasses.replace(cfg, num_attention_heads=64, num_key_value_heads=4, moe_intermediate_size=1536,
                              num_experts=128)
    with pytest.raises(InvalidInput, match="1536 / 8 = 192.*128"):
        Shard(0, 8).check(big, fp8=True)
    for shard in (Shard(0, 4), Shard(0, 8, expert_parallel=True)):
        shard.check(big, fp8=True)
    assert (Shard(5, 8).kv_heads(big), Shard(5, 8).kv_head_start(big)) == (1, 2)   # vLLM: r * KV // N


def test_the_vision_encoder_has_no_collective():
    """The encoder is data parallel (one replica per instance): a collective inside it would
    hang a request that runs on one replica only (SGLang's DP-encoder hang). Nothing it runs
    imports torch.distributed or the parallel package."""
    import ast

    root = Path(__file__).resolve().parents[1] / "python_backend" / "qwen3vl"
    files = [*sorted((root / "encoder").glob("*.py")), root / "model" / "vision.py", root / "backend" / "encoder.py",
             *sorted((root / "disagg").glob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}"] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not any("distributed" in n or n.startswith("parallel") or ".parallel" in n for n in names), path


# ---- the engine in one process with rank 1 spawned
def mixed_requests(encoder):
    one, two = encoder.encode([IMAGE_CASES["one-image"]])[0], encoder.encode([IMAGE_CASES["two-images"]])[0]
    empty = encoder.encode([[]])[0]
    return [("Write a haiku about rain.", empty, dict(max_tokens=8, temperature=0.0)),
            ("What is in the picture?", one, dict(max_tokens=6, temperature=0.0)),
            ("Compare <image> with <image>.", two, dict(max_tokens=5, temperature=0.0)),
            ("Tell me a story.", empty, dict(max_tokens=7, temperature=0.8, seed=7))]


def run_capturing(engine: Engine, requests) -> tuple[list[list[int]], list[torch.Tensor]]:
    """All requests added at once, stepped to the end: each one's tokens, each step's logits."""
    logits = []
    execute = engine.runner.execute
    engine.runner.execute = lambda batch: logits.append(execute(batch)) or logits[-1]
    seqs = []
    for text, features, params in requests:
        seqs.append(engine.new_sequence(text, features, engine.params(**params)))
        engine.add(seqs[-1])
    tokens = {s.request_id: [] for s in seqs}
    while engine.has_work():
        out = engine.step()
        assert not out.failures, out.failures
        for rid, step in out.steps.items():
            tokens[rid] += step.token_ids
    return [tokens[s.request_id] for s in seqs], logits


@pytest.mark.parametrize("which,ep,vocab_parallel", [("tiny", False, True), ("tiny-kv1", True, False)],
                         ids=["tp-split-kv", "ep-replicated-kv-and-vocab"])
def test_two_ranks_give_one_process_tokens_and_logits(checkpoint, kv1_checkpoint, reference, which, ep,
                                                       vocab_parallel):
    """The second case also keeps the embedding and LM head whole on each rank (vocab_parallel off)."""
    ckpt = checkpoint if which == "tiny" else kv1_checkpoint
    config = ModelConfig.load(ckpt, device="cpu")
    encoder = VisionEncoder(config, reference[1].image_processor)
    requests = mixed_requests(encoder)
    settings = dict(kv_cache_mb=16, enable_prefix_caching=False, max_num_batched_tokens=24)  # chunks cut images
    one_tokens, one_logits = run_capturing(Engine.from_checkpoint(config, ServingConfig(**settings)), requests)
    engine, group = parallel_engine(config, ServingConfig(**settings, tensor_parallel_size=2,
                                                          enable_expert_parallel=ep, vocab_parallel=vocab_parallel))
    try:
        assert engine.model.num_kv_heads == (1 if which == "tiny-kv1" else config.text.num_key_value_heads // 2)
        tp_tokens, tp_logits = run_capturing(engine, requests)
        weights = dict(group.weight_bytes)
    finally:
        group.stop()
    assert tp_tokens == one_tokens
    assert len(tp_logits) == len(one_logits)
    worst = max((a - b).abs().max().item() for a, b in zip(tp_logits, one_logits) if a.numel())
    assert worst <= LOGITS_ATOL, worst
    total = sum(p.numel() * p.element_size() for p in LanguageModel.from_checkpoint(config).parameters())
    print(f"\n{which} {'EP' if ep else 'TP'}: weights per rank {weights} of {total} bytes; max |logits diff| {worst:.2e}")
    assert sorted(weights) == [0, 1] and all(b < (0.56 if vocab_parallel else 0.75) * total for b in weights.values())
    assert not any(p.is_alive() for p in group.procs)


# ---- through real tritonservers
def tp_server(checkpoint, name: str, *flags: str) -> Server:
    return Server(checkpoint, LOG_DIR / f"{name}.log", models=("ensemble", "qwen3_encoder", "qwen3_language"),
                  extra=["--device", "cpu", "--tensor-parallel-size", "2", "--max-num-batched-tokens", "32",
                         "--kv-cache-mb", "32", *flags])


@pytest.fixture(scope="module")
def tp_tiny(checkpoint):
    with tp_server(checkpoint, "tensor-parallel") as s:
        stub, ranks = workers_of(s)
        assert len(ranks) >= 1
        yield s
        assert s.alive(), s.tail()
    # stopped like an operator stops it: the worker leaves with its model
    assert not still_running([stub, *ranks], 30), "left behind"


@pytest.fixture(scope="module")
def ep_kv1(kv1_checkpoint):
    """TP 2 with expert parallel on the one-KV-head checkpoint (the KV head replicated)."""
    with tp_server(kv1_checkpoint, "expert-parallel", "--enable-expert-parallel") as s:
        yield s


@pytest.fixture(scope="module")
def kv1_reference(kv1_checkpoint):
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(kv1_checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(kv1_checkpoint)


def tokens(server: Server, images, max_tokens: int = MAX_NEW, prompt: str = PROMPT) -> list[int]:
    return [t for c in stream_grpc(server.grpc_url, prompt=prompt, images=images, max_tokens=max_tokens,
                                   temperature=0.0) for t in c.token_ids]


def test_tp_server_equals_transformers_and_the_one_process_server(tp_tiny, server, reference):
    for case, images in IMAGE_CASES.items():
        want = reference_generate(reference, PROMPT, images, MAX_NEW)
        assert tokens(tp_tiny, images) == want, case
        assert tokens(server, images) == want, case


def test_concurrent_mixed_requests_on_the_tp_server_each_give_their_own_tokens(tp_tiny, reference):
    cases = [(case, prompt) for prompt in (PROMPT, "What colours are there?") for case in IMAGE_CASES]
    want = [reference_generate(reference, prompt, IMAGE_CASES[case], MAX_NEW) for case, prompt in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda cp: tokens(tp_tiny, IMAGE_CASES[cp[0]], prompt=cp[1]), cases))
    assert got == want


def test_ep_server_with_a_replicated_kv_head_equals_transformers(ep_kv1, kv1_reference):
    for case, images in IMAGE_CASES.items():
        assert tokens(ep_kv1, images) == reference_generate(kv1_reference, PROMPT, images, MAX_NEW), case


def still_running(pids: list[int], timeout_s: float) -> list[int]:
    """Those of `pids` still running (not gone, not a zombie) after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = process_table()
        left = [pid for pid in pids if pid in table and table[pid][2] != "Z"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def workers_of(server: Server) -> tuple[int, list[int]]:
    """(the language model's stub pid, its spawned rank processes and multiprocessing's resource
    tracker: every process the stub started)."""
    stub = next(p.pid for p in server.model_processes() if "qwen3_language" in p.model)
    children = [pid for pid, (ppid, _, _) in process_table().items() if ppid == stub]
    ranks = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return stub, ranks + [pid for pid in children if pid not in ranks]


def test_a_killed_worker_fails_its_request_naming_the_rank_and_the_model_goes_not_ready(ep_kv1):
    """Last on its server: it leaves the language model unloaded."""
    import tritonclient.http as httpclient

    stub, ranks = workers_of(ep_kv1)
    assert b"spawn_main" in Path(f"/proc/{ranks[0]}/cmdline").read_bytes()   # rank 1, then the tracker
    outcome: dict = {}
    started = threading.Event()

    def generate():
        try:
            for chunk in stream_grpc(ep_kv1.grpc_url, model="qwen3_language", prompt="Tell me a long story.",
                                     max_tokens=20_000, ignore_eos=True, temperature=0.0, timeout_s=120):
                if chunk.token_ids:
                    started.set()
            outcome["done"] = True
        except ServerError as e:
            outcome["error"] = e
        finally:
            outcome["at"] = time.monotonic()
            started.set()

    thread = threading.Thread(target=generate)
    thread.start()
    assert started.wait(60)
    killed_at = time.monotonic()
    os.kill(ranks[0], signal.SIGKILL)
    thread.join(60)
    assert "error" in outcome, outcome
    assert "tensor-parallel rank 1 of 2" in str(outcome["error"]) and "SIGKILL" in str(outcome["error"])
    assert outcome["at"] - killed_at < 15
    client = httpclient.InferenceServerClient(ep_kv1.http_url)
    deadline = time.monotonic() + 30
    try:
        while client.is_model_ready("qwen3_language") and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not client.is_model_ready("qwen3_language")
        assert not client.is_model_ready("ensemble")
        assert not client.is_server_ready()   # /v2/health/ready: the probes' endpoint
    finally:
        client.close()
    assert not still_running([stub, *ranks], 30), "left behind"
    assert ep_kv1.alive()


# ---- the 8-GPU deployment files (checked offline, as tests/test_docker_files.py and test_k8s.py do)
def test_the_tensor_parallel_compose_file_gives_the_server_as_many_gpus_as_ranks():
    import yaml

    from qwen3vl.cli import openai_server, serve

    root = Path(__file__).resolve().parents[1]
    services = yaml.safe_load((root / "docker" / "docker-compose.tensor-parallel.yml").read_text())["services"]
    triton, api = services["triton"], services["openai"]
    args = serve.parse_args(triton["command"][1:])
    settings = ServingConfig(tensor_parallel_size=args.tensor_parallel_size,
                             enable_expert_parallel=args.enable_expert_parallel)
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert len(device["device_ids"]) == settings.tensor_parallel_size == 8 and settings.enable_expert_parallel
    assert triton["volumes"][0]["target"] == args.checkpoint and triton["shm_size"]
    assert f"127.0.0.1:{args.http_port}/v2/health/ready" in triton["healthcheck"]["test"][-1]
    assert openai_server.parse_args(api["command"][1:]).triton_url == f"triton:{args.grpc_port}"


def test_the_tensor_parallel_pod_asks_for_as_many_gpus_as_ranks_and_restarts_when_a_rank_dies(checkpoint):
    from test_k8s import K8S, containers, documents, port, triton

    docs = documents(K8S / "tensor-parallel" / "triton.yaml")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    c, args = triton(deployment)
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == args.tensor_parallel_size == 8
    assert args.enable_expert_parallel and args.host == "0.0.0.0"
    # ready while the ensemble is (the server is not once a rank died: the test above); alive
    # while the language model is loaded, so a pod whose rank died restarts
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/models/qwen3_language/ready"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert port(c, c[probe]["httpGet"]["port"]) == args.http_port
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[args.checkpoint]["readOnly"] and volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    named = {p["name"] for cont in containers(deployment).values() for p in cont["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
    # the 235B model splits this way (64 query heads, 4 KV heads replicated x2, 128 experts)
    cfg = dataclasses.replace(ModelConfig.load(checkpoint, device="cpu").text,
                              num_attention_heads=64, num_key_value_heads=4, num_experts=128,
                              moe_intermediate_size=1536)
    Shard(0, args.tensor_parallel_size, args.enable_expert_parallel).check(cfg, fp8=True)


RELEASED = {   # the released configs' text dims (docs/tensor-parallel.md "What fits where")
    "Qwen3-VL-30B-A3B": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                             moe_intermediate_size=768),
    "Qwen3-VL-235B-A22B": dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                               moe_intermediate_size=1536),
}


@pytest.mark.parametrize("model,n,ep,row", [
    ("Qwen3-VL-30B-A3B", 1, False, "| 1 GPU | 56.9 GiB | 29.0 GiB | 96 KiB |"),
    ("Qwen3-VL-30B-A3B", 2, False, "| TP2 | 28.4 GiB | 14.5 GiB | 48 KiB |"),
    ("Qwen3-VL-235B-A22B", 4, False, "| TP4 (FP8), EP or not | 109.5 GiB | 55.1 GiB | 47 KiB"),
    ("Qwen3-VL-235B-A22B", 8, True, "| TP8 bf16, with EP | 54.9 GiB | 27.6 GiB | 47 KiB"),
])
def test_the_what_fits_table_is_the_split_of_the_released_shapes(model, n, ep, row):
    """Each rank's share of the released models' language tensors (their shapes from transformers
    on the meta device), through Shard.reads as the servers load them: bf16 bytes, FP8 native
    (1 byte per linear weight, scales left out), KV per token on one rank; and native FP8 can
    run each split (no share splits a scale block)."""
    import math

    from qwen3vl.model.config import TextConfig
    from qwen3vl.model.fp8_linear import check_fp8_shards, runs_natively
    from qwen3vl.tools.make_checkpoint import SPECIAL_TOKENS, hf_configs, hub_shapes

    config = hf_configs("tiny", {t: 151643 + i for i, t in enumerate(SPECIAL_TOKENS)})["config.json"]
    text = config["text_config"]
    text.update(RELEASED[model], head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936)
    for rope in (text["rope_scaling"], text["rope_parameters"]):
        rope["mrope_section"] = [24, 20, 20]
    config["vision_config"]["out_hidden_size"] = text["hidden_size"]
    cfg = TextConfig.from_dict(text)
    shard = Shard(0, n, ep)
    shard.check(cfg)
    held = linear = 0.0
    for name, shape in hub_shapes(config).items():
        if not name.startswith(("model.language_model.", "lm_head.")):
            continue
        reads = shard.reads(name.removeprefix("model.language_model."), shape, cfg)
        size = math.prod(shape) if reads is None else sum(
            math.prod(len(range(*s.indices(d))) for s, d in zip(index, shape)) for index in reads)
        held += size
        linear += size if "proj" in name and "norm" not in name else 0
    kv = 2 * cfg.num_hidden_layers * shard.kv_heads(cfg) * cfg.head_dim * 2
    # every row's FP8 split keeps whole 128x128 scale blocks: native FP8 runs there (raises if not)
    check_fp8_shards({n: s for n, s in hub_shapes(config).items() if runs_natively(n)}, shard, cfg)
    got = f"{2 * held / 2**30:.1f} GiB | {(linear + 2 * (held - linear)) / 2**30:.1f} GiB | {kv // 1024} KiB"
    text = (Path(__file__).resolve().parents[1] / "docs" / "tensor-parallel.md").read_text()
    assert f"| {model} {row}" in text and got in row, (got, row)
