"""Served qwen3_encoder outputs equal transformers' `model.visual` (fp32, 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from conftest import jpeg, png, reference_inputs

IMAGE_SETS = {
    "landscape": [png(200, 130, 1)],
    "portrait": [png(96, 300, 2)],
    "tiny-square": [png(20, 20, 3)],
    "two-images-jpeg-and-png": [jpeg(160, 160, 4), png(300, 90, 5)],
}


def encode(server, images: list[bytes]):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("images", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object))
    result = client.infer("qwen3_encoder", [inp])
    return {name: result.as_numpy(name) for name in ("visual_embeds", "deepstack_embeds", "image_grid_thw")}


@pytest.mark.parametrize("name", sorted(IMAGE_SETS))
def test_encoder_matches_transformers(server, reference, name):
    images = IMAGE_SETS[name]
    model, processor = reference
    inputs = reference_inputs(processor, "x", images)
    with torch.no_grad():
        ref = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    ref_embeds = torch.cat(ref.pooler_output).numpy()
    ref_deepstack = [torch.cat(layer).numpy() for layer in ref.deepstack_features]

    got = encode(server, images)
    n = int(inputs["image_grid_thw"].prod(-1).sum()) // 4
    assert got["visual_embeds"].dtype == np.float32
    assert got["visual_embeds"].shape == (n, model.config.text_config.hidden_size)
    assert got["deepstack_embeds"].shape == (3, n, model.config.text_config.hidden_size)
    np.testing.assert_array_equal(got["image_grid_thw"], inputs["image_grid_thw"].numpy())
    np.testing.assert_allclose(got["visual_embeds"], ref_embeds, rtol=0, atol=1e-5)
    for layer in range(3):
        np.testing.assert_allclose(got["deepstack_embeds"][layer], ref_deepstack[layer], rtol=0, atol=1e-5)
    # Not a vacuous match: the features are far from zero and differ across images.
    assert np.abs(ref_embeds).mean() > 1e-2


def test_encoder_without_images_returns_empty_tensors(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    # `images` is optional: the ensemble sends text-only requests through the encoder this way.
    result = client.infer("qwen3_encoder", [])
    assert result.as_numpy("visual_embeds").shape[0] == 0
    assert result.as_numpy("deepstack_embeds").shape[:2] == (3, 0)
    assert result.as_numpy("image_grid_thw").shape == (0, 3)


def test_bad_image_is_a_clear_error_and_server_stays_healthy(server):
    with pytest.raises(Exception, match=r"images\[1\].*not a decodable image"):
        encode(server, [png(64, 64, 1), b"this is not an image"])
    assert encode(server, [png(64, 64, 1)])["visual_embeds"].shape[0] > 0
