"""The model repository's configs agree with each other and with the contract."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from qwen3vl import contract

REPO = Path(__file__).resolve().parents[1] / "model_repository"


def config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_language_server_encoder_config_matches_the_local_one():
    """configs/language.pbtxt swaps the encoder for the remote fetcher; everything a client or
    the ensemble sees must stay the same."""
    local, remote = config(REPO / "qwen3_encoder/config.pbtxt"), config(REPO / "qwen3_encoder/configs/language.pbtxt")
    assert local.input == remote.input and local.output == remote.output
    assert local.model_transaction_policy == remote.model_transaction_policy
    assert local.parameters["encoder_mode"].string_value == "local"
    assert remote.parameters["encoder_mode"].string_value == "remote"


def test_ensemble_routes_every_language_input_through_the_encoder():
    ensemble = config(REPO / "ensemble/config.pbtxt")
    encoder_step, language_step = ensemble.ensemble_scheduling.step
    assert encoder_step.model_name == "qwen3_encoder" and language_step.model_name == "qwen3_language"
    produced = set(encoder_step.output_map.values())
    assert set(language_step.input_map.values()) <= produced  # Triton's rule after a decoupled step
    assert set(encoder_step.input_map) == {contract.IMAGES, *contract.LANGUAGE_REQUEST_INPUTS}
    language = config(REPO / "qwen3_language/config.pbtxt")
    assert {i.name for i in language.input} == set(contract.LANGUAGE_REQUEST_INPUTS)
    assert [o.name for o in ensemble.output] == [contract.TEXT_OUTPUT, contract.OUTPUT_IDS, contract.FINISH_REASON]
