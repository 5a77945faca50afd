"""Thin decoupled Triton shell over qwen3vl.backend.language: requests in, streamed responses out."""

import triton_python_backend_utils as pb_utils

from qwen3vl import contract
from qwen3vl.backend.language import LanguageService
from qwen3vl.backend.shell import triton_model

TritonPythonModel = triton_model(pb_utils, LanguageService, contract.language_io)
