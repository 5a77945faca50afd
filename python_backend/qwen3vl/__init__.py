"""Qwen3-VL-MoE serving on Triton: the logic behind the model repository's thin Triton shells."""

__version__ = "0.1.0"
