"""Write a deterministic, randomly initialised Qwen3-VL-MoE checkpoint laid out like the release.

The directory mirrors Qwen/Qwen3-VL-30B-A3B-Instruct (config.json, sharded safetensors plus
index, tokenizer, chat template, processor configs, generation_config.json) so the serving stack
and transformers load it exactly as they would load the real model, but it is tiny and needs no
network. Every tensor is drawn from a generator seeded by (seed, hub tensor name): the weights do
not depend on module order, and the two expert layouts hold the very same numbers.

    qwen3vl-make-checkpoint --out DIR [--preset tiny|small] [--seed N] [--layout hub|transformers]
    qwen3vl-make-checkpoint --out DIR --fp8 [--fp8-vision] [--layout per-expert|hub|transformers]
    qwen3vl-make-checkpoint --out DIR --quantize SRC [--fp8-vision] [--layout ...]

`--fp8` writes the same weights (rounded to bf16, as the plain checkpoint stores them) as Qwen's
FP8 releases store theirs: block-quantized Linear weights with their scales, experts per expert,
the config's quantization_config (tools/fp8_checkpoint.py); `--quantize SRC` does that to any of
our checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.checkpoint import fuse_per_expert, to_hub_expert_layout, weight_map
from .fp8_checkpoint import EXPERT_LAYOUTS, fp8_tensors, quantization_config

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MARKER = ".random_checkpoint.json"   # written last: its presence means "complete"
FORMAT_VERSION = 1                   # bump when the output for the same args changes
VOCAB_SIZE = 2048                    # config vocab, padded past the tokenizer like the release's
BPE_VOCAB = 2000                     # byte-level BPE size; the special tokens follow it

# Qwen's special tokens, in Qwen's id order (151643.. in the release, BPE_VOCAB.. here).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split; transformers' Qwen2Tokenizer rebuilds this same pipeline.
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Dims chosen so that 2I != H and I != H: a transposed expert tensor can never load silently.
PRESETS = {
    "tiny": dict(  # unit tests: ~1.4 MB of weights
        text=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=128, moe_intermediate_size=48, num_experts=8,
                  num_experts_per_tok=2, mrope_section=[6, 5, 5]),
        vision=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64,
                    num_position_embeddings=64, deepstack_visual_indexes=[1, 2, 3]),
        shard_bytes=1 << 20),
    "tiny-kv1": dict(  # tensor-parallel tests: one KV head, so 2 ranks replicate it; 8 experts split 4 + 4
        text=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=32, intermediate_size=128, moe_intermediate_size=48, num_experts=8,
                  num_experts_per_tok=2, mrope_section=[6, 5, 5]),
        vision=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64,
                    num_position_embeddings=64, deepstack_visual_indexes=[1, 2, 3]),
        shard_bytes=1 << 20),
    "tiny-fp8tp": dict(  # native FP8 under 2-way tensor parallel: every split dim is 2 x 128 (whole scale blocks)
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=128, intermediate_size=256, moe_intermediate_size=256, num_experts=4,
                  num_experts_per_tok=2, mrope_section=[24, 20, 20]),
        vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                    num_position_embeddings=64, deepstack_visual_indexes=[1]),
        bpe_vocab=512, vocab_size=576, shard_bytes=1 << 20),
    "small": dict(  # benchmarks: the release's 128 experts / top-8, ~270 MB in bf16
        text=dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=64, intermediate_size=512, moe_intermediate_size=96, num_experts=128,
                  num_experts_per_tok=8, mrope_section=[12, 10, 10]),
        vision=dict(depth=8, hidden_size=256, num_heads=4, intermediate_size=1024,
                    num_position_embeddings=2304, deepstack_visual_indexes=[1, 3, 5]),
        shard_bytes=100 << 20),
    "shapes": dict(  # the demo model qwen3vl-train-demo trains (8 experts / top-2), a few MB in bf16
        text=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=256, moe_intermediate_size=96, num_experts=8,
                  num_experts_per_tok=2, mrope_section=[6, 5, 5]),
        vision=dict(depth=4, hidden_size=96, num_heads=4, intermediate_size=192,
                    num_position_embeddings=576, deepstack_visual_indexes=[1, 2, 3]),
        bpe_vocab=512, vocab_size=576,
        # Pictures of 96-320 pixels a side are resized to 160^2..240^2 pixels: 100..225 patches,
        # 25..56 visual tokens each; a shape of 20 % of a square picture's side covers 2 patches.
        image_pixels=(160 * 160, 240 * 240),
        shard_bytes=2 << 20),
}


def build_tokenizer(texts=None, vocab_size: int = BPE_VOCAB):
    """Byte-level BPE trained on `texts` (an iterable of str; default: the shipped corpus), with
    `vocab_size` entries, then Qwen's special tokens appended."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if texts is None:
        tok.train([str(ASSETS / "corpus.txt")], trainer)
    else:
        tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok, {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def hf_configs(preset: str, ids: dict[str, int]) -> dict[str, dict]:
    """config.json / generation_config.json as the release writes them (key names included)."""
    p = PRESETS[preset]
    t, v = dict(p["text"]), dict(p["vision"])
    rope = {"mrope_interleaved": True, "mrope_section": t.pop("mrope_section"), "rope_type": "default"}
    text_config = dict(
        attention_bias=False, attention_dropout=0.0, bos_token_id=ids["<|endoftext|>"],
        decoder_sparse_step=1, dtype="bfloat16", eos_token_id=ids["<|im_end|>"], hidden_act="silu",
        initializer_range=0.02, max_position_embeddings=262144, mlp_only_layers=[],
        model_type="qwen3_vl_moe_text", norm_topk_prob=True, rms_norm_eps=1e-6,
        # The release writes `rope_scaling` + `rope_theta` (transformers 4.57); transformers 5
        # reads those and itself writes `rope_parameters` (theta inside). Write both, same values.
        rope_scaling=rope, rope_theta=5000000, rope_parameters={**rope, "rope_theta": 5000000},
        use_cache=True, vocab_size=p.get("vocab_size", VOCAB_SIZE), **t)
    vision_config = dict(
        hidden_act="gelu_pytorch_tanh", in_channels=3, initializer_range=0.02,
        model_type="qwen3_vl_moe",  # sic: the release's vision_config says this; transformers fixes it up
        out_hidden_size=t["hidden_size"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2, **v)
    config = dict(
        architectures=["Qwen3VLMoeForConditionalGeneration"], dtype="bfloat16",
        image_token_id=ids["<|image_pad|>"], model_type="qwen3_vl_moe",
        text_config=dict(sorted(text_config.items())), tie_word_embeddings=False,
        transformers_version="4.57.0.dev0", video_token_id=ids["<|video_pad|>"],
        vision_config=dict(sorted(vision_config.items())),
        vision_end_token_id=ids["<|vision_end|>"], vision_start_token_id=ids["<|vision_start|>"])
    generation = dict(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                      eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True,
                      top_k=20, top_p=0.8, repetition_penalty=1.0, temperature=0.7)
    return {"config.json": config, "generation_config.json": generation}


# The fused expert tensors: the hub stores them [E, in, out] ([E, H, 2I], [E, I, H]); transformers
# holds them in memory as [E, out, in].
FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def hub_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{hub tensor name: hub shape}, read off a meta-device transformers model (no memory used)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**config))
    shapes = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith(FUSED_EXPERTS):
            shape = (shape[0], shape[2], shape[1])   # in-memory [E, out, in] -> hub [E, in, out]
        shapes[name] = shape
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor that depends only on (seed, name, shape), scaled so activations stay O(1)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name:
        return 1.0 + 0.05 * x                    # RMSNorm/LayerNorm gains ~1
    if name.endswith(".bias"):
        return 0.02 * x
    if name.endswith("embed_tokens.weight"):
        return x                                 # token embeddings ~N(0,1), like merger outputs
    if name.endswith("pos_embed.weight"):
        return 0.5 * x
    if name.endswith(FUSED_EXPERTS):
        fan_in = shape[1]                        # hub layout [E, in, out]
    else:
        fan_in = math.prod(shape[1:])            # Linear [out, in], Conv3d [out, C, T, P, P]
    return x / math.sqrt(fan_in)                 # outputs ~unit variance for unit inputs


