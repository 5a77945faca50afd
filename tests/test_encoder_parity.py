"""Served qwen3_encoder outputs equal transformers' `model.visual` (fp32, 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import jpeg, metric, png, reference_inputs
from qwen3vl.cli import client

IMAGE_SETS = {
    "landscape": [png(200, 130, 1)],
    "portrait": [png(96, 300, 2)],
    "tiny-square": [png(20, 20, 3)],
    "two-images-jpeg-and-png": [jpeg(160, 160, 4), png(300, 90, 5)],
}


def encode(server, images: list[bytes]):
    return client.encode(server.grpc_url, images)


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
    # `images` is optional: the ensemble sends text-only requests through the encoder this way.
    result = encode(server, [])
    assert result["visual_embeds"].shape[0] == 0
    assert result["deepstack_embeds"].shape[:2] == (3, 0)
    assert result["image_grid_thw"].shape == (0, 3)


def test_bad_image_is_a_clear_error_and_server_stays_healthy(server):
    failures = metric(server, "qwen3vl_encoder_failures_total")
    with pytest.raises(Exception, match=r"images\[1\].*not a decodable image"):
        encode(server, [png(64, 64, 1), b"this is not an image"])
    assert metric(server, "qwen3vl_encoder_failures_total") == failures + 1
    assert encode(server, [png(64, 64, 1)])["visual_embeds"].shape[0] > 0


def test_images_of_concurrent_requests_share_one_forward(server):
    """Requests that arrive together are encoded in one vision forward, each still getting
    exactly its own features."""
    from concurrent.futures import ThreadPoolExecutor

    requests = [[png(64 + 16 * i, 64, 100 + i)] for i in range(6)]
    alone = [encode(server, r) for r in requests]
    forwards, images = metric(server, "qwen3vl_encoder_forwards_total"), metric(server, "qwen3vl_encoder_images_total")
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: encode(server, r), requests))
    assert metric(server, "qwen3vl_encoder_images_total") - images == len(requests)
    assert metric(server, "qwen3vl_encoder_forwards_total") - forwards < len(requests)
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b["visual_embeds"], a["visual_embeds"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(b["image_grid_thw"], a["image_grid_thw"])
