"""`qwen3vl-sizing`: what a checkpoint needs, read from its config.json and safetensors headers
(nothing is loaded): weights per server role, KV cache bytes per token, E->L bytes per visual
token, and what those come to for a context and an image."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..model.checkpoint import weight_map
from ..model.config import ModelConfig

LANGUAGE_PREFIXES = ("model.language_model.", "lm_head.")
VISION_PREFIXES = ("model.visual.",)


@dataclass
class Sizing:
    dtype: str
    language_params: int
    vision_params: int
    language_weight_bytes: int          # in the serving dtype
    vision_weight_bytes: int
    kv_bytes_per_token: int             # 2 (K, V) x layers x KV heads x head dim x dtype bytes
    e2l_bytes_per_visual_token: int     # (1 + deepstack layers) x hidden x dtype bytes
    max_position_embeddings: int

    def kv_bytes(self, tokens: int) -> int:
        return self.kv_bytes_per_token * tokens

    def e2l_bytes(self, visual_tokens: int) -> int:
        return self.e2l_bytes_per_visual_token * visual_tokens


def _params(checkpoint: Path, prefixes: tuple[str, ...]) -> int:
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map(checkpoint).items():
        if name.startswith(prefixes):
            shards.setdefault(shard, []).append(name)
    total = 0
    for shard, names in shards.items():
        with open(checkpoint / shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(header[n]["shape"]) for n in names)
    return total


def sizing(checkpoint: str | Path, dtype: str = "bfloat16") -> Sizing:
    checkpoint = Path(checkpoint)
    config = ModelConfig.load(checkpoint, device="cpu", dtype=dtype)
    element = torch.empty((), dtype=config.dtype).element_size()
    t = config.text
    language, vision = _params(checkpoint, LANGUAGE_PREFIXES), _params(checkpoint, VISION_PREFIXES)
    return Sizing(
        dtype=str(config.dtype).removeprefix("torch."),
        language_params=language, vision_params=vision,
        language_weight_bytes=language * element, vision_weight_bytes=vision * element,
        kv_bytes_per_token=2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * element,
        e2l_bytes_per_visual_token=(1 + config.deepstack_layers) * config.visual_hidden_size * element,
        max_position_embeddings=t.max_position_embeddings,
    )


def _b(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qwen3vl-sizing", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the checkpoint directory (config.json, safetensors)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="the dtype the servers run in (default: bfloat16)")
    p.add_argument("--context", type=int, default=4096, help="tokens of one sequence, for its KV bytes")
    p.add_argument("--visual-tokens", type=int, default=1024,
                   help="visual tokens of one image (1024 for a 1024x1024 image), for its E->L bytes")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    s = sizing(args.checkpoint, args.dtype)
    if args.json:
        print(json.dumps(asdict(s)))
        return 0
    print(f"{args.checkpoint} in {s.dtype}:")
    print(f"  language model weights  {_b(s.language_weight_bytes)} ({s.language_params / 1e9:.3g} B params): "
          f"language and aggregated servers")
    print(f"  vision tower weights    {_b(s.vision_weight_bytes)} ({s.vision_params / 1e9:.3g} B params): "
          f"encoder and aggregated servers")
    print(f"  KV cache per token      {_b(s.kv_bytes_per_token)}; a {args.context}-token sequence "
          f"{_b(s.kv_bytes(args.context))}")
    print(f"  E->L per visual token   {_b(s.e2l_bytes_per_visual_token)}; an image of {args.visual_tokens} "
          f"visual tokens {_b(s.e2l_bytes(args.visual_tokens))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
