"""The prepared GPU check: bf16/fp32 parity on the GPU, and a benchmark on a real-size config.

    python bench/gpu_check.py --out DIR          # on a machine with a CUDA GPU (a few minutes)
    python bench/gpu_check.py --out DIR --smoke  # the same code paths on the CPU with tiny dims

Parity: our encoder (transformers' vision tower + the checkpoint's processor) and our decoder
against transformers' Qwen3VLMoeForConditionalGeneration on the generated tiny and small
checkpoints, in fp32 and bf16 on the GPU.
Benchmark: Qwen3-VL-30B-A3B text dims with random weights (no checkpoint needed):
  1. ours / transformers on an 8-layer slice, interleaved rounds, median of per-round ratios;
  2. ours on the full 48 layers: prefill latency and batch-1 decode tokens/s;
  3. the real-size vision tower on one image.
Prints one table and writes DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_backend"))

from qwen3vl.model.config import ModelConfig, TextConfig  # noqa: E402
from qwen3vl.engine.engine import Engine  # noqa: E402
from qwen3vl.tools.make_checkpoint import make_checkpoint  # noqa: E402
from qwen3vl.model.reference import StaticKVCache, prefill_logits  # noqa: E402
from qwen3vl.model.text import LanguageModel  # noqa: E402
from qwen3vl.encoder.encoder import VisionEncoder  # noqa: E402

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


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def noise_png(w, h, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- parity
def parity(preset, dtype, device, workdir):
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    ckpt = make_checkpoint(workdir / preset, preset)
    processor = AutoProcessor.from_pretrained(ckpt)
    ref = Qwen3VLMoeForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    config = ModelConfig.load(ckpt, device=device, dtype=dtype)
    engine, encoder = Engine.from_checkpoint(config), VisionEncoder(config, processor.image_processor)
    images = [noise_png(320, 200, 1), noise_png(120, 360, 2)]
    prompt = "Describe both pictures."
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(io.BytesIO(b)) for b in images], return_tensors="pt").to(device)
    features = encoder.encode([images])[0]
    with torch.no_grad():
        vis = ref.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        ref_logits = ref(**inputs).logits[0].float()
        ref_tokens = ref.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    logits = prefill_logits(engine, prompt, features)
    tokens = [t for s in engine.generate(prompt, features, engine.params(max_tokens=32, temperature=0.0))
              for t in s.token_ids]
    oracle = {}
    if dtype != torch.float32:
        # bf16 oracle: how far each bf16 implementation lands from the fp32 reference.
        ref32 = Qwen3VLMoeForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            truth = ref32(**inputs.to(device)).logits[0].float()
        del ref32
        oracle = {"ours_vs_fp32_rel_err": rel_err(logits, truth), "transformers_vs_fp32_rel_err": rel_err(ref_logits, truth)}
    same_prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens)))
    return {
        "preset": preset, "dtype": str(dtype).removeprefix("torch."),
        "visual_embeds_max_abs": float((torch.cat(vis.pooler_output) - features.visual_embeds).abs().max()),
        "deepstack_max_abs": max(float((torch.cat(a) - b).abs().max())
                                 for a, b in zip(vis.deepstack_features, features.deepstack_embeds)),
        "logits_rel_err": rel_err(logits, ref_logits),
        "logits_max_abs": float((logits - ref_logits).abs().max()),
        "argmax_agree": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        "greedy_tokens_equal_prefix": f"{same_prefix}/{len(ref_tokens)}", **oracle,
    }


# ----------------------------------------------------------------------------- benchmark
def random_language_model(cfg: TextConfig, device, dtype, seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LanguageModel(cfg)
    model = model.to(dtype).to_empty(device=device)  # never materialise fp32 copies of 60 GB
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.05 * torch.randn_like(p))
            else:
                fan_in = p.shape[-2] if "experts" in name else p.shape[-1]
                p.normal_(0, fan_in ** -0.5)
    from qwen3vl.model.text import MRoPE

    model.rotary = MRoPE(cfg).to(device)
    return model.eval()


def hf_copy(ours: LanguageModel, cfg: TextConfig, device, dtype):
    """transformers' model with the same weights (experts transposed to its layout)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                head_dim=cfg.head_dim, moe_intermediate_size=cfg.moe_intermediate_size,
                intermediate_size=cfg.intermediate_size, num_experts=cfg.num_experts,
                num_experts_per_tok=cfg.num_experts_per_tok, rms_norm_eps=cfg.rms_norm_eps,
                rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta,
                                     mrope_section=list(cfg.mrope_section), mrope_interleaved=True))
    config = Qwen3VLMoeConfig(text_config=text, vision_config=SMOKE_VISION, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(config)
    state = {}
    for k, v in ours.state_dict().items():
        if k.startswith("lm_head"):
            state[k] = v
        else:
            state["model.language_model." + k] = v.transpose(1, 2) if ".experts." in k else v
    model.load_state_dict(state, strict=False, assign=True)
    model.model.visual.to_empty(device=device)
    model.model.language_model.rotary_emb = type(model.model.language_model.rotary_emb)(config.text_config).to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


@torch.inference_mode()
def ours_generate(model: LanguageModel, ids: torch.Tensor, new_tokens: int):
    """The engine's model path (prefill, then batch-1 greedy decode), without detokenization."""
    cache = StaticKVCache.for_model(model, 1, ids.shape[1] + new_tokens)
    pos = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, 1, -1)
    logits = model(model.embed_rows(ids), pos, cache)
    out = []
    for _ in range(new_tokens):
        tok = logits[0, -1].argmax()
        out.append(tok)
        p = torch.full((3, 1, 1), cache.length, device=ids.device)
        logits = model(model.embed_rows(tok.view(1, 1)), p, cache)
    return torch.stack(out)


