"""Qwen's FP8 checkpoints (Qwen3-VL-*-Instruct-FP8) as they are released: what we accept and how.

The format (transformers' FineGrainedFP8 config, DeepSeek-V3's layout, vLLM's `Fp8Config` with
a weight block size):

    config.json   quantization_config = {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
                                         weight_block_size: [128, 128], modules_to_not_convert: [...]}
    tensors       <name>            F8_E4M3 [..., R, C]
                  <name>_scale_inv  F32 or BF16 [..., ceil(R/128), ceil(C/128)]  (W = q * s per tile)

A tensor is FP8 exactly when its safetensors dtype is F8_E4M3 and its `<name>_scale_inv` sibling
exists: the index decides, not `modules_to_not_convert` (that list is only checked not to name an
FP8 tensor). Everything else (embeddings, norms, the router `mlp.gate`, lm_head, and the vision
tower unless its tensors are FP8) is read as before, in the model dtype. Everything we do not
run is refused with the field or tensor named: another quant_method or fmt, static activation
scales, another block size, per-tensor scales, a scale grid that does not fit.

Two ways to run the FP8 weights (`fp8_mode`, resolved by `resolve_fp8_mode`): dequantized at
load to the model dtype (model/checkpoint.py), or kept FP8 and run by the block-FP8 kernels
(model/fp8_linear.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidInput
from ..kernels.fp8_reference import scale_grid

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = {"F8_E4M3"}                         # safetensors' name for float8_e4m3fn
SCALE_DTYPES = {"F32", "BF16"}                   # DeepSeek-style releases: F32; Qwen3.6's: BF16
OTHER_FP8 = {"F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"}
STATIC_SCALES = ("input_scale", "activation_scale")   # what a static-activation checkpoint adds
SUPPORTED_BLOCK = (128, 128)
FP8_MODES = ("auto", "dequantize", "native")
NATIVE_MIN_CAPABILITY = (8, 9)                   # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer


@dataclass(frozen=True)
class Fp8Config:
    """A checked `quantization_config`: the weight block (rows, cols) and the modules the release
    says it left unquantized (patterns, matched like transformers' should_convert_module)."""

    block: tuple[int, int] = SUPPORTED_BLOCK
    modules_to_not_convert: tuple[str, ...] = ()

    def excludes(self, module: str) -> str | None:
        """The modules_to_not_convert pattern that names `module` (a dotted module name), else None.
        A pattern matches from the start up to a module boundary (also as a regex, `layers.*.mlp.gate`
        but never `mlp.gate` for `mlp.gate_proj`), or as a suffix at a boundary."""
        for pattern in self.modules_to_not_convert:
            if module == pattern or module.endswith("." + pattern):
                return pattern
            try:
                if re.match(rf"(?:{pattern})(?:\.|$)", module):
                    return pattern
            except re.error:
                if module.startswith(pattern + "."):
                    return pattern
        return None


def read_quantization_config(raw: dict, where: str = "config.json") -> Fp8Config | None:
    """The checkpoint config's `quantization_config` (top level, or inside text_config), checked;
    None when there is none. Raises ValueError naming the field for what we do not run: a
    quant_method other than fp8, an fmt other than e4m3, activation_scheme other than dynamic,
    a weight_block_size other than [128, 128] (or none: per-tensor scales)."""
    q = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    if q is None:
        return None
    field = f"{where}: quantization_config"
    if not isinstance(q, dict):
        raise ValueError(f"{field} is {type(q).__name__}, expected an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ValueError(f"{field}.quant_method {method!r} is not supported: only Qwen's block FP8 "
                         "(quant_method 'fp8', fmt e4m3, 128x128 weight blocks, dynamic activations)")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"{field}.fmt {fmt!r} is not supported: only 'e4m3' (float8_e4m3fn)")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"{field}.activation_scheme {scheme!r} is not supported: only 'dynamic' "
                         "(activations quantized per token group at run time; no static input scales)")
    block = q.get("weight_block_size")
    if block is None:
        raise ValueError(f"{field}.weight_block_size is missing: per-tensor FP8 scales are not supported, "
                         "only 128x128 blocks")
    if list(block) != list(SUPPORTED_BLOCK):
        raise ValueError(f"{field}.weight_block_size {list(block)} is not supported: only {list(SUPPORTED_BLOCK)}")
    skip = q.get("modules_to_not_convert") or q.get("ignored_layers") or ()
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"{field}.modules_to_not_convert must be a list of module names")
    return Fp8Config(block=tuple(block), modules_to_not_convert=tuple(skip))


