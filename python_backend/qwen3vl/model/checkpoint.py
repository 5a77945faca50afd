"""Read the tensors a server needs from a sharded safetensors checkpoint.

Only the shards holding the requested prefixes are opened (an encoder server reads
`model.visual.*`, a language server `model.language_model.*` and `lm_head.*`).
Fused MoE experts come in two layouts, told apart by shape (the generator and the tests use
dims where 2I != H and I != H, so a transposed tensor cannot pass by accident):

    hub (released checkpoints):   gate_up_proj [E, H, 2I]   down_proj [E, I, H]
    transformers (in memory):     gate_up_proj [E, 2I, H]   down_proj [E, H, I]

We keep the hub layout in memory: `x @ W` then needs no transpose.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


def _weight_map(checkpoint: Path) -> dict[str, str]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = checkpoint / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {k: single.name for k in f.keys()}
    raise FileNotFoundError(f"{checkpoint}: neither model.safetensors.index.json nor model.safetensors")


def load_tensors(checkpoint: str | Path, prefixes: tuple[str, ...], dtype: torch.dtype,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    """{name without its matched prefix: tensor} for every checkpoint tensor under `prefixes`."""
    checkpoint = Path(checkpoint)
    wanted: dict[str, list[str]] = {}
    for name, shard in _weight_map(checkpoint).items():
        if name.startswith(prefixes):
            wanted.setdefault(shard, []).append(name)
    if not wanted:
        raise ValueError(f"{checkpoint}: no tensors under {prefixes}")
    start, nbytes, out = time.perf_counter(), 0, {}
    for i, (shard, names) in enumerate(sorted(wanted.items()), 1):
        with safe_open(checkpoint / shard, "pt", device="cpu") as f:
            for name in names:
                t = f.get_tensor(name)
                if t.is_floating_point():
                    t = t.to(dtype)
                t = t.to(device)
                nbytes += t.numel() * t.element_size()
                prefix = next(p for p in prefixes if name.startswith(p))
                out[name[len(prefix):]] = t
        log.info("shard %d/%d %s: %d tensors", i, len(wanted), shard, len(names))
    log.info("loaded %.2f GiB (%s) in %.1f s", nbytes / 2**30, ", ".join(prefixes), time.perf_counter() - start)
    return out


def to_hub_expert_layout(name: str, t: torch.Tensor, hidden: int, inter: int) -> torch.Tensor:
    """Return a fused expert tensor in hub layout, whichever layout the checkpoint used."""
    if name.endswith("experts.gate_up_proj"):
        hub, other = (hidden, 2 * inter), (2 * inter, hidden)
    elif name.endswith("experts.down_proj"):
        hub, other = (inter, hidden), (hidden, inter)
    else:
        return t
    if tuple(t.shape[1:]) == hub:
        return t
    if tuple(t.shape[1:]) == other:
        return t.transpose(1, 2).contiguous()
    raise ValueError(f"{name}: shape {tuple(t.shape)} fits neither expert layout {hub} nor {other}")
