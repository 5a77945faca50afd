"""The one Triton Python-backend model class both `model.py` shells are made of: settings
once per model, a service object doing the work, and execute() that only hands requests on."""

from __future__ import annotations

import json

from ..settings import ServingConfig
from .io import auto_complete


def triton_model(pb, service_class, io_for_dtype):
    """A `TritonPythonModel` class over `service_class(pb, settings)` (which has `submit(request)`
    and `stop()`), declaring the inputs and outputs `io_for_dtype(dtype_name)` gives."""

    class TritonPythonModel:
        @staticmethod
        def auto_complete_config(auto_complete_model_config):
            """Inputs, outputs and the decoupled policy come from the contract, so config.pbtxt
            holds only what an operator changes."""
            return auto_complete(auto_complete_model_config, io_for_dtype)

        def initialize(self, args):
            settings = ServingConfig.load(json.loads(args["model_config"]).get("parameters"))
            self.service = service_class(pb, settings)

        def execute(self, requests):
            # Decoupled: responses go out from the service's own threads; FINAL always follows.
            for request in requests:
                self.service.submit(request)
            return None

        def finalize(self):
            self.service.stop()

    return TritonPythonModel