def write_weights(out: Path, config: dict, seed: int, layout: str, shard_bytes: int, n_tokens: int,
                  fp8: bool = False, fp8_vision: bool = False) -> None:
    """The random weights of `config` as shards in `layout`; with `fp8`, block-quantized as the
    FP8 release stores them (fp8_tensors; the vision blocks too with `fp8_vision`)."""
    tensors = {}
    for name, shape in hub_shapes(config).items():
        t = random_tensor(name, shape, seed)
        if name == "lm_head.weight":
            t[n_tokens:] = 0                     # padding ids past the tokenizer never win argmax
        if layout == "transformers" and name.endswith(FUSED_EXPERTS) and not fp8:
            t = t.transpose(1, 2).contiguous()   # hub [E, H, 2I]/[E, I, H] -> [E, 2I, H]/[E, H, I]
        tensors[name] = t
    if fp8:
        # quantize what the plain checkpoint of the same seed holds: its bf16 values
        tensors = fp8_tensors({k: v.to(torch.bfloat16) for k, v in tensors.items()}, layout, fp8_vision)
        write_shards(out, tensors, shard_bytes, dtype=None)
    else:
        write_shards(out, tensors, shard_bytes)


def write_shards(out: Path, tensors: dict[str, torch.Tensor], shard_bytes: int,
                 dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Save {hub name: tensor} as safetensors shards in `dtype` (None: each tensor's own, e.g.
    FP8 weights beside fp32 scales; at least two shards, greedy in the given order, at most
    `shard_bytes` each where a tensor allows) plus model.safetensors.index.json."""
    tensors = {k: (v.detach() if dtype is None else v.detach().to(dtype)).contiguous() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shard_bytes = min(shard_bytes, math.ceil(total / 2))   # always >= 2 shards, like the release
    shards, size = [[]], 0
    for name, t in tensors.items():                         # greedy, in module order
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic(out / fname, lambda p, n=names: save_file({k: tensors[k] for k in n}, p, metadata={"format": "pt"}))
        weight_map.update({k: fname for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out / "model.safetensors.index.json", index)


def write_tokenizer_and_processor(out: Path, tok, ids: dict[str, int],
                                  image_pixels: tuple[int, int] = (65536, 16777216)) -> None:
    """tokenizer.json/tokenizer_config.json/chat_template.json and the processor configs;
    `image_pixels` = (min, max) pixels an image is resized into (the processor's `size`)."""
    template = (ASSETS / "chat_template.jinja").read_text().rstrip("\n")
    _atomic(out / "tokenizer.json", lambda p: tok.save(str(p)))
    write_json(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for t, i in ids.items()},
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        "chat_template": template, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 262144, "pad_token": "<|endoftext|>",
        "processor_class": "Qwen3VLProcessor", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    # The release ships the template as chat_template.json; transformers reads it for the processor.
    write_json(out / "chat_template.json", {"chat_template": template})
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
              "processor_class": "Qwen3VLProcessor"}
    write_json(out / "preprocessor_config.json", {
        "size": {"longest_edge": image_pixels[1], "shortest_edge": image_pixels[0]}, **common,
        "image_processor_type": "Qwen2VLImageProcessorFast"})
    write_json(out / "video_preprocessor_config.json", {
        "size": {"longest_edge": 25165824, "shortest_edge": 4096}, **common,
        "video_processor_type": "Qwen3VLVideoProcessor"})


def make_checkpoint(out_dir, preset: str = "tiny", seed: int = 0, layout: str | None = None, fp8: bool = False,
                    fp8_vision: bool = False) -> Path:
    """Write (or reuse) the checkpoint for (preset, seed, layout, fp8) in out_dir; return its path.

    layout: the experts' layout, `hub` or `transformers` (fused), or with fp8 also `per-expert`
    (None: per-expert with fp8, like the release; else hub). fp8: the Linear weights
    block-quantized as Qwen's FP8 releases store them (tools/fp8_checkpoint.py), the vision
    blocks' too with fp8_vision. Raises ValueError for an unknown preset or layout."""
    layout = layout or ("per-expert" if fp8 else "hub")
    if preset not in PRESETS or layout not in (EXPERT_LAYOUTS if fp8 else ("hub", "transformers")):
        raise ValueError(f"bad preset {preset!r} or layout {layout!r}" + ("" if fp8 else " (per-expert needs fp8)"))
    out = Path(out_dir)
    args = {"version": FORMAT_VERSION, "preset": preset, "seed": int(seed), "layout": layout}
    if fp8:
        args.update(fp8=True, fp8_vision=bool(fp8_vision))
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == args:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        if all((out / f).is_file() for f in set(index["weight_map"].values())):
            return out                       # already complete with the same args
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)           # incomplete until the end
    for old in out.glob("model-*-of-*.safetensors"):
        old.unlink()                         # another preset may have had more shards

    tok, ids = build_tokenizer(vocab_size=PRESETS[preset].get("bpe_vocab", BPE_VOCAB))
    configs = hf_configs(preset, ids)
    if fp8:
        configs["config.json"]["quantization_config"] = quantization_config(
            configs["config.json"]["text_config"]["num_hidden_layers"], fp8_vision)
    for fname, obj in configs.items():
        write_json(out / fname, obj)
    write_tokenizer_and_processor(out, tok, ids, PRESETS[preset].get("image_pixels", (65536, 16777216)))
    write_weights(out, configs["config.json"], int(seed), layout, PRESETS[preset]["shard_bytes"],
                  tok.get_vocab_size(), fp8, fp8_vision)
    kind = "FP8 (block-quantized) " if fp8 else ""
    (out / "README.md").write_text(
        f"# Random {kind}Qwen3-VL-MoE checkpoint ({preset}, seed {seed}, {layout} expert layout)\n\n"
        "Generated by `qwen3vl-make-checkpoint`. The weights are RANDOM: the layout, names, configs,\n"
        "tokenizer and chat template follow Qwen/Qwen3-VL-30B-A3B-Instruct, but the model knows\n"
        "nothing and its output is gibberish. For tests and benchmarks only.\n")
    write_json(marker, args)
    return out


