"""Served qwen3_encoder outputs equal transformers' `model.visual` (fp32, 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import jpeg, metric, png, reference_inputs
from qwen3vl import client

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


def _reference_video_features(reference, videos: list[bytes], images: list[bytes] = ()):
    """transformers' features of a request's images, then its videos (our E->L row order), from
    the processor on frames sampled by its own sample_frames (tests/test_video.py)."""
    import tempfile
    from pathlib import Path

    from test_video import reference_video_inputs

    model, processor = reference
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = reference_video_inputs(processor, Path(tmp), content, list(images), videos)
    with torch.no_grad():
        parts = [model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])] if images else []
        parts.append(model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]))
    embeds = torch.cat([t for p in parts for t in p.pooler_output]).numpy()
    deepstack = [torch.cat([t for p in parts for t in p.deepstack_features[i]]).numpy() for i in range(3)]
    return embeds, deepstack, inputs["video_grid_thw"].numpy()


def test_videos_and_images_of_concurrent_requests_share_a_forward_and_equal_transformers(server, reference):
    """The served encoder on videos: each request's visual_embeds and deepstack layers within
    1e-5 of transformers' get_video_features (images' rows first), video_grid_thw and float64
    timestamps as the processor makes them; requests of images and of videos that arrive
    together share the vision forward."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import video

    requests = [([], [video(30, 10, seed=300)]), ([png(80, 64, 301)], [video(7, 1, width=96, height=64, seed=302)]),
                ([png(72, 72, 303)], [])]
    forwards = metric(server, "qwen3vl_encoder_forwards_total")
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: client.encode(server.grpc_url, r[0], videos=r[1]), requests))
    assert metric(server, "qwen3vl_encoder_forwards_total") - forwards < len(requests)
    for (images, videos), out in zip(requests, got):
        if not videos:
            continue
        embeds, deepstack, grids = _reference_video_features(reference, videos, images)
        np.testing.assert_array_equal(out["video_grid_thw"], grids)
        assert out["video_timestamps"].dtype == np.float64 and len(out["video_timestamps"]) == grids[:, 0].sum()
        np.testing.assert_allclose(out["visual_embeds"], embeds, rtol=0, atol=1e-5)
        for layer in range(3):
            np.testing.assert_allclose(out["deepstack_embeds"][layer], deepstack[layer], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[0]["video_timestamps"], [0.3, 1.45, 2.6], rtol=0, atol=1e-12)
