"""Thin decoupled Triton shell over qwen3vl.backend.encoder.

local:  the vision tower runs here (aggregated and encoder servers).
remote: the same inputs and outputs, served by fetching from encoder servers (language servers).
"""

import os
import sys

# The stub's interpreter ignores PYTHONPATH: import the package of the qwen3vl-serve that started
# this server (a checkout other than the environment's install), not the environment's.
if os.environ.get("QWEN3VL_PACKAGE_ROOT"):
    sys.path.insert(0, os.environ["QWEN3VL_PACKAGE_ROOT"])

import triton_python_backend_utils as pb_utils
from qwen3vl import contract
from qwen3vl.backend.encoder import EncoderService
from qwen3vl.backend.shell import triton_model

TritonPythonModel = triton_model(pb_utils, EncoderService, contract.encoder_io)