def bench_slice(text_cfg, device, dtype, layers, prompt_len, new_tokens, rounds):
    cfg = replace(text_cfg, num_hidden_layers=layers)
    ours = random_language_model(cfg, device, dtype)
    hf = hf_copy(ours, cfg, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    # warm-up both (allocator, kernels)
    ours_generate(ours, ids, 4)
    hf.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    rows = []
    for _ in range(rounds):
        _, ours_prefill = timed(lambda: ours_generate(ours, ids, 1), device)
        ours_tokens, ours_total = timed(lambda: ours_generate(ours, ids, new_tokens), device)
        _, hf_prefill = timed(lambda: hf.generate(input_ids=ids, max_new_tokens=1, do_sample=False), device)
        hf_out, hf_total = timed(lambda: hf.generate(input_ids=ids, max_new_tokens=new_tokens,
                                                     min_new_tokens=new_tokens, do_sample=False), device)
        agree = (ours_tokens.cpu() == hf_out[0, prompt_len:].cpu()).float().mean().item()
        rows.append(dict(ours_prefill_s=ours_prefill, hf_prefill_s=hf_prefill,
                         ours_decode_s_per_tok=(ours_total - ours_prefill) / (new_tokens - 1),
                         hf_decode_s_per_tok=(hf_total - hf_prefill) / (new_tokens - 1), token_agreement=agree))
    del ours, hf
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {
        "layers": layers, "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
        "prefill_ratio_ours_over_hf": statistics.median(r["ours_prefill_s"] / r["hf_prefill_s"] for r in rows),
        "decode_ratio_ours_over_hf": statistics.median(r["ours_decode_s_per_tok"] / r["hf_decode_s_per_tok"] for r in rows),
        "ours_prefill_ms": 1e3 * med("ours_prefill_s"), "hf_prefill_ms": 1e3 * med("hf_prefill_s"),
        "ours_decode_ms_per_token": 1e3 * med("ours_decode_s_per_tok"),
        "hf_decode_ms_per_token": 1e3 * med("hf_decode_s_per_tok"),
        "greedy_token_agreement": med("token_agreement"), "per_round": rows,
    }


def bench_full(text_cfg, device, dtype, prompt_len, new_tokens):
    model = random_language_model(text_cfg, device, dtype)
    ids = torch.randint(0, text_cfg.vocab_size, (1, prompt_len), device=device)
    ours_generate(model, ids, 4)
    _, prefill = timed(lambda: ours_generate(model, ids, 1), device)
    _, total = timed(lambda: ours_generate(model, ids, new_tokens), device)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    del model
    decode = (total - prefill) / (new_tokens - 1)
    return {"layers": text_cfg.num_hidden_layers, "weights_gib": weights_gib, "prompt_len": prompt_len,
            "prefill_ms": 1e3 * prefill, "decode_ms_per_token": 1e3 * decode, "decode_tokens_per_s": 1 / decode}


def bench_vision(vision_cfg, device, dtype, size, smoke):
    from transformers import AutoImageProcessor
    from transformers.models.qwen3_vl_moe import Qwen3VLMoeVisionConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    cfg = Qwen3VLMoeVisionConfig(**vision_cfg)
    cfg._attn_implementation = "sdpa"
    model = Qwen3VLMoeVisionModel._from_config(cfg).to(device, dtype).eval()
    processor = AutoImageProcessor.from_pretrained(make_checkpoint(Path(tempfile.mkdtemp()) / "t", "tiny"))
    image = Image.open(io.BytesIO(noise_png(size, size, 3)))
    (inputs), pre_s = timed(lambda: processor(images=[image], return_tensors="pt"), "cpu")
    px, grid = inputs["pixel_values"].to(device, dtype), inputs["image_grid_thw"].to(device)
    with torch.inference_mode():
        model(px, grid_thw=grid)
        times = [timed(lambda: model(px, grid_thw=grid), device)[1] for _ in range(3 if smoke else 5)]
    return {"image": f"{size}x{size}", "visual_tokens": int(grid.prod()) // 4, "preprocess_ms": 1e3 * pre_s,
            "vision_forward_ms": 1e3 * statistics.median(times)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--smoke", action="store_true", help="tiny dims on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
              "torch": torch.__version__, "smoke": args.smoke}
    import transformers
    result["transformers"] = transformers.__version__
    work = Path(tempfile.mkdtemp())
    dtypes = [torch.float32] if args.smoke else [torch.float32, torch.bfloat16]
    result["parity"] = [parity(p, dt, device, work) for p in ("tiny", "small") for dt in dtypes]
    print(json.dumps(result["parity"], indent=1), flush=True)
    text_cfg = TextConfig(**(SMOKE_TEXT if args.smoke else REAL_TEXT))
    bdtype = torch.float32 if args.smoke else torch.bfloat16
    result["slice_vs_transformers"] = bench_slice(text_cfg, device, bdtype, layers=2 if args.smoke else 8,
                                                  prompt_len=64 if args.smoke else 1024,
                                                  new_tokens=8 if args.smoke else 64, rounds=3)
    print(json.dumps({k: v for k, v in result["slice_vs_transformers"].items() if k != "per_round"}, indent=1), flush=True)
    if not args.smoke:
        torch.cuda.empty_cache()
    result["full_model"] = bench_full(text_cfg, device, bdtype, prompt_len=64 if args.smoke else 1024,
                                      new_tokens=8 if args.smoke else 64)
    print(json.dumps(result["full_model"], indent=1), flush=True)
    if not args.smoke:
        torch.cuda.empty_cache()
    vcfg = SMOKE_VISION if args.smoke else REAL_VISION
    result["vision"] = [bench_vision(vcfg, device, bdtype, s, args.smoke) for s in ((64,) if args.smoke else (448, 1024))]
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1))

    print(f"\n## GPU check on {result['device']} (torch {result['torch']}, transformers {result['transformers']})\n")
    print("| parity | dtype | visual max abs | deepstack max abs | logits rel err | argmax agree | greedy prefix "
          "| ours vs fp32 | transformers vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["parity"]:
        print(f"| {r['preset']} | {r['dtype']} | {r['visual_embeds_max_abs']:.2e} | {r['deepstack_max_abs']:.2e} | "
              f"{r['logits_rel_err']:.2e} | {r['argmax_agree']:.3f} | {r['greedy_tokens_equal_prefix']} | "
              f"{r.get('ours_vs_fp32_rel_err', float('nan')):.2e} | {r.get('transformers_vs_fp32_rel_err', float('nan')):.2e} |")
    s, f = result["slice_vs_transformers"], result["full_model"]
    print("\n| benchmark (30B-A3B dims, random weights, bf16) | ours | transformers | ours/transformers |")
    print("|---|---|---|---|")
    print(f"| {s['layers']}-layer slice, prefill {s['prompt_len']} tokens (ms) | {s['ours_prefill_ms']:.1f} | "
          f"{s['hf_prefill_ms']:.1f} | {s['prefill_ratio_ours_over_hf']:.3f} |")
    print(f"| {s['layers']}-layer slice, decode (ms/token, batch 1) | {s['ours_decode_ms_per_token']:.2f} | "
          f"{s['hf_decode_ms_per_token']:.2f} | {s['decode_ratio_ours_over_hf']:.3f} |")
    print(f"| full {f['layers']} layers ({f['weights_gib']:.1f} GiB), prefill {f['prompt_len']} tokens (ms) | "
          f"{f['prefill_ms']:.1f} | | |")
    print(f"| full {f['layers']} layers, decode (tokens/s, batch 1) | {f['decode_tokens_per_s']:.1f} | | |")
    for v in result["vision"]:
        print(f"| vision tower, {v['image']} ({v['visual_tokens']} tokens): preprocess / forward (ms) | "
              f"{v['preprocess_ms']:.1f} / {v['vision_forward_ms']:.1f} | | |")


if __name__ == "__main__":
    main()
