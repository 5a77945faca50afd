"""Weight loading on the small preset (the benchmarks' checkpoint, sharded like a release): a
progress line per shard with the bytes read so far, then one `loaded N GiB in S s` line per
model, N being the bytes of the tensors that model reads. (The served models print the same
into the server's log: tests/test_metrics.py reads it there.)"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qwen3vl.model.checkpoint import _tensor_bytes, load_tensors, weight_map
from qwen3vl.tools.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_small_preset_loading_prints_progress_and_one_summary(capsys):
    ckpt = make_checkpoint(ROOT / ".work" / "checkpoints" / "small", "small")  # reused when present
    prefixes = ("model.language_model.", "lm_head.")
    tensors = load_tensors(ckpt, prefixes, torch.bfloat16, name="language model")
    lines = capsys.readouterr().out.splitlines()
    wanted = {}
    for name, shard in weight_map(ckpt).items():
        if name.startswith(prefixes):
            wanted.setdefault(shard, []).append(name)
    assert len(wanted) > 1, "the small preset is sharded"
    total = sum(_tensor_bytes(ckpt / shard)[t] for shard, names in wanted.items() for t in names)

    progress = [line for line in lines if line.startswith("language model: shard ")]
    assert len(progress) == len(wanted)
    read = [float(re.search(r"([\d.e-]+)/([\d.e-]+) GiB", line).group(1)) for line in progress]
    assert read == sorted(read) and progress[-1].endswith("s") and "(100%)" in progress[-1]
    assert all(f"{i}/{len(wanted)} " in line for i, line in enumerate(progress, 1))

    (summary,) = [line for line in lines if " loaded " in line]
    n, seconds = re.fullmatch(r"language model: loaded ([\d.e-]+) GiB in ([\d.]+) s \(.*\)", summary).groups()
    assert float(n) == float(f"{total / 2**30:.3g}") and float(seconds) >= 0
    assert lines[-1] == summary and len(tensors) == sum(map(len, wanted.values()))
