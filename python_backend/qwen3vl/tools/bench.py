"""`qwen3vl-bench`: the language engine's benchmark suite, every figure a ratio measured side by
side in one run (interleaved rounds, median of per-round ratios; DESIGN section 7).

    qwen3vl-bench [--quick] [--preset small] --out bench/results/engine_bench-small-cpu.json

It makes the checkpoint it needs, starts one real server, and prints one table:

- R1       served / in-process latency of one request at batch 1 (text, 32 tokens, greedy)
- R5       requests/s at concurrency 8 / the same requests one at a time, same server
- R6_T*    per-expert loop (transformers' eager experts) / our grouped MoE time, one MoE layer at
           T tokens
- R7       served inter-token latency / in-process decode step, batch 1
- E1_B*    batched decode efficiency: B x t(step at batch 1) / t(step at batch B)
- E4       p99 inter-token latency of 4 running streams while a 2,000-visual-token image prompt
           prefills: without chunked prefill / with it
- vs_transformers  32 requests (max_tokens 8 to 64) at concurrency 8 through the server, our
           requests/s / transformers' generate over the same requests in padded static batches of 8;
           the JSON's details add `vs_transformers_expert_reads`, the expert weight matrices each
           side reads for those requests (transformers' / ours), which bounds it on the CPU
- floor    bandwidth floor of a batch-1 decode step (active weight bytes / measured copy
           bandwidth) / the measured step

`qwen3vl-bench demo-accuracy` measures the demo checkpoint's answers instead (qwen3vl.tools.shapes.accuracy).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..client import ask
from ..engine.engine import Engine, EngineOutputs
from ..features import VisualFeatures
from ..launch.server import Server
from ..model.config import ModelConfig
from ..paths import REPO_ROOT
from ..settings import ServingConfig
from .make_checkpoint import make_checkpoint

TARGETS = {"R1": "<= 1.15", "R5": ">= 3", "R6_T1": ">= 1", "R6_T16": ">= 2", "R6_T64": "", "R6_T512": "",
           "R7": "<= 1.10", "E1_B2": "", "E1_B4": "", "E1_B8": ">= 3", "E4": ">= 2", "vs_transformers": ">= 1.5",
           "floor": ""}


def median_ratio(a, b, rounds: int) -> tuple[float, list[float]]:
    """Median of per-round a() / b(), the two interleaved (alternating which goes first)."""
    ratios = []
    for r in range(rounds):
        if r % 2:
            tb, ta = b(), a()
        else:
            ta, tb = a(), b()
        ratios.append(ta / tb)
    return statistics.median(ratios), ratios


def step_or_raise(engine: Engine) -> EngineOutputs:
    """One engine step; raises the first failure in it (the benchmark's requests never fail)."""
    out = engine.step()
    for error in out.failures.values():
        raise error
    return out


def _cancel_all(engine: Engine) -> None:
    """End the benchmark's sequences as a client would: cancelled, gone at the next step."""
    for seq in [*engine.scheduler.running, *engine.scheduler.waiting]:
        seq.cancel_requested = True
    engine.step()


def in_process_concurrent(engine: Engine, requests: list[dict], concurrency: int) -> None:
    """Run text requests (prompt, max_tokens; greedy) through the engine on this thread,
    `concurrency` in flight, each finished one replaced at once by the next."""
    empty = VisualFeatures.empty(engine.config)
    pending = list(requests)

    def add_next():
        r = pending.pop(0)
        engine.add(engine.new_sequence(r["prompt"], empty, engine.params(max_tokens=r["max_tokens"], temperature=0.0)))

    for _ in range(min(concurrency, len(pending))):
        add_next()
    while engine.has_work():
        for step in step_or_raise(engine).steps.values():
            if step.finish_reason and pending:
                add_next()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Bench:
    def __init__(self, args):
        self.args, self.quick = args, args.quick
        self.rounds = 3 if args.quick else 7
        self.ckpt = make_checkpoint(REPO_ROOT / ".work" / "checkpoints" / args.preset, args.preset)
        self.config = ModelConfig.load(self.ckpt, device="cpu")
        self.ratios: dict[str, float] = {}
        self.details: dict[str, object] = {}

    def engine(self, **kw) -> Engine:
        return Engine.from_checkpoint(self.config, ServingConfig(**{"kv_cache_mb": 512,
                                                                    "enable_prefix_caching": False, **kw}))

    # ---- in-process pieces
    def decode_step_s(self, engine: Engine, batch: int, steps: int) -> float:
        """Median time of one engine step with `batch` sequences all decoding."""
        empty = VisualFeatures.empty(self.config)
        for i in range(batch):  # max_tokens: KV blocks are reserved for all of them
            engine.add(engine.new_sequence(f"Decode stream {i}.", empty,
                                           engine.params(max_tokens=steps + 64, temperature=0.0)))
        while any(s.prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
            if not step_or_raise(engine).num_seqs:
                raise RuntimeError("the benchmark's sequences do not fit in the KV cache")
        times = [timed(lambda: step_or_raise(engine)) for _ in range(steps)]
        _cancel_all(engine)
        return statistics.median(times)

    def in_process_request_s(self, engine: Engine, prompt: str, max_tokens: int) -> float:
        empty = VisualFeatures.empty(self.config)
        return timed(lambda: list(engine.generate(prompt, empty, engine.params(max_tokens=max_tokens, temperature=0.0))))

    def moe(self):
        """R6: the per-expert loop of the reference (transformers' `Qwen3VLMoeTextSparseMoeBlock`,
        experts implementation "eager": for each hit expert, find its tokens, gather, two
        projections, index_add) / our grouped MoE, same weights, same router. Our own per-expert
        matmul loop over the sorted slots (fused_moe_torch_per_expert) goes to the
        details: on the CPU both it and the grouped path read the same expert weights, which
        bounds their ratio near 1."""
        from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

        from ..kernels.reference import fused_moe_torch_per_expert
        from ..model.text import SparseMoe

        cfg = self.config.text
        raw = json.loads((Path(self.ckpt) / "config.json").read_text())["text_config"]
        ref_cfg = Qwen3VLMoeTextConfig(**raw)
        ref_cfg._experts_implementation = "eager"
        layer, reference = SparseMoe(cfg), Qwen3VLMoeTextSparseMoeBlock(ref_cfg)
        loop = SparseMoe(cfg, fused_moe_torch_per_expert)  # one matmul per hit expert
        loop.gate, loop.experts = layer.gate, layer.experts  # the same weights
        torch.manual_seed(0)
        with torch.no_grad():
            layer.gate.weight.normal_(0, 0.02)
            layer.experts.gate_up_proj.normal_(0, 0.02)
            layer.experts.down_proj.normal_(0, 0.02)
            # transformers keeps the experts as linear weights, [E, 2I, H] and [E, H, I]
            reference.gate.weight.copy_(layer.gate.weight)
            reference.experts.gate_up_proj.copy_(layer.experts.gate_up_proj.transpose(1, 2))
            reference.experts.down_proj.copy_(layer.experts.down_proj.transpose(1, 2))
        for t in (1, 16, 64, 512):
            x = torch.randn(1, t, cfg.hidden_size)
            with torch.inference_mode():
                grouped = layer(x)
                torch.testing.assert_close(reference(x), grouped, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(loop(x), grouped, rtol=1e-4, atol=1e-5)
                reps = max(1, 64 // t)

                def ours(flag):
                    moe = layer if flag else loop
                    return timed(lambda: [moe(x) for _ in range(reps)])

                reference_s = lambda: timed(lambda: [reference(x) for _ in range(reps)])  # noqa: E731
                self.ratios[f"R6_T{t}"], _ = median_ratio(reference_s, lambda: ours(True), self.rounds + 2)
                self.details[f"R6_sorted_loop_T{t}"], _ = median_ratio(lambda: ours(False), lambda: ours(True),
                                                                       self.rounds + 2)

    def batched_decode(self):
        engine = self.engine(max_num_seqs=8)
        steps = 8 if self.quick else 20
        t1 = [self.decode_step_s(engine, 1, steps)]
        for b in (2, 4, 8):
            ratios = []
            for r in range(self.rounds):
                tb = self.decode_step_s(engine, b, steps)
                t1.append(self.decode_step_s(engine, 1, steps))
                ratios.append(b * t1[-1] / tb)
            self.ratios[f"E1_B{b}"] = statistics.median(ratios)
        self.details["decode_step_b1_ms"] = statistics.median(t1) * 1e3

    def chunked_prefill_itl(self):
        """p99 ITL of 4 streams while a 2,000-visual-token prompt prefills."""
        cfg = self.config
        grid = torch.tensor([[1, 80, 100]])  # 80 x 100 patches -> 2,000 visual tokens
        n = int(grid.prod()) // cfg.spatial_merge_size ** 2
        g = torch.Generator().manual_seed(0)
        big = VisualFeatures(torch.randn(n, cfg.text.hidden_size, generator=g) * 0.02,
                             torch.randn(cfg.deepstack_layers, n, cfg.text.hidden_size, generator=g) * 0.02, grid)

        def p99_itl(chunked: bool) -> float:
            engine = self.engine(max_num_seqs=8, max_num_batched_tokens=256, enable_chunked_prefill=chunked)
            arrivals: dict[int, list[float]] = {}  # request id -> when each of its steps came out
            empty = VisualFeatures.empty(cfg)
            for i in range(4):
                seq = engine.new_sequence(f"Stream {i}.", empty, engine.params(max_tokens=1000, temperature=0.0))
                engine.add(seq)
                arrivals[seq.request_id] = []

            def step():
                out = step_or_raise(engine)
                now = time.perf_counter()
                for request_id in out.steps.keys() & arrivals.keys():
                    arrivals[request_id].append(now)

            for _ in range(6):
                step()
            engine.add(engine.new_sequence("Describe <image>.", big, engine.params(max_tokens=1, temperature=0.0)))
            while engine.scheduler.waiting or any(s.prefilling for s in engine.scheduler.running):
                step()
            for _ in range(6):
                step()
            _cancel_all(engine)
            itl = [b - a for times in arrivals.values() for a, b in zip(times[2:], times[3:])]
            return sorted(itl)[max(0, int(round(0.99 * len(itl))) - 1)]

        self.ratios["E4"], _ = median_ratio(lambda: p99_itl(False), lambda: p99_itl(True), self.rounds)

    def floor(self):
        """Active weight bytes of one batch-1 decode step over the copy bandwidth measured now."""
        cfg, size = self.config.text, 4  # fp32 on the CPU
        attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
        experts = cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size
        router = cfg.hidden_size * cfg.num_experts
        active = (cfg.num_hidden_layers * (attn + experts + router) + cfg.vocab_size * cfg.hidden_size) * size
        src = torch.ones(64 << 20, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_s = min(timed(lambda: dst.copy_(src)) for _ in range(5))
        bandwidth = 2 * src.numel() / copy_s  # read + write
        floor_s = active / bandwidth
        step_s = self.details["decode_step_b1_ms"] / 1e3
        self.ratios["floor"] = floor_s / step_s
        self.details.update(active_weight_bytes=active, copy_bandwidth_gb_s=bandwidth / 1e9)

    # ---- through the server
    def served(self, server: Server):
        url = server.grpc_url
        engine = self.engine()
        prompt = "Tell me a long story about the sea."
        ask(url, "grpc", False, prompt=prompt, max_tokens=4, temperature=0.0)  # warm-up
        self.in_process_request_s(engine, prompt, 4)
        self.ratios["R1"], _ = median_ratio(
            lambda: ask(url, "grpc", False, prompt=prompt, max_tokens=32, temperature=0.0).total_s,
            lambda: self.in_process_request_s(engine, prompt, 32), self.rounds)

        def served_itl() -> float:
            arrivals = []
            ask(url, "grpc", True, prompt=prompt, max_tokens=48, temperature=0.0,
                on_text=lambda s: arrivals.append(time.perf_counter()))
            return statistics.median(b - a for a, b in zip(arrivals[1:], arrivals[2:]))

        steps = 10 if self.quick else 24
        self.ratios["R7"], _ = median_ratio(served_itl, lambda: self.decode_step_s(engine, 1, steps), self.rounds)

        rng = random.Random(0)
        requests = [dict(prompt=f"Request {i}: tell me something.", max_tokens=rng.randint(8, 64)) for i in range(32)]

        def throughput(reqs, concurrency: int) -> float:
            run = lambda r: ask(url, "grpc", False, temperature=0.0, **r)  # noqa: E731
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(run, reqs))
            return len(reqs) / (time.perf_counter() - start)

        self.ratios["R5"], _ = median_ratio(lambda: 1 / throughput(requests, 1), lambda: 1 / throughput(requests, 8),
                                            max(2, self.rounds - 1))
        self.vs_transformers(lambda: throughput(requests, 8), requests)

    def vs_transformers(self, ours_rps, requests):
        from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

        processor = AutoProcessor.from_pretrained(self.ckpt)
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(self.ckpt, dtype=torch.float32).eval()
        texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": r["prompt"]}]}],
                                               tokenize=False, add_generation_prompt=True) for r in requests]

        def transformers_rps() -> float:
            start = time.perf_counter()
            for i in range(0, len(requests), 8):  # padded static batches of 8, as transformers offers
                batch = tokenizer(texts[i:i + 8], return_tensors="pt", padding=True)
                longest = max(r["max_tokens"] for r in requests[i:i + 8])
                with torch.inference_mode():
                    model.generate(**batch, max_new_tokens=longest, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            return len(requests) / (time.perf_counter() - start)

        rounds = 2 if self.quick else 3
        # (time per request, transformers) / (time per request, ours) = our requests/s / theirs
        self.ratios["vs_transformers"], _ = median_ratio(lambda: 1 / transformers_rps(), lambda: 1 / ours_rps(), rounds)
        self.details["vs_transformers_expert_reads"] = self.expert_reads(model, transformers_rps, requests)

    def expert_reads(self, model, transformers_run, requests) -> float:
        """What bounds vs_transformers on the CPU: expert weight matrices read, transformers' /
        ours, for the same 32 requests (ours in-process, 8 in flight, a finished one replaced at
        once as the clients do). A step reads each expert that one of its tokens routes to, once
        per layer, and at these sizes the step's time follows that count. Counted by hooks on
        every MoE layer's router: distinct top-k experts of the step's tokens."""
        k = self.config.text.num_experts_per_tok
        count = [0]

        def hook(module, args, out):  # ours: router logits [M, E]; transformers: (logits, scores, ids)
            ids = out[2] if isinstance(out, tuple) else out.topk(k, dim=-1).indices
            count[0] += int(ids.unique().numel())

        engine = self.engine(max_num_seqs=8)
        routers = [layer.mlp.gate for layer in engine.model.layers if hasattr(layer.mlp, "experts")]
        routers += [layer.mlp.gate for layer in model.model.language_model.layers if hasattr(layer.mlp, "experts")]
        handles = [r.register_forward_hook(hook) for r in routers]
        try:
            in_process_concurrent(engine, requests, 8)
            ours, count[0] = count[0], 0
            transformers_run()
            return count[0] / ours
        finally:
            for h in handles:
                h.remove()

    def run(self):
        # Everything in this process (our engine in-process, transformers) runs with the torch
        # threads the served models use, so a served / in-process ratio measures serving alone.
        torch.set_num_threads(ServingConfig().torch_threads)
        self.details["torch_threads"] = torch.get_num_threads()
        self.moe()
        self.batched_decode()
        self.chunked_prefill_itl()
        self.floor()
        logs = REPO_ROOT / ".work" / "logs"
        with Server(self.ckpt, logs / "bench-engine.log", extra=["--device", "cpu"]) as server:
            self.served(server)


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo-accuracy"]:      # the demo checkpoint's accuracy (qwen3vl.tools.shapes.accuracy)
        from .shapes.accuracy import main as demo_accuracy
        return demo_accuracy(argv[1:])
    p = argparse.ArgumentParser(prog="qwen3vl-bench", description=__doc__.split("\n\n")[0],
                                epilog="qwen3vl-bench demo-accuracy --help: the demo checkpoint's accuracy")
    p.add_argument("--quick", action="store_true", help="fewer rounds: under 5 minutes on 2 cores")
    p.add_argument("--preset", default="small",
                   help="the random checkpoint's size (qwen3vl-make-checkpoint's presets) (default: small)")
    p.add_argument("--out", required=True, help="JSON result file")
    args = p.parse_args(argv)
    started = time.perf_counter()
    bench = Bench(args)
    bench.run()
    result = {"preset": args.preset, "device": "cpu", "quick": args.quick, "rounds": bench.rounds,
              "ratios": bench.ratios, "details": bench.details, "seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n## Language engine, CPU ({args.preset} preset; medians of per-round ratios, "
          f"{bench.rounds} rounds; {result['seconds']:.0f} s)\n")
    print("| ratio | value | target |\n|---|---|---|")
    for key, value in bench.ratios.items():
        print(f"| {key} | {value:.2f} | {TARGETS.get(key, '')} |")
    return 0
