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
import time
from pathlib import Path

import torch
from safetensors import safe_open

def weight_map(checkpoint: Path) -> dict[str, str]:
    """{tensor name: its shard's file name}, from the index or the single shard's header."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = checkpoint / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {k: single.name for k in f.keys()}
    raise FileNotFoundError(f"{checkpoint}: neither model.safetensors.index.json nor model.safetensors")


def _tensor_bytes(path: Path) -> dict[str, int]:
    """{tensor name: its bytes in the file}, from the shard's safetensors header alone."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g}"


def _print(line: str) -> None:
    # The server's log is the stub's stdout; logging's INFO goes nowhere there.
    print(line, flush=True)


def load_tensors(checkpoint: str | Path, prefixes: tuple[str, ...], dtype: torch.dtype,
                 device: str = "cpu", name: str = "", progress=_print) -> dict[str, torch.Tensor]:
    """{name without its matched prefix: tensor} for every checkpoint tensor under `prefixes`.

    Prints (`progress`) one line per shard with the bytes read so far out of the total, then
    once "<name>: loaded N GiB in S s" (N: the checkpoint's bytes read for these tensors)."""
    checkpoint = Path(checkpoint)
    name = name or ", ".join(prefixes)
    wanted: dict[str, list[str]] = {}
    for tensor, shard in weight_map(checkpoint).items():
        if tensor.startswith(prefixes):
            wanted.setdefault(shard, []).append(tensor)
    if not wanted:
        raise ValueError(f"{checkpoint}: no tensors under {prefixes}")
    sizes = {shard: _tensor_bytes(checkpoint / shard) for shard in wanted}
    total = sum(sizes[shard][t] for shard, tensors in wanted.items() for t in tensors)
    start, done, in_memory, out = time.perf_counter(), 0, 0, {}
    for i, (shard, tensors) in enumerate(sorted(wanted.items()), 1):
        with safe_open(checkpoint / shard, "pt", device="cpu") as f:
            for tensor in tensors:
                t = f.get_tensor(tensor)
                if t.is_floating_point():
                    t = t.to(dtype)
                t = t.to(device)
                in_memory += t.numel() * t.element_size()
                done += sizes[shard][tensor]
                prefix = next(p for p in prefixes if tensor.startswith(p))
                out[tensor[len(prefix):]] = t
        progress(f"{name}: shard {i}/{len(wanted)} {shard}: {len(tensors)} tensors, "
                 f"{_gib(done)}/{_gib(total)} GiB ({100 * done / max(total, 1):.0f}%), "
                 f"{time.perf_counter() - start:.1f} s")
    progress(f"{name}: loaded {_gib(total)} GiB in {time.perf_counter() - start:.1f} s "
             f"({len(wanted)} of the checkpoint's shards, {len(out)} tensors; {_gib(in_memory)} GiB as {dtype} "
             f"on {device})")
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
