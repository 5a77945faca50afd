"""Read the tensors a server needs from a sharded safetensors checkpoint.

Only the shards holding the requested prefixes are opened (an encoder server reads
`model.visual.*`, a language server `model.language_model.*` and `lm_head.*`).
MoE experts come in three layouts; the fused two are told apart by shape (the generator and
the tests use dims where 2I != H and I != H, so a transposed tensor cannot pass by accident):

    hub (released bf16 checkpoints):  gate_up_proj [E, H, 2I]   down_proj [E, I, H]
    transformers (in memory):         gate_up_proj [E, 2I, H]   down_proj [E, H, I]
    per expert (released FP8):        experts.{e}.gate_proj.weight [I, H], up_proj [I, H],
                                      down_proj [H, I]  (nn.Linear's [out, in])

We keep the hub layout in memory: `x @ W` then needs no transpose. FP8 tensors (model/fp8.py)
are dequantized as they are read, each in its own stored layout, before any of this.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..kernels.fp8_reference import dequantize_block_fp8
from ..parallel.shard import FP8_BLOCK as SCALE_BLOCK
from ..parallel.shard import SKIP, Shard
from .fp8 import fp8_pairs, read_quantization_config


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


def shard_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}}: a shard's safetensors header, read
    alone (8 bytes of length, then JSON), without its metadata entry."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return header


def _tensor_bytes(path: Path) -> dict[str, int]:
    """{tensor name: its bytes in the file}, from the shard's safetensors header alone."""
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in shard_header(path).items()}


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g}"


def _print(line: str) -> None:
    # The server's log is the stub's stdout; logging's INFO goes nowhere there.
    print(line, flush=True)