def fp8_pairs(header: dict[str, dict], quantization: Fp8Config | None, where: str) -> dict[str, str]:
    """{FP8 tensor: its scale tensor} among the tensors of `header` ({name: {"dtype", "shape"}} as
    safetensors headers write them, those of one load). Checks, before any byte is read, and
    raises ValueError naming the tensor: an FP8 dtype other than F8_E4M3; an F8_E4M3 tensor
    without `<name>_scale_inv`; a scale without an F8_E4M3 tensor beside it; a scale dtype other
    than F32/BF16; a scale grid other than ceil(shape / block); a static activation scale; an FP8
    tensor when config.json has no quantization_config, or one its modules_to_not_convert names."""
    pairs = {}
    for name, info in header.items():
        dtype = info["dtype"]
        if name.endswith(STATIC_SCALES):
            raise ValueError(f"{where}: {name} is a static activation scale; only dynamic activation "
                             "quantization is supported")
        if dtype in OTHER_FP8:
            raise ValueError(f"{where}: {name} has dtype {dtype}; only F8_E4M3 weights are supported")
        if name.endswith(SCALE_SUFFIX):
            weight = name[:-len(SCALE_SUFFIX)]
            if header.get(weight, {}).get("dtype") not in FP8_DTYPES:
                found = header[weight]["dtype"] if weight in header else "no such tensor"
                raise ValueError(f"{where}: {name} scales {weight}, which is not an F8_E4M3 tensor ({found})")
            continue
        if dtype not in FP8_DTYPES:
            continue
        scale = name + SCALE_SUFFIX
        if scale not in header:
            raise ValueError(f"{where}: {name} is F8_E4M3 but has no {scale}: only block-scaled FP8 "
                             "(weight_scale_inv per 128x128 block) is supported")
        if quantization is None:
            raise ValueError(f"{where}: {name} is F8_E4M3 but config.json has no quantization_config")
        if header[scale]["dtype"] not in SCALE_DTYPES:
            raise ValueError(f"{where}: {scale} has dtype {header[scale]['dtype']}; scales must be "
                             f"{' or '.join(sorted(SCALE_DTYPES))}")
        want = scale_grid(tuple(info["shape"]), quantization.block)
        if tuple(header[scale]["shape"]) != want:
            raise ValueError(f"{where}: {scale} has shape {list(header[scale]['shape'])}, expected {list(want)} "
                             f"for {name} {list(info['shape'])} in {quantization.block[0]}x{quantization.block[1]} "
                             "blocks (ceil at the edges)")
        module = name.rsplit(".", 1)[0] if name.endswith(".weight") else name
        pattern = quantization.excludes(module)
        if pattern is not None:
            raise ValueError(f"{where}: {name} is F8_E4M3 but quantization_config.modules_to_not_convert "
                             f"names its module ({pattern!r})")
        pairs[name] = scale
    return pairs


def resolve_fp8_mode(setting: str, device, capability: tuple[int, int] | None = None, quantized: bool = True,
                     kernels: str | None = None) -> str:
    """How FP8 weights run: "dequantize" (to the model dtype at load) or "native" (FP8 weights
    in memory, the Triton block-FP8 kernels; model/fp8_linear.py).

    setting: "auto" (native where it serves, else dequantize), "dequantize" or "native".
    device: a torch.device or its name. capability: the CUDA device's (major, minor); None reads it.
    quantized: whether the checkpoint has FP8 weights (without, the setting only has to be a
    known value: "dequantize" comes back, there being nothing to run natively).
    kernels: the resolved kernels ("torch" or "triton", kernels.resolve_kernels); None: what
    `auto` resolves to on `device` (triton on CUDA, torch elsewhere).

    The rule: native runs the Triton kernels, so it needs kernels=triton, and then either a CUDA
    GPU of compute capability 8.9 or newer (FP8 tensor cores), or the CPU, where kernels=triton
    means Triton's interpreter (TRITON_INTERPRET=1: slow, for tests; `auto` never picks it).
    Raises InvalidInput for an unknown setting, and for "native" on an FP8 checkpoint where that
    rule does not hold, with the reason."""
    if setting not in FP8_MODES:
        raise InvalidInput(f"fp8_mode: {setting!r} is not one of {', '.join(FP8_MODES)}")
    if setting == "dequantize" or not quantized:
        return "dequantize"
    device_type = str(device).split(":")[0]
    kernels = kernels or ("triton" if device_type == "cuda" else "torch")
    reason = None
    if device_type == "cuda":
        if capability is None:
            import torch
            capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < NATIVE_MIN_CAPABILITY:
            reason = (f"the GPU has compute capability {capability[0]}.{capability[1]}, and FP8 tensor cores "
                      "need 8.9 or newer")
    elif device_type != "cpu":
        reason = f"the device is {device_type}, and native FP8 needs a CUDA GPU of compute capability 8.9 or newer"
    if reason is None and kernels != "triton":
        reason = (f"the kernels are {kernels}, and native FP8 runs the Triton block-FP8 kernels (kernels=triton; "
                  "on a CPU only under Triton's interpreter, TRITON_INTERPRET=1, for tests)")
    if reason is None and (device_type == "cuda" or setting == "native"):
        return "native"
    if setting == "auto":
        return "dequantize"      # the CPU: the interpreter is for tests, never picked by auto
    raise InvalidInput(f"fp8_mode=native cannot run here: {reason}; choose fp8_mode auto or dequantize "
                       "(FP8 weights dequantized at load to the model dtype)")
