"""Thin decoupled Triton shell over qwen3vl.backend.encoder.

local:  the vision tower runs here (aggregated and encoder servers).
remote: the same inputs and outputs, served by fetching from encoder servers (language servers).
"""

import triton_python_backend_utils as pb_utils

from qwen3vl import contract
from qwen3vl.backend.encoder import EncoderService
from qwen3vl.backend.shell import triton_model

TritonPythonModel = triton_model(pb_utils, EncoderService, contract.encoder_io)
