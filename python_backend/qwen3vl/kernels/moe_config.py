"""Tile configs of the fused-MoE kernel: one JSON file per (E, N, device name, triton version),
each mapping a token count M to a config; the nearest key wins (after vLLM's
try_get_optimal_moe_config). One config serves both GEMMs (they share the alignment, BLOCK_SIZE_M).

Files live in kernels/configs/ (or $QWEN3VL_MOE_CONFIG_DIR, looked at first), named
`E={E},N={N},device_name={device},triton={version}.json`; N is the expert intermediate size I.
The triton version is in the key because a config tuned under one release can be slower under
another (SGLang keys its files so). Lookup: this triton version, then other versions newest
first, then `triton=any` (seeded from published tables whose triton version is unknown), then
vLLM's default rule. No triton import here: the version is the caller's.

File format:
    {"E": 128, "N": 768, "device_name": "NVIDIA_H200", "triton": "3.6.0", "dtype": "bfloat16",
     "source": "...", "configs": {"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64,
     "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 5}, ...}}
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_DIR_ENV = "QWEN3VL_MOE_CONFIG_DIR"
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
ANY_VERSION = "any"
_NAME_RE = re.compile(r"^E=(\d+),N=(\d+),device_name=(.+),triton=([^,]+)\.json$")


def device_name(device) -> str:
    """The config key of a device: "cpu" off CUDA (the interpreter), else the CUDA name with
    spaces as underscores ("NVIDIA_H100_80GB_HBM3"); every H200 variant is NVIDIA_H200 (vLLM)."""
    import torch

    device = torch.device(device)
    return "cpu" if device.type != "cuda" else _cuda_name(device.index)


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int | None) -> str:
    import torch

    name = torch.cuda.get_device_name(index).replace(" ", "_").replace("-", "_")
    return "NVIDIA_H200" if "H200" in name else name


def config_file_name(e: int, n: int, device: str, triton_version: str) -> str:
    return f"E={e},N={n},device_name={device},triton={triton_version}.json"


def default_config(m: int, e: int) -> dict:
    """vLLM's get_default_config for unquantised weights: small tiles while the step has no
    more tokens than experts (most experts see one or two rows), else 64/64/32 grouped by 8."""
    if m <= e:
        return dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=32, GROUP_SIZE_M=8, num_warps=4, num_stages=3)


def check_config(config: dict) -> dict:
    """config with exactly CONFIG_KEYS as ints; ValueError otherwise. Block sizes must be powers
    of two of at least 16 (tl.dot's smallest tile)."""
    if set(config) != set(CONFIG_KEYS):
        raise ValueError(f"MoE config keys {sorted(config)} are not {sorted(CONFIG_KEYS)}")
    out = {key: int(config[key]) for key in CONFIG_KEYS}
    for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
        if out[key] < 16 or out[key] & (out[key] - 1):
            raise ValueError(f"MoE config {key}={out[key]} is not a power of two >= 16")
    if out["GROUP_SIZE_M"] < 1 or out["num_warps"] < 1 or out["num_stages"] < 1:
        raise ValueError(f"MoE config {out} has a count below 1")
    return out


def write_config_file(path: Path, configs: dict[int, dict], *, e: int, n: int, device: str, triton_version: str,
                      dtype: str, source: str) -> Path:
    """Write `configs` (token count -> config) as a config file; returns the path."""
    head = {"E": e, "N": n, "device_name": device, "triton": triton_version, "dtype": dtype, "source": source}
    rows = [f"  {json.dumps(str(m))}: {json.dumps(check_config(c))}" for m, c in sorted(configs.items())]
    # one config a line: a diff of a retuned file reads row by row
    text = json.dumps(head, indent=1)[:-2] + ',\n "configs": {\n' + ",\n".join(rows) + "\n }\n}\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@functools.lru_cache(maxsize=None)
def load_config_file(path: Path) -> dict[int, dict]:
    """token count -> config of a config file; ValueError if it is malformed."""
    body = json.loads(Path(path).read_text())
    configs = body.get("configs") if isinstance(body, dict) else None
    if not isinstance(configs, dict) or not configs:
        raise ValueError(f"{Path(path).name}: no 'configs' mapping")
    return {int(m): check_config(c) for m, c in configs.items()}


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.+]", version))


def find_config_file(e: int, n: int, device: str, triton_version: str) -> Path | None:
    """The file to use for (E, N, device) under `triton_version`, or None (see module doc).
    Looked up once per process and folder (a file written later is not seen)."""
    return _find_config_file(e, n, device, triton_version, os.environ.get(CONFIG_DIR_ENV, ""))


@functools.lru_cache(maxsize=None)
def _find_config_file(e: int, n: int, device: str, triton_version: str, env_dir: str) -> Path | None:
    for folder in ([Path(env_dir)] if env_dir else []) + [CONFIG_DIR]:
        exact = folder / config_file_name(e, n, device, triton_version)
        if exact.is_file():
            return exact
        others = []
        for path in folder.glob(f"E={e},N={n},device_name={device},triton=*.json") if folder.is_dir() else ():
            match = _NAME_RE.match(path.name)
            if match and match.group(3) == device:
                version = match.group(4)
                others.append(((0,) if version == ANY_VERSION else (1,) + _version_key(version), path))
        if others:
            return max(others)[1]
    return None


def nearest_config(configs: dict[int, dict], m: int) -> dict:
    """The config of the key nearest to m (the smaller key on a tie)."""
    return configs[min(configs, key=lambda key: (abs(key - m), key))]


def get_config(m: int, e: int, n: int, device: str, triton_version: str) -> dict:
    """The tile config (checked) for a step of m tokens over E experts of intermediate size N.
    Cheap after the first call of a shape: it runs on every MoE layer of every step."""
    return dict(_get_config(m, e, n, device, triton_version, os.environ.get(CONFIG_DIR_ENV, "")))


@functools.lru_cache(maxsize=4096)
def _get_config(m: int, e: int, n: int, device: str, triton_version: str, env_dir: str) -> dict:
    path = _find_config_file(e, n, device, triton_version, env_dir)
    return nearest_config(load_config_file(path), m) if path else default_config(m, e)
