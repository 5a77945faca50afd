"""The prepared GPU check, around the engine that serves (qwen3vl's Engine in this process: the
scheduler, the paged KV pool, the Triton kernels, the decode CUDA graphs; no tritonserver).

    make gpu-check                                  # python bench/gpu_check.py --out bench/results
    python bench/gpu_check.py --checkpoint DIR      # the benchmarks on a real checkpoint's weights
    python bench/gpu_check.py --smoke --out DIR     # the same code paths on the CPU, tiny dims (CI)

On a GPU (bf16, --kernels auto: Triton; a few minutes):
  parity      the engine against transformers' Qwen3VLMoeForConditionalGeneration on the generated
              tiny and small checkpoints, fp32 and bf16: encoder outputs, the logits of the prefill
              and of every decode step (CUDA-graph replays) while the tokens agree, 32 greedy
              tokens, the same tokens with --enforce-eager, and in bf16 how far each side lands
              from fp32;
  syncs       a captured decode step (inputs copied in, graph replayed) and the same step uncaptured,
              under torch.cuda.set_sync_debug_mode("error"): any host sync raises;
  graphs      decode step time at batch 1, eager / graph;
  decode      tokens/s at batch 1, 8, 32, 64 through Engine.step, each over its bandwidth floor:
              the bytes a step must read (every weight but the experts, plus the experts its tokens
              route to, counted per layer, plus the KV of its sequences) at the bandwidth of a
              device-to-device copy measured in the same run (2 x bytes / time);
  prefill     one 1,024-token prompt (one step);
  image       TTFT of a 1024x1024 image request: encode (processor + vision tower) + prefill;
  vision      the vision tower's images/s, 8 images of 448x448 in one encode.
The benchmarks run a model with Qwen3-VL-30B-A3B's dims and random weights (48 layers, or as many
as fit: --layers) unless --checkpoint names a real one. Writes DIR/gpu_check-<card>.json and
.md (the table it prints). docs/gpu.md says what each figure means and the targets.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

# What it needs besides the standard library: a GPU machine may lack the small ones (no network there).
_MISSING = [m for m in ("numpy", "torch", "transformers", "triton", "safetensors", "tokenizers", "PIL", "cachetools")
            if importlib.util.find_spec(m) is None]
if _MISSING:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(_MISSING)} (bring their wheels along)")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_backend"))

from qwen3vl.encoder.encoder import VisionEncoder  # noqa: E402
from qwen3vl.engine.engine import Engine  # noqa: E402
from qwen3vl.engine.graph_runner import DecodeGraphRunner  # noqa: E402
from qwen3vl.engine.sampling import generation_defaults  # noqa: E402
from qwen3vl.features import VisualFeatures  # noqa: E402
from qwen3vl.model.config import ModelConfig, TextConfig  # noqa: E402
from qwen3vl.model.prompt import PromptBuilder  # noqa: E402
from qwen3vl.model.text import LanguageModel, MRoPE  # noqa: E402
from qwen3vl.settings import ServingConfig  # noqa: E402
from qwen3vl.tools.make_checkpoint import make_checkpoint  # noqa: E402

# Qwen3-VL-30B-A3B-Instruct's text and vision dims.
REAL_TEXT = dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, intermediate_size=6144,
                 num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                 mlp_only_layers=(), rms_norm_eps=1e-6, rope_theta=5e6, mrope_section=(24, 20, 20),
                 max_position_embeddings=262144)
REAL_VISION = dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=2048,
                   num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24], patch_size=16,
                   temporal_patch_size=2, spatial_merge_size=2, hidden_act="gelu_pytorch_tanh", in_channels=3)
SMOKE_TEXT = dict(REAL_TEXT, vocab_size=2048, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, moe_intermediate_size=48, num_experts=8,
                  num_experts_per_tok=2, mrope_section=(6, 5, 5))
SMOKE_VISION = dict(REAL_VISION, depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                    num_position_embeddings=64, deepstack_visual_indexes=[1, 2, 3])
DECODE_BATCHES = (1, 8, 32, 64)
# The targets (the share of the bandwidth floor reached) and the prefill bound.
FLOOR_TARGETS = {1: 0.30, 32: 0.60}
PREFILL_TARGET_MS = 50.0
GREEDY_TOKENS = 32


class Run:
    """Where the check runs: device, dtype, sizes of the measurements (smoke: tiny and few)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.kernels = "torch" if smoke else "auto"
        self.decode_steps, self.warm_steps, self.rounds = (2, 1, 1) if smoke else (32, 4, 3)
        self.image_side, self.vision_side, self.vision_images = (256, 64, 4) if smoke else (1024, 448, 8)
        self.copy_bytes = (64 << 20) if smoke else (1 << 30)

    def sync(self):
        if not self.smoke:
            torch.cuda.synchronize()

    def timed(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - start

    def static_decode(self, engine: Engine) -> None:
        """The static-buffer decode path the served engine replays as CUDA graphs: already captured
        on a GPU (Engine does it); on the CPU (smoke) the same path, uncaptured."""
        if self.smoke:
            engine.runner.decode = DecodeGraphRunner(engine.runner, engine.settings.max_num_seqs,
                                                     engine.max_model_len, capture=False)
        elif engine.runner.decode is None:
            raise SystemExit("gpu_check: the engine captured no decode graphs (kernels must resolve to triton)")


def noise_png(w, h, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def recording_logits(engine: Engine) -> list[torch.Tensor]:
    """Every logits tensor engine.runner.execute returns from now on (fp32, on the CPU)."""
    seen: list[torch.Tensor] = []
    execute = engine.runner.execute

    def recorded(batch):
        out = execute(batch)
        seen.append(out.float().cpu())
        return out

    engine.runner.execute = recorded
    return seen


# ----------------------------------------------------------------------------- parity
def image_features(ref, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' visual_embeds [N, H] and deepstack [L x [N, H]] (an output object in 5.24,
    a tuple in older releases; per-image splits concatenated)."""
    out = ref.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    pooled, deep = (out[0], out[1]) if isinstance(out, tuple) else (out.pooler_output, out.deepstack_features)

    def whole(x):
        return torch.cat(list(x)) if isinstance(x, (list, tuple)) else x
    return whole(pooled), [whole(d) for d in deep]


def parity(preset: str, dtype: torch.dtype, run: Run, workdir: Path) -> dict:
    """The engine (decode steps through the static path: CUDA graphs on a GPU) against
    transformers on a generated checkpoint, one image-and-text request."""
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    ckpt = make_checkpoint(workdir / preset, preset)
    processor = AutoProcessor.from_pretrained(ckpt)
    ref = Qwen3VLMoeForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).to(run.device).eval()
    ref.generation_config.eos_token_id = None  # 32 tokens on both sides, end of text or not
    ref.generation_config.pad_token_id = 0
    config = ModelConfig.load(ckpt, device=run.device, dtype=dtype, kernels=run.kernels)
    settings = ServingConfig(kv_cache_mb=512, max_num_seqs=4, max_model_len=2048, enable_prefix_caching=False)
    engine = Engine.from_checkpoint(config, settings)
    run.static_decode(engine)
    encoder = VisionEncoder(config, processor.image_processor)
    images = [noise_png(320, 200, 1), noise_png(120, 360, 2)]
    prompt = "Describe both pictures."
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(io.BytesIO(b)) for b in images],
                       return_tensors="pt").to(run.device)
    features = encoder.encode([images])[0]
    with torch.no_grad():
        pooled, deepstack = image_features(ref, inputs)
        out = ref.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    ref_tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    ref_logits = [step[0].float().cpu() for step in out.logits]
    params = engine.params(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    logits = recording_logits(engine)
    tokens = [t for s in engine.generate(prompt, features, params) for t in s.token_ids]
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens)))
    compared = min(same + 1, len(logits), len(ref_logits))  # step i's logits share the context while tokens < i agree
    errs = [rel_err(logits[i][0], ref_logits[i]) for i in range(compared)]
    engine.runner.decode = None  # --enforce-eager: every step eager
    eager = [t for s in engine.generate(prompt, features, params) for t in s.token_ids]
    result = {
        "preset": preset, "dtype": str(dtype).removeprefix("torch."),
        "visual_embeds_max_abs": float((pooled - features.visual_embeds).abs().max()),
        "deepstack_max_abs": max(float((a - b).abs().max()) for a, b in zip(deepstack, features.deepstack_embeds)),
        "logits_rel_err": max(errs), "prefill_logits_rel_err": errs[0],
        "decode_logits_rel_err": max(errs[1:], default=0.0), "logits_steps_compared": compared,
        "greedy_tokens_equal": same, "greedy_tokens": len(ref_tokens),
        "graph_tokens_equal_eager": tokens == eager,
    }
    if dtype != torch.float32:
        # the bf16 oracle: how far each bf16 implementation lands from the fp32 reference
        ref32 = Qwen3VLMoeForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).to(run.device).eval()
        with torch.no_grad():
            truth = ref32(**inputs).logits[0, -1].float().cpu()
        del ref32
        result["ours_vs_fp32_rel_err"] = rel_err(logits[0][0], truth)
        result["transformers_vs_fp32_rel_err"] = rel_err(ref_logits[0], truth)
    del engine, encoder, ref
    return result


# ----------------------------------------------------------------------------- the benchmark engine
def random_language_model(cfg: TextConfig, device, dtype, kernels: str, seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LanguageModel(cfg, kernels)
    model = model.to(dtype).to_empty(device=device)  # weights made on the device, never a CPU copy
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.05 * torch.randn_like(p))
            else:
                fan_in = p.shape[-2] if "experts" in name else p.shape[-1]
                p.normal_(0, fan_in ** -0.5)
    model.rotary = MRoPE(cfg).to(device)
    return model.eval()


def random_vision_model(dims: dict, device, dtype):
    from transformers.models.qwen3_vl_moe import Qwen3VLMoeVisionConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    cfg = Qwen3VLMoeVisionConfig(**dims)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    return Qwen3VLMoeVisionModel._from_config(cfg).to(device, dtype).eval()


def layers_that_fit(text: dict, run: Run) -> int:
    """48 layers, or fewer when the card cannot hold them with a KV pool and the vision tower."""
    if run.smoke:
        return text["num_hidden_layers"]
    h, i, e = text["hidden_size"], text["moe_intermediate_size"], text["num_experts"]
    hq, hkv, d = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    per_layer = 2 * (e * 3 * h * i + h * (hq + 2 * hkv) * d + hq * d * h + h * e)
    fixed = 2 * 2 * text["vocab_size"] * h + (8 << 30)  # embeddings, head, KV and vision room
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(text["num_hidden_layers"], (int(free * 0.85) - fixed) // per_layer))


def bench_engine(run: Run, workdir: Path, checkpoint: str | None, layers: int | None, enforce_eager: bool = False):
    """(engine, vision encoder, description): the 30B's dims with random weights, or a checkpoint."""
    settings = ServingConfig(max_num_seqs=max(DECODE_BATCHES), max_num_batched_tokens=2048,
                             enable_prefix_caching=False, max_model_len=1280 if run.smoke else 2048,
                             kv_cache_mb=256 if run.smoke else 0, gpu_memory_utilization=0.85,
                             enforce_eager=enforce_eager)
    if not run.smoke:
        torch.cuda.empty_cache()  # what a failed first attempt held
    if checkpoint:
        config = ModelConfig.load(checkpoint, device=run.device, dtype=run.dtype, kernels=run.kernels)
        engine = Engine.from_checkpoint(config, settings)
        from transformers import AutoProcessor

        encoder = VisionEncoder(config, AutoProcessor.from_pretrained(checkpoint).image_processor)
        return engine, encoder, f"checkpoint {Path(checkpoint).name}"
    text, vision = (SMOKE_TEXT, SMOKE_VISION) if run.smoke else (REAL_TEXT, REAL_VISION)
    text = dict(text, num_hidden_layers=layers or layers_that_fit(text, run))
    # the tiny checkpoint lends its tokenizer, chat template and processors (ids < any vocab here)
    from transformers import AutoProcessor

    tiny = make_checkpoint(workdir / "tokenizer", "tiny")
    base = ModelConfig.load(tiny, device=run.device, dtype=run.dtype, kernels=run.kernels)
    config = replace(base, text=TextConfig(**text), vision=dict(vision))
    processor = AutoProcessor.from_pretrained(tiny)
    model = random_language_model(config.text, run.device, run.dtype, config.kernels)
    defaults, stop_ids = generation_defaults(tiny)
    prompts = PromptBuilder(processor, config.image_token_id, config.spatial_merge_size)
    engine = Engine(config, model, prompts, processor.tokenizer, defaults, stop_ids, settings)
    # the encoder's processor and cache, its tower replaced by one of the benchmark's dims
    encoder = VisionEncoder(base, processor.image_processor)
    encoder.tower.model = random_vision_model(vision, run.device, run.dtype)
    encoder.config = encoder.tower.config = config
    return engine, encoder, f"random weights, {text['num_hidden_layers']} layers of Qwen3-VL-30B-A3B's dims"


# ----------------------------------------------------------------------------- measurements
def empty_features(engine: Engine) -> VisualFeatures:
    return VisualFeatures.empty(engine.config)


def prompt_of(engine: Engine, tokens: int, tag: str = "") -> str:
    """A text whose prompt (chat template included) is `tokens` long, or as near below as words allow."""
    def length(k):
        return len(engine.prepare(tag + " a" * k, empty_features(engine)).input_ids)
    k = max(0, tokens - length(0))
    while length(k + 1) <= tokens and k < 4 * tokens:  # a tokenizer may merge some of them
        k += 1
    while k > 0 and length(k) > tokens:
        k -= 1
    return tag + " a" * k


def add_running(engine: Engine, count: int, prompt_tokens: int, max_tokens: int) -> list:
    """`count` greedy requests, all prefilled (every one decoding from the next step, with room
    for `max_tokens` more; the first ones decode while the last ones prefill)."""
    seqs = []
    for i in range(count):
        seq = engine.new_sequence(prompt_of(engine, prompt_tokens, f"request {i}:"), empty_features(engine),
                                  engine.params(max_tokens=max_tokens + count, temperature=0.0, ignore_eos=True))
        engine.add(seq)
        seqs.append(seq)
    while any(s.prefilling for s in seqs):
        engine.step()
    return seqs


def drop(engine: Engine, seqs: list) -> None:
    for seq in seqs:
        seq.cancel_requested = True
    engine.step()


def timed_steps(engine: Engine, run: Run, steps: int, batch: int) -> float:
    """Seconds per Engine.step over `steps` pure-decode steps of `batch` sequences."""
    def go():
        for _ in range(steps):
            out = engine.step()
            assert out.num_seqs == batch and not out.failures, (out.num_seqs, out.failures)
    return run.timed(go)[1] / steps


def experts_hit(engine: Engine) -> list[int]:
    """Per MoE layer, the distinct experts the next step's tokens route to (one eager step, the
    router's ids counted; the graphs are put back after)."""
    counts: list[int] = []
    mlps = [layer.mlp for layer in engine.model.layers if hasattr(layer.mlp, "fused_moe")]
    originals = [mlp.fused_moe for mlp in mlps]
    for mlp, fn in zip(mlps, originals):
        mlp.fused_moe = (lambda x, w1, w2, tw, ti, *a, fn=fn, **k:
                         counts.append(int(ti.unique().numel())) or fn(x, w1, w2, tw, ti, *a, **k))
    decode, engine.runner.decode = engine.runner.decode, None
    try:
        engine.step()
    finally:
        engine.runner.decode = decode
        for mlp, fn in zip(mlps, originals):
            mlp.fused_moe = fn
    return counts


def step_bytes(engine: Engine, experts: list[int], batch: int, kv_tokens: int) -> int:
    """Bytes a decode step must read: every weight but the experts and the embedding table (its
    `batch` rows instead), the experts hit, the KV of `kv_tokens` context tokens."""
    cfg, model = engine.config.text, engine.model
    params = {id(p): (name, p) for name, p in model.named_parameters()}.values()
    element = model.embed_tokens.weight.element_size()
    dense = sum(p.numel() * p.element_size() for name, p in params if "experts" not in name and "embed_tokens" not in name)
    if model.lm_head.weight is model.embed_tokens.weight:  # tied: the head reads the whole table
        dense += model.lm_head.weight.numel() * element
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * element
    kv = kv_tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * element
    return dense + sum(experts) * expert + kv + batch * cfg.hidden_size * element


def copy_bandwidth(run: Run) -> float:
    """Bytes/s of a device-to-device copy (read + write), median of 10."""
    src = torch.empty(run.copy_bytes, dtype=torch.uint8, device=run.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [run.timed(lambda: dst.copy_(src))[1] for _ in range(10)]
    del src, dst
    return 2 * run.copy_bytes / statistics.median(times)


def bench_decode(engine: Engine, run: Run, bandwidth: float) -> list[dict]:
    rows = []
    for batch in DECODE_BATCHES:
        seqs = add_running(engine, batch, 128, run.warm_steps + run.decode_steps + 4)
        timed_steps(engine, run, run.warm_steps, batch)
        step_s = timed_steps(engine, run, run.decode_steps, batch)
        kv_tokens = sum(s.num_tokens for s in seqs)
        experts = experts_hit(engine)
        nbytes = step_bytes(engine, experts, batch, kv_tokens)
        floor_s = nbytes / bandwidth
        rows.append({"batch": batch, "step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s,
                     "floor_step_ms": 1e3 * floor_s, "floor_tokens_per_s": batch / floor_s,
                     "floor_ratio": floor_s / step_s, "step_gb": nbytes / 1e9,
                     "experts_per_layer": statistics.mean(experts) if experts else 0.0, "kv_tokens": kv_tokens})
        drop(engine, seqs)
    return rows


def bench_graph_vs_eager(engine: Engine, run: Run) -> dict:
    seqs = add_running(engine, 1, 128, 2 * (run.warm_steps + run.decode_steps) + 4)
    timed_steps(engine, run, run.warm_steps, 1)
    graph = timed_steps(engine, run, run.decode_steps, 1)
    decode, engine.runner.decode = engine.runner.decode, None
    try:
        timed_steps(engine, run, run.warm_steps, 1)
        eager = timed_steps(engine, run, run.decode_steps, 1)
    finally:
        engine.runner.decode = decode
    drop(engine, seqs)
    return {"graph_step_ms": 1e3 * graph, "eager_step_ms": 1e3 * eager, "eager_over_graph": eager / graph}


def sync_check(engine: Engine, run: Run) -> dict:
    """A decode step of 8 sequences (graph replay, inputs copied in) and the same step uncaptured,
    each under torch.cuda.set_sync_debug_mode("error"): 0 when nothing synced, else the error."""
    if run.smoke:
        return {"captured": "not run (CPU)", "uncaptured": "not run (CPU)"}
    seqs = add_running(engine, 8, 64, 8)
    batch = engine.scheduler.schedule()
    decode = engine.runner.decode
    size = decode.padded(len(batch))
    out = {}
    for name, fn in (("captured", lambda: decode.run_padded(batch)),
                     ("uncaptured", lambda: decode.hidden[:size].copy_(decode.forward(size)))):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.inference_mode():
                fn()
            out[name] = 0
        except RuntimeError as e:
            out[name] = f"{type(e).__name__}: {e}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    drop(engine, seqs)
    return out


def bench_prefill(engine: Engine, run: Run, tokens: int = 1024) -> dict:
    text = prompt_of(engine, tokens, "prefill:")
    n = len(engine.prepare(text, empty_features(engine)).input_ids)
    times = []
    for _ in range(1 + run.rounds):  # the first compiles this step's shapes
        seq = engine.new_sequence(text, empty_features(engine), engine.params(max_tokens=1, temperature=0.0))
        engine.add(seq)
        out, seconds = run.timed(engine.step)
        assert seq.finished and out.prefills[0].computed_tokens == n
        times.append(seconds)
    return {"prompt_tokens": n, "prefill_ms": 1e3 * statistics.median(times[1:])}


def bench_image_ttft(engine: Engine, encoder: VisionEncoder, run: Run) -> dict:
    rows = []
    for seed in range(1 + run.rounds):  # distinct images: no encoder cache hit; the first warms up
        image = noise_png(run.image_side, run.image_side, 100 + seed)
        start = time.perf_counter()
        features, encode_s = run.timed(lambda: encoder.encode([[image]])[0])
        seq = engine.new_sequence("Describe <image>.", features, engine.params(max_tokens=1, temperature=0.0))
        engine.add(seq)
        while not seq.output_ids:
            engine.step()
        run.sync()
        rows.append((time.perf_counter() - start, encode_s, features.visual_embeds.shape[0]))
        while not seq.finished:
            engine.step()
    ttft, encode_s, visual = (statistics.median(r[i] for r in rows[1:]) for i in range(3))
    return {"image": f"{run.image_side}x{run.image_side}", "visual_tokens": int(visual), "ttft_ms": 1e3 * ttft,
            "encode_ms": 1e3 * encode_s, "prefill_ms": 1e3 * (ttft - encode_s)}


def bench_vision(encoder: VisionEncoder, run: Run) -> dict:
    n, side = run.vision_images, run.vision_side
    times = []
    for r in range(1 + run.rounds):
        images = [noise_png(side, side, 1000 * r + i) for i in range(n)]
        features, seconds = run.timed(lambda: encoder.encode([images])[0])
        times.append(seconds)
    return {"images": n, "image": f"{side}x{side}", "visual_tokens_each": int(features.visual_embeds.shape[0]) // n,
            "encode_ms": 1e3 * statistics.median(times[1:]), "images_per_s": n / statistics.median(times[1:])}


# ----------------------------------------------------------------------------- report
def _prefill_row(p: dict) -> str:
    met = "met" if p["prefill_ms"] < PREFILL_TARGET_MS else "NOT met"
    return (f"| prefill, {p['prompt_tokens']} tokens (ms) | {p['prefill_ms']:.1f} | | | "
            f"< {PREFILL_TARGET_MS:.0f} ms: {met} |")


# the report's one-row parts: (result key, its row)
SINGLE_ROWS = (
    ("graphs", lambda g: f"| decode step at batch 1, eager / graph (ms) | {g['eager_step_ms']:.2f} / "
                         f"{g['graph_step_ms']:.2f} | | {g['eager_over_graph']:.2f}x | |"),
    ("syncs", lambda s: f"| host syncs in a decode step: captured / uncaptured | {s['captured']} / "
                        f"{s['uncaptured']} | | | 0 |"),
    ("prefill_1024", _prefill_row),
    ("image_ttft", lambda t: f"| image TTFT, {t['image']} ({t['visual_tokens']} visual tokens): all / encode / "
                             f"prefill (ms) | {t['ttft_ms']:.1f} / {t['encode_ms']:.1f} / {t['prefill_ms']:.1f} | | | |"),
    ("vision", lambda v: f"| vision tower, {v['images']} images of {v['image']} in one encode (images/s) | "
                         f"{v['images_per_s']:.1f} | | | |"),
)


def report(result: dict) -> str:
    """The markdown table of whatever parts ran (a part that failed: its error)."""
    lines = [f"## GPU check on {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"transformers {result['transformers']})", "",
             "Through qwen3vl's Engine in one process (scheduler, paged KV, kernels "
             f"{result.get('kernels', '?')}, pure-decode steps through the static-buffer path: "
             f"{'uncaptured on the CPU' if result['smoke'] else 'CUDA graphs'}). "
             f"Benchmarks: {result.get('model', '?')}.", ""]
    if result.get("parity"):
        lines += ["| parity | dtype | visual max abs | deepstack max abs | prefill logits rel err | decode logits rel "
                  "err (steps) | greedy tokens equal | graph = eager tokens | ours vs fp32 | transformers vs fp32 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["parity"]:
            lines.append(
                f"| {r['preset']} | {r['dtype']} | {r['visual_embeds_max_abs']:.2e} | {r['deepstack_max_abs']:.2e} | "
                f"{r['prefill_logits_rel_err']:.2e} | {r['decode_logits_rel_err']:.2e} ({r['logits_steps_compared']}) | "
                f"{r['greedy_tokens_equal']}/{r['greedy_tokens']} | {r['graph_tokens_equal_eager']} | "
                f"{r.get('ours_vs_fp32_rel_err', float('nan')):.2e} | "
                f"{r.get('transformers_vs_fp32_rel_err', float('nan')):.2e} |")
        lines.append("")
    lines += ["| measure | value | floor or bound | value / floor | target |", "|---|---|---|---|---|"]
    if "copy_gb_per_s" in result:
        lines.append(f"| device-to-device copy (GB/s, read + write) | {result['copy_gb_per_s']:.0f} | | | |")
    for r in result.get("decode", []):
        target = FLOOR_TARGETS.get(r["batch"])
        met = "" if target is None else f">= {target:.0%}: {'met' if r['floor_ratio'] >= target else 'NOT met'}"
        lines.append(f"| decode, batch {r['batch']} (tokens/s; {r['experts_per_layer']:.0f} experts/layer, "
                     f"{r['step_gb']:.1f} GB a step) | {r['tokens_per_s']:.1f} | {r['floor_tokens_per_s']:.1f} | "
                     f"{r['floor_ratio']:.1%} | {met} |")
    for key, row in SINGLE_ROWS:
        if key in result:
            lines.append(row(result[key]))
    for part, error in result.get("errors", {}).items():
        lines.append(f"| **{part} failed** | {error.splitlines()[-1][:200]} | | | |")
    return "\n".join(lines) + "\n"


PARTS = ("parity", "syncs", "decode", "graphs", "prefill", "image", "vision")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results", help="where gpu_check-<card>.json and .md go")
    ap.add_argument("--smoke", action="store_true", help="tiny dims on the CPU: checks the script, measures nothing")
    ap.add_argument("--checkpoint", help="benchmark this checkpoint's weights (default: random, the 30B's dims)")
    ap.add_argument("--layers", type=int, help="layers of the random model (default: 48, or as many as fit)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run (default: all of {','.join(PARTS)})")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    run = Run(args.smoke)
    if not run.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (--smoke runs the same code on the CPU)")
    import transformers
    import triton

    device = "cpu (smoke)" if run.smoke else torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "smoke": run.smoke, "errors": {}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = out_dir / f"gpu_check-{'cpu-smoke' if run.smoke else card_slug(device)}"
    work = Path(tempfile.mkdtemp())
    started = time.perf_counter()

    def part(key, fn):
        """Run one part; a failure is recorded and the check goes on (a GPU run is precious).
        The results so far are written after each part."""
        print(f"gpu_check: {key} ({time.perf_counter() - started:.0f} s)", flush=True)
        try:
            result[key] = fn()
        except Exception:  # noqa: BLE001 - reported in the results and the exit status
            result["errors"][key] = traceback.format_exc()
            print(result["errors"][key], file=sys.stderr, flush=True)
        finally:
            try:
                run.sync()
            except Exception:  # noqa: BLE001 - a sticky CUDA error: the next parts will say so
                pass
            result["seconds"] = time.perf_counter() - started
            name.with_suffix(".json").write_text(json.dumps(result, indent=1))

    if "parity" in parts:
        dtypes = [torch.float32] if run.smoke else [torch.float32, torch.bfloat16]
        presets = ("tiny",) if run.smoke else ("tiny", "small")
        part("parity", lambda: [parity(p, dt, run, work) for p in presets for dt in dtypes])
        if not run.smoke:
            torch.cuda.empty_cache()
    part("copy_gb_per_s", lambda: copy_bandwidth(run) / 1e9)
    built = {}

    def build(enforce_eager: bool) -> str:
        built["engine"] = bench_engine(run, work, args.checkpoint, args.layers, enforce_eager)
        return "eager" if enforce_eager else "graphs"

    part("engine", lambda: build(False))
    if not built:  # capture (or the engine) failed: the benchmarks run eager, the failure is reported
        part("engine_eager", lambda: build(True))
    if not built:
        raise SystemExit(f"gpu_check: no engine to benchmark; results so far in {name}.json")
    engine, encoder, result["model"] = built.pop("engine")
    result["kernels"] = engine.config.kernels
    if run.smoke:
        run.static_decode(engine)
    result["capture_s"] = engine.runner.decode.capture_seconds if engine.runner.decode else None
    bandwidth = result.get("copy_gb_per_s", float("nan")) * 1e9
    for key, fn in (("syncs", lambda: sync_check(engine, run)),
                    ("decode", lambda: bench_decode(engine, run, bandwidth)),
                    ("graphs", lambda: bench_graph_vs_eager(engine, run)),
                    ("prefill_1024", lambda: bench_prefill(engine, run)),
                    ("image_ttft", lambda: bench_image_ttft(engine, encoder, run)),
                    ("vision", lambda: bench_vision(encoder, run))):
        if key.split("_")[0] in parts:
            part(key, fn)
            for seq in [*engine.scheduler.running, *engine.scheduler.waiting]:  # what a failed part left
                seq.cancel_requested = True
            engine.step()
    table = report(result)
    name.with_suffix(".md").write_text(table)
    print("\n" + table)
    print(f"{name}.{{json,md}} written in {result['seconds']:.0f} s")
    if result["errors"]:
        raise SystemExit(f"gpu_check: failed parts: {', '.join(result['errors'])}")


if __name__ == "__main__":
    main()
