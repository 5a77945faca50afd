"""Write a deterministic, randomly initialised Qwen3-VL-MoE checkpoint laid out like the release.

The directory mirrors Qwen/Qwen3-VL-30B-A3B-Instruct (config.json, sharded safetensors plus
index, tokenizer, chat template, processor configs, generation_config.json) so the serving stack
and transformers load it exactly as they would load the real model, but it is tiny and needs no
network. Every tensor is drawn from a generator seeded by (seed, hub tensor name): the weights do
not depend on module order, and the two expert layouts hold the very same numbers.

    qwen3vl-make-checkpoint --out DIR [--preset tiny|small] [--seed N] [--layout hub|transformers]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def write_weights(out: Path, config: dict, seed: int, layout: str, shard_bytes: int, n_tokens: int) -> None:
    tensors = {}
    for name, shape in hub_shapes(config).items():
        t = random_tensor(name, shape, seed)
        if name == "lm_head.weight":
            t[n_tokens:] = 0                     # padding ids past the tokenizer never win argmax
        if layout == "transformers" and name.endswith(FUSED_EXPERTS):
            t = t.transpose(1, 2).contiguous()   # hub [E, H, 2I]/[E, I, H] -> [E, 2I, H]/[E, H, I]
        tensors[name] = t
    write_shards(out, tensors, shard_bytes)


def write_shards(out: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> None:
    """Save {hub name: tensor} as bf16 safetensors shards (at least two, greedy in the given
    order, at most `shard_bytes` each where a tensor allows) plus model.safetensors.index.json."""
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in tensors.items()}
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


def make_checkpoint(out_dir, preset: str = "tiny", seed: int = 0, layout: str = "hub") -> Path:
    """Write (or reuse) the checkpoint for (preset, seed, layout) in out_dir; return its path."""
    if preset not in PRESETS or layout not in ("hub", "transformers"):
        raise ValueError(f"bad preset {preset!r} or layout {layout!r}")
    out = Path(out_dir)
    args = {"version": FORMAT_VERSION, "preset": preset, "seed": int(seed), "layout": layout}
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
    for fname, obj in configs.items():
        write_json(out / fname, obj)
    write_tokenizer_and_processor(out, tok, ids, PRESETS[preset].get("image_pixels", (65536, 16777216)))
    write_weights(out, configs["config.json"], int(seed), layout, PRESETS[preset]["shard_bytes"],
                  tok.get_vocab_size())
    (out / "README.md").write_text(
        f"# Random Qwen3-VL-MoE checkpoint ({preset}, seed {seed}, {layout} expert layout)\n\n"
        "Generated by `qwen3vl-make-checkpoint`. The weights are RANDOM: the layout, names, configs,\n"
        "tokenizer and chat template follow Qwen/Qwen3-VL-30B-A3B-Instruct, but the model knows\n"
        "nothing and its output is gibberish. For tests and benchmarks only.\n")
    write_json(marker, args)
    return out


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
                    help="the model's size: tiny (the tests'), small (benchmarks, load tests: the release's 128 "
                         "experts, top-8), shapes (the demo model's architecture) (default: tiny)")
    ap.add_argument("--seed", type=int, default=0, help="the random weights' seed: the same seed, the same bytes "
                                                         "(default: 0)")
    ap.add_argument("--layout", choices=["hub", "transformers"], default="hub",
                    help="fused expert layout: hub [E,H,2I]/[E,I,H] or transformers' [E,2I,H]/[E,H,I]")
    a = ap.parse_args(argv)
    out = make_checkpoint(a.out, a.preset, a.seed, a.layout)
    print(f"wrote {a.preset} checkpoint (seed {a.seed}, {a.layout} layout) to {out}")


if __name__ == "__main__":
    main()
