"""The model repository's configs agree with each other and with the contract, on disk and as a
real server completes them (inputs, outputs and the decoupled policy come from the contract)."""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from qwen3vl import contract

REPO = Path(__file__).resolve().parents[1] / "model_repository"


def config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def entries(tensors) -> list[dict]:
    """Config proto inputs/outputs as the contract writes them."""
    out = []
    for t in tensors:
        entry = {"name": t.name, "data_type": model_config_pb2.DataType.Name(t.data_type), "dims": list(t.dims)}
        if hasattr(t, "optional"):
            entry["optional"] = t.optional
        out.append(entry)
    return out


def strip_optional(tensors: list[dict]) -> list[dict]:
    return [{k: v for k, v in t.items() if k != "optional"} for t in tensors]


def test_the_language_server_variant_of_the_encoder_config_differs_only_in_its_mode():
    """configs/language.pbtxt swaps the encoder for the remote fetcher; everything else (and what
    a client or the ensemble sees, declared by the model itself) stays the same."""
    local, remote = config(REPO / "qwen3_encoder/config.pbtxt"), config(REPO / "qwen3_encoder/configs/language.pbtxt")
    assert dict(remote.parameters) == {"encoder_mode": model_config_pb2.ModelParameter(string_value="remote")}
    assert "encoder_mode" not in local.parameters  # the default, local, written once in settings.py
    local.ClearField("parameters")
    remote.ClearField("parameters")
    assert local == remote
    assert not local.input and not local.output  # declared once, in code


def test_ensemble_routes_every_language_input_through_the_encoder():
    ensemble = config(REPO / "ensemble/config.pbtxt")
    encoder_step, language_step = ensemble.ensemble_scheduling.step
    assert encoder_step.model_name == "qwen3_encoder" and language_step.model_name == "qwen3_language"
    produced = set(encoder_step.output_map.values())
    assert set(language_step.input_map.values()) <= produced  # Triton's rule after a decoupled step
    assert set(encoder_step.input_map) == {t["name"] for t in contract.MEDIA_INPUTS} | {*contract.LANGUAGE_REQUEST_INPUTS}
    encoder_in, encoder_out = contract.encoder_io("float32")
    language_in, language_out = contract.language_io("float32")
    assert set(encoder_step.input_map) <= {t["name"] for t in encoder_in}
    assert set(encoder_step.output_map) <= {t["name"] for t in encoder_out}
    assert set(language_step.input_map) == {t["name"] for t in language_in}
    assert set(language_step.output_map) == {t["name"] for t in language_out}


def test_ensemble_io_is_the_public_contract():
    ensemble = config(REPO / "ensemble/config.pbtxt")
    assert entries(ensemble.input) == [{"optional": False, **t} for t in contract.ENSEMBLE_INPUTS]
    assert strip_optional(entries(ensemble.output)) == contract.LANGUAGE_OUTPUTS


def test_a_served_model_declares_the_contract(server):
    """What the running server completed from auto_complete_config (CPU: fp32 E->L tensors)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for model, io in (("qwen3_language", contract.language_io), ("qwen3_encoder", contract.encoder_io)):
            served = client.get_model_config(model).config
            inputs, outputs = io("float32")
            assert entries(served.input) == [{"optional": False, **t} for t in inputs], model
            assert strip_optional(entries(served.output)) == strip_optional(outputs), model
            assert served.model_transaction_policy.decoupled, model
    finally:
        client.close()