def quantize_fp8(src, dst, layout: str = "per-expert", vision: bool = False,
                 scale_dtype: torch.dtype = torch.float32) -> Path:
    """Write checkpoint `src` (any of ours: fused experts in either layout, bf16 or fp32) to `dst`
    as Qwen's FP8 release stores its weights: Linear weights block-quantized with their
    `_scale_inv` (scale_dtype: fp32 or bf16), experts in `layout` (EXPERT_LAYOUTS), the vision
    blocks quantized too with `vision`, config.json's quantization_config added, the index
    rewritten, every other file (tokenizer, processor configs) copied. Returns dst. Raises
    ValueError when src is FP8 already or its expert tensors fit no layout."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src}: config.json has a quantization_config already")
    text = config["text_config"]
    experts = text.get("num_experts", text.get("num_local_experts"))
    tensors = {}
    for shard in sorted(set(weight_map(src).values())):
        with safe_open(src / shard, "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    tensors = fuse_per_expert(tensors, experts, text["hidden_size"], text["moe_intermediate_size"])
    tensors = {k: to_hub_expert_layout(k, v, text["hidden_size"], text["moe_intermediate_size"])
               for k, v in tensors.items()}
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.glob("model*.safetensors"):
        old.unlink()
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(("model.safetensors", "model-", ".")):
            _atomic(dst / f.name, lambda p, f=f: p.write_bytes(f.read_bytes()))
    config["quantization_config"] = quantization_config(text["num_hidden_layers"], vision)
    write_json(dst / "config.json", config)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_shards(dst, fp8_tensors(tensors, layout, vision, scale_dtype), max(1, total // 4), dtype=None)
    return dst


def _atomic(path: Path, write) -> None:
    """write(tmp_path), then rename over path: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.chmod(tmp, 0o644)                 # safetensors creates files 0600
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """`obj` as indented UTF-8 JSON at `path`, atomically (the checkpoint's configs)."""
    _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="qwen3vl-make-checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="the model's size: tiny (the tests'), tiny-kv1 (tiny with one KV head: tensor-parallel "
                         "tests of KV replication), tiny-fp8tp (with --fp8: native FP8 at 2 ranks, every split "
                         "dim 2 x 128), small (benchmarks, load tests: the release's 128 "
                         "experts, top-8), shapes (the demo model's architecture) (default: tiny)")
    ap.add_argument("--seed", type=int, default=0, help="the random weights' seed: the same seed, the same bytes "
                                                         "(default: 0)")
    ap.add_argument("--layout", choices=list(EXPERT_LAYOUTS), default=None,
                    help="expert layout: fused hub [E,H,2I]/[E,I,H] or transformers' [E,2I,H]/[E,H,I], or "
                         "per-expert [out,in] (FP8 only; its default, like the release); default hub")
    ap.add_argument("--fp8", action="store_true",
                    help="block-quantized FP8 weights as Qwen's FP8 releases store them (128x128 scales)")
    ap.add_argument("--fp8-vision", action="store_true", help="with --fp8 or --quantize: the vision blocks too")
    ap.add_argument("--quantize", metavar="SRC", help="write checkpoint SRC as FP8 instead of a random one")
    a = ap.parse_args(argv)
    if a.quantize:
        out = quantize_fp8(a.quantize, a.out, a.layout or "per-expert", a.fp8_vision)
        print(f"wrote {a.quantize} as FP8 ({a.layout or 'per-expert'} experts) to {out}")
        return
    out = make_checkpoint(a.out, a.preset, a.seed, a.layout, a.fp8, a.fp8_vision)
    print(f"wrote {a.preset} {'FP8 ' if a.fp8 else ''}checkpoint (seed {a.seed}) to {out}")


if __name__ == "__main__":
    main()
