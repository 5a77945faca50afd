"""The random checkpoint generator: layout, determinism, and that transformers loads it like the release."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open

from qwen3vl.tools.make_checkpoint import SPECIAL_TOKENS, VOCAB_SIZE, main, make_checkpoint

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

E, H, I = 8, 64, 48   # tiny preset: experts, hidden, moe_intermediate (2I != H, I != H)
EXPERT = "model.language_model.layers.{}.mlp.experts.{}"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "hub": make_checkpoint(root / "hub", "tiny", seed=0, layout="hub"),
        "tf": make_checkpoint(root / "tf", "tiny", seed=0, layout="transformers"),
        "seed1": make_checkpoint(root / "seed1", "tiny", seed=1, layout="hub"),
    }


@pytest.fixture(scope="module")
def models(ckpts):
    from transformers import Qwen3VLMoeForConditionalGeneration

    out = {}
    for key in ("hub", "tf"):
        model, info = Qwen3VLMoeForConditionalGeneration.from_pretrained(
            ckpts[key], dtype=torch.float32, output_loading_info=True)
        out[key] = (model.eval(), info)
    return out


@pytest.fixture(scope="module")
def processor(ckpts):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ckpts["hub"])


def read(ckpt, name):
    shard = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(ckpt / shard, "pt") as f:
        return f.get_tensor(name)


def shards(ckpt):
    return sorted(ckpt.glob("model-*-of-*.safetensors"))


def test_files_index_and_config(ckpts):
    ckpt = ckpts["hub"]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = shards(ckpt)
    assert len(files) >= 2
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    total, names = 0, set()
    for f in files:
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                assert t.dtype == torch.bfloat16, k
                assert index["weight_map"][k] == f.name
                total += t.numel() * t.element_size()
                names.add(k)
    assert names == set(index["weight_map"]) and index["metadata"]["total_size"] == total
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in names} == {"model.visual", "model.language_model", "lm_head.weight"}

    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl_moe" and cfg["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    assert cfg["tie_word_embeddings"] is False and cfg["dtype"] == "bfloat16"
    tc, vc = cfg["text_config"], cfg["vision_config"]
    assert (tc["hidden_size"], tc["moe_intermediate_size"], tc["num_experts"], tc["num_experts_per_tok"]) == (H, I, E, 2)
    assert tc["num_hidden_layers"] == 4 and tc["head_dim"] == 32 and tc["norm_topk_prob"] is True
    for rope in (tc["rope_scaling"], tc["rope_parameters"]):
        assert rope["rope_type"] == "default" and rope["mrope_interleaved"] is True
        assert sum(rope["mrope_section"]) == tc["head_dim"] // 2
    assert tc["rope_theta"] == tc["rope_parameters"]["rope_theta"] == 5000000
    assert vc["out_hidden_size"] == H and vc["deepstack_visual_indexes"] == [1, 2, 3]
    assert (ckpt / "README.md").read_text().count("RANDOM") == 1


def test_tokenizer_special_ids_match_config(ckpts):
    from transformers import AutoTokenizer

    ckpt = ckpts["hub"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))   # Qwen's order, after the BPE vocab
    assert 1500 < ids[0] and ids[-1] < VOCAB_SIZE and len(tok) == ids[-1] + 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    cfg = json.loads((ckpt / "config.json").read_text())
    for key, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert cfg[key] == tok.convert_tokens_to_ids(token)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    text = "The red bicycle, 2024! naïve café 日本 <|im_start|>user\nhi<|im_end|>"
    enc = tok(text)["input_ids"]
    assert tok.decode(enc) == text and tok.convert_tokens_to_ids("<|im_start|>") in enc
    assert len(enc) < len(text.encode())   # BPE merges actually happen


def test_chat_template(processor):
    assert type(processor).__name__ == "Qwen3VLProcessor"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "video"}]},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n")
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


def image_inputs(processor, tmp_path, size=(200, 130)):
    path = tmp_path / "img.png"
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[Image.open(path)], return_tensors="pt")


def test_processor_expands_image_placeholder(processor, ckpts, tmp_path):
    inputs = image_inputs(processor, tmp_path)
    cfg = json.loads((ckpts["hub"] / "config.json").read_text())
    grid = inputs["image_grid_thw"]
    assert grid.shape == (1, 3) and grid[0, 0] == 1 and grid[0, 1] != grid[0, 2]
    ids = inputs["input_ids"][0]
    assert (ids == cfg["image_token_id"]).sum().item() == grid.prod().item() // 4
    assert (ids == cfg["vision_start_token_id"]).sum() == 1 and (ids == cfg["vision_end_token_id"]).sum() == 1
    assert inputs["pixel_values"].shape == (grid.prod().item(), 3 * 2 * 16 * 16)


def test_expert_layouts_on_disk(ckpts):
    for layer in range(4):
        gate_up = read(ckpts["hub"], EXPERT.format(layer, "gate_up_proj"))
        down = read(ckpts["hub"], EXPERT.format(layer, "down_proj"))
        assert gate_up.shape == (E, H, 2 * I) and down.shape == (E, I, H)
        assert torch.equal(read(ckpts["tf"], EXPERT.format(layer, "gate_up_proj")), gate_up.transpose(1, 2))
        assert torch.equal(read(ckpts["tf"], EXPERT.format(layer, "down_proj")), down.transpose(1, 2))
    assert read(ckpts["hub"], "model.language_model.layers.0.mlp.gate.weight").shape == (E, H)


def test_loads_without_missing_keys_and_layouts_agree(models, ckpts, processor, tmp_path):
    for key in ("hub", "tf"):
        info = models[key][1]
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (key, info)
    hub, tf = models["hub"][0], models["tf"][0]
    # the checkpoint's numbers really are the ones in memory (not a fresh init), in transformers' layout
    assert torch.equal(hub.lm_head.weight, read(ckpts["hub"], "lm_head.weight").float())
    experts = hub.model.language_model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape == (E, 2 * I, H)
    assert torch.equal(experts.gate_up_proj, read(ckpts["hub"], EXPERT.format(1, "gate_up_proj")).float().transpose(1, 2))
    hub_sd, tf_sd = hub.state_dict(), tf.state_dict()
    assert hub_sd.keys() == tf_sd.keys() and all(torch.equal(hub_sd[k], tf_sd[k]) for k in hub_sd)

    inputs = image_inputs(processor, tmp_path)
    with torch.no_grad():
        a, b = hub(**inputs).logits, tf(**inputs).logits
    assert torch.isfinite(a).all() and a.std() > 0.1
    assert torch.equal(a, b)


def test_greedy_generation_depends_on_prompt(models, processor):
    model = models["hub"][0]
    outs = []
    for prompt in ("Tell me about the weather today.", "What is two plus two?"):
        text = processor.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        new = seq[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(new) == 6 and max(new) < len(processor.tokenizer)   # padding ids never predicted
        outs.append(new)
    assert outs[0] != outs[1]
    assert len(set(outs[0] + outs[1])) > 2   # not one token repeated


def test_deterministic_per_seed_and_skip(ckpts, tmp_path):
    again = tmp_path / "again"
    main(["--out", str(again), "--preset", "tiny", "--seed", "0", "--layout", "hub"])
    ref = ckpts["hub"]
    for name in [f.name for f in shards(ref)] + ["tokenizer.json", "config.json", "model.safetensors.index.json"]:
        assert (again / name).read_bytes() == (ref / name).read_bytes(), name
    other = [f.read_bytes() for f in shards(ckpts["seed1"])]
    assert other != [f.read_bytes() for f in shards(ref)]
    name = EXPERT.format(2, "down_proj")
    assert not torch.equal(read(ref, name), read(ckpts["seed1"], name))
    # same seed, different name -> different numbers (seeded per tensor, not per call)
    assert not torch.equal(read(ref, EXPERT.format(0, "down_proj")), read(ref, EXPERT.format(1, "down_proj")))

    # same args again: skipped (files untouched); other args: rewritten in place
    stamps = {f: f.stat().st_mtime_ns for f in shards(again)}
    start = time.perf_counter()
    make_checkpoint(again, "tiny", seed=0, layout="hub")
    assert time.perf_counter() - start < 1.0
    assert {f: f.stat().st_mtime_ns for f in shards(again)} == stamps
    make_checkpoint(again, "tiny", seed=1, layout="hub")
    assert [f.read_bytes() for f in shards(again)] == other
    assert json.loads((again / ".random_checkpoint.json").read_text())["seed"] == 1