def load_tensors(checkpoint: str | Path, prefixes: tuple[str, ...], dtype: torch.dtype,
                 device: str = "cpu", name: str = "", progress=_print,
                 select: Callable[[str, tuple[int, ...]], object] | None = None,
                 keep_fp8: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """{name without its matched prefix: tensor} for every checkpoint tensor under `prefixes`,
    floating ones in `dtype` on `device`.

    FP8 tensors (F8_E4M3 with a `<name>_scale_inv` sibling; model/fp8.py) come back dequantized
    to `dtype` under their own name, their scales dropped: q.float() * s per 128x128 tile in fp32,
    then one cast. Raises ValueError (model/fp8.fp8_pairs, read_quantization_config) naming the
    tensor or field of an FP8 layout we do not run, before any tensor is read; ValueError when
    no tensor is under `prefixes`. keep_fp8 (fp8_mode native): FP8 weights whose checkpoint name
    it accepts come back as they are stored (float8_e4m3fn), their scales beside them as fp32
    `<name>_scale_inv` (bf16 scales widen exactly); the others are dequantized.

    select(name, shape) (a tensor-parallel rank's; parallel/shard.py Shard.reads) says what to
    read of each tensor: None (all of it), SKIP (nothing), or a list of index tuples read with
    safetensors' get_slice and concatenated along the dimension they cut: a rank never holds
    more of a tensor than its share. An FP8 weight's share is read on whole 128x128 scale blocks,
    dequantized and cropped; one kept FP8 (keep_fp8) is read as it is stored, its weight rows or
    columns and the matching rows or columns of its scales (the share must hold whole blocks,
    model/fp8_linear.check_fp8_shards: else ValueError naming the tensor).

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
    headers = {shard: shard_header(checkpoint / shard) for shard in wanted}
    header = {t: headers[shard][t] for shard, tensors in wanted.items() for t in tensors}
    pairs = fp8_pairs(header, _quantization(checkpoint, header), str(checkpoint))
    scale_of = {scale: weight for weight, scale in pairs.items()}
    total = sum(headers[shard][t]["data_offsets"][1] - headers[shard][t]["data_offsets"][0]
                for shard, tensors in wanted.items() for t in tensors)
    start, done, read, in_memory, out, kept, skipped = time.perf_counter(), 0, 0, 0, {}, 0, 0
    pending: dict[str, list[torch.Tensor]] = {}   # an FP8 weight or a scale whose partner is still unread
    for i, (shard, tensors) in enumerate(sorted(wanted.items()), 1):
        with safe_open(checkpoint / shard, "pt", device="cpu") as f:
            for tensor in tensors:
                done += headers[shard][tensor]["data_offsets"][1] - headers[shard][tensor]["data_offsets"][0]
                weight = scale_of.get(tensor, tensor)
                index = select(weight, tuple(header[weight]["shape"])) if select else None
                if index == SKIP:
                    skipped += tensor in pairs    # another rank's FP8 expert: neither kept nor dequantized here
                    continue
                if weight in pairs and index is not None:
                    shape = tuple(header[weight]["shape"])
                    if keep_fp8 is not None and keep_fp8(weight) and \
                            any(_block_cover(ix, shape, False) != ix for ix in index):
                        raise ValueError(f"{weight}: this rank's share {index} of the FP8 weight {list(shape)} "
                                         "splits a 128x128 scale block; it cannot be kept FP8")
                    index = [_block_cover(ix, shape, tensor != weight) for ix in index]
                parts = [f.get_tensor(tensor)] if index is None else [f.get_slice(tensor)[ix] for ix in index]
                read += sum(p.numel() * p.element_size() for p in parts)
                if weight in pairs:
                    partner = pairs[weight] if tensor == weight else weight
                    if partner not in pending:
                        pending[tensor] = parts
                        continue
                    qs, ss = (parts, pending.pop(partner)) if tensor == weight else (pending.pop(partner), parts)
                    if keep_fp8 is not None and keep_fp8(weight):
                        # as stored: the share's weight and scale rows/columns, on block bounds
                        prefix = next(p for p in prefixes if weight.startswith(p))
                        scale = (ss[0] if len(ss) == 1 else
                                 torch.cat(ss, dim=Shard.split_dim(select(weight, tuple(header[weight]["shape"]))[0])))
                        out[pairs[weight][len(prefix):]] = scale = scale.to(device, torch.float32)
                        in_memory += scale.numel() * scale.element_size()
                        parts, kept = qs, kept + 1
                    else:
                        # on the device: the fp32 product of one tensor is the only extra memory
                        parts = [dequantize_block_fp8(q.to(device), s.to(device), dtype) for q, s in zip(qs, ss)]
                    if index is not None:
                        parts = [_crop(p, ix, tuple(header[weight]["shape"])) for p, ix in
                                 zip(parts, select(weight, tuple(header[weight]["shape"])))]
                    tensor = weight
                elif parts[0].is_floating_point():
                    parts = [p.to(dtype) for p in parts]
                t = (parts[0] if len(parts) == 1 else
                     torch.cat(parts, dim=Shard.split_dim(select(weight, tuple(header[weight]["shape"]))[0])))
                t = t.to(device)
                in_memory += t.numel() * t.element_size()
                prefix = next(p for p in prefixes if tensor.startswith(p))
                out[tensor[len(prefix):]] = t
        progress(f"{name}: shard {i}/{len(wanted)} {shard}: {len(tensors)} tensors, "
                 f"{_gib(done)}/{_gib(total)} GiB ({100 * done / max(total, 1):.0f}%), "
                 f"{time.perf_counter() - start:.1f} s")
    fp8 = (f", {len(pairs) - kept - skipped} FP8 tensors dequantized" if len(pairs) > kept + skipped else "") + \
        (f", {kept} FP8 tensors kept FP8 with their scales (native)" if kept else "")
    if select is not None:
        fp8 += f"; this rank's shares: {_gib(read)} GiB read"
    progress(f"{name}: loaded {_gib(total)} GiB in {time.perf_counter() - start:.1f} s "
             f"({len(wanted)} of the checkpoint's shards, {len(out)} tensors{fp8}; {_gib(in_memory)} GiB as "
             f"{dtype}{' and FP8' if kept else ''} on {device})")
    return out


def _block_cover(index: tuple[slice, ...], shape: tuple[int, ...], scale: bool) -> tuple[slice, ...]:
    """`index` into an FP8 weight of `shape` widened, in its last two dims, to whole scale
    blocks: the weight's rows/columns (scale False) or the scale's (True)."""
    out = list(index)
    for dim in (len(shape) - 2, len(shape) - 1):
        s = index[dim]
        if s == slice(None):
            continue
        first, end = s.start // SCALE_BLOCK, -(-s.stop // SCALE_BLOCK)
        out[dim] = slice(first, end) if scale else slice(first * SCALE_BLOCK, min(shape[dim], end * SCALE_BLOCK))
    return tuple(out)


def _crop(t: torch.Tensor, index: tuple[slice, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """A dequantized block cover (_block_cover) cut back to `index`."""
    out = [slice(None)] * t.dim()
    for dim in (len(shape) - 2, len(shape) - 1):
        s = index[dim]
        if s != slice(None):
            base = (s.start // SCALE_BLOCK) * SCALE_BLOCK
            out[dim] = slice(s.start - base, s.stop - base)
    return t[tuple(out)].contiguous()


def _quantization(checkpoint: Path, header: dict[str, dict]):
    """The checkpoint's checked quantization_config when any tensor in `header` is FP8 (else
    None without reading config.json: a bare shard directory still loads)."""
    if not any(info["dtype"].startswith("F8_") for info in header.values()):
        return None
    config = checkpoint / "config.json"
    return read_quantization_config(json.loads(config.read_text()), str(config)) if config.is_file() else None


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


_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_per_expert(tensors: dict[str, torch.Tensor], num_experts: int, hidden: int, inter: int
                    ) -> dict[str, torch.Tensor]:
    """`tensors` with every layer's per-expert weights (`<layer>.mlp.experts.{e}.{gate,up,down}_proj.weight`,
    nn.Linear layout: gate and up [I, H], down [H, I]) replaced by the fused hub layout:
    `<layer>.mlp.experts.gate_up_proj` [E, H, 2I] (gate = first I columns) and
    `<layer>.mlp.experts.down_proj` [E, I, H]. Tensors of fused layers pass unchanged.
    Raises ValueError naming the tensor for a wrong shape, a missing expert or projection, or a
    layer that holds both layouts. vLLM's make_expert_params_mapping reads the same names."""
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = t
            continue
        experts, e, proj = m.group(1), int(m.group(2)), m.group(3)
        want = (hidden, inter) if proj == "down_proj" else (inter, hidden)
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {want} ([out, in] of an expert's {proj})")
        if e >= num_experts:
            raise ValueError(f"{name}: expert {e} is past the config's num_experts {num_experts}")
        groups.setdefault(experts, {})[(e, proj)] = t
    for experts, found in groups.items():
        for fused in ("gate_up_proj", "down_proj"):
            if f"{experts}.{fused}" in out:
                raise ValueError(f"{experts}: both per-expert weights and the fused {fused}")
        missing = [f"{experts}.{e}.{p}.weight" for e in range(num_experts)
                   for p in ("gate_proj", "up_proj", "down_proj") if (e, p) not in found]
        if missing:
            raise ValueError(f"{experts}: per-expert weights missing, e.g. {missing[:3]} ({len(missing)} in all)")
        out[f"{experts}.gate_up_proj"] = torch.stack([
            torch.cat((found[e, "gate_proj"].T, found[e, "up_proj"].T), dim=1) for e in range(num_experts)])
        out[f"{experts}.down_proj"] = torch.stack([found[e, "down_proj"].T for e in range(num_experts)])
        found.clear()                    # the per-expert copies go now, not at the end
    return out
