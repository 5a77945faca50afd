"""Video input against transformers 5.24: frame sampling (its own `sample_frames`), decoding (its
`load_video` with PyAV), preprocessing, prompt ids and MRoPE, encoder features, prefill logits,
and greedy tokens through the served ensemble; limits and bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import metric, png, video
from qwen3vl.client import ServerError, ask, encode, infer
from qwen3vl.encoder.encoder import VisionEncoder
from qwen3vl.encoder.video import VideoError, VideoPlanner, decode_frames, read_header
from qwen3vl.engine.engine import Engine
from qwen3vl.model.config import ModelConfig
from qwen3vl.model.reference import prefill_logits
from qwen3vl.settings import ServingConfig


def video_limits(max_bytes: int = 1 << 30, max_seconds: float = 1e6, max_frames: int = 10_000,
                 max_frame_pixels: int = 1 << 30, cap_pixels_per_frame: bool = False) -> ServingConfig:
    return ServingConfig(max_video_bytes=max_bytes, max_video_seconds=max_seconds, max_video_frames=max_frames,
                         max_video_frame_pixels=max_frame_pixels, video_cap_pixels_per_frame=cap_pixels_per_frame)


BIG = video_limits()
MAX_NEW = 8


@pytest.fixture(scope="module")
def planner(reference):
    return VideoPlanner(reference[1], BIG)


@pytest.fixture(scope="module")
def served(checkpoint, reference):
    config = ModelConfig.load(checkpoint, device="cpu")
    processor = reference[1]
    return Engine.from_checkpoint(config), VisionEncoder(config, processor.image_processor,
                                                         video_processor=processor.video_processor)


def load_video(tmp_path, data: bytes, video_processor, fps=None):
    """transformers' own decode and sampling: `load_video(backend="pyav")` with the processor's
    `sample_frames` (frames [n, H, W, 3], metadata with frames_indices)."""
    from transformers.video_utils import load_video as hf_load_video

    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    return hf_load_video(str(path), backend="pyav",
                         sample_indices_fn=lambda metadata, **kw: video_processor.sample_frames(metadata, fps=fps))


def reference_video_inputs(processor, tmp_path, content: list, images: list[bytes], videos: list[bytes], fps=None,
                           cap=False):
    """What transformers gets: the chat template on `content`, images by PIL, each video by
    `load_video` + the processor's sampling (a 1-frame clip: its frame twice, our documented
    choice; the reference itself raises), through the processor with the metadata."""
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    frames, metas = [], []
    for data in videos:
        f, meta = load_video(tmp_path, data, processor.video_processor, fps)
        if len(f) == 1:
            f, meta.frames_indices = np.concatenate([f, f]), np.array([0, 0])
        frames.append(f)
        metas.append(meta)
    return processor(text=[text], images=[Image.open(io.BytesIO(b)) for b in images] or None,
                     videos=frames or None,
                     videos_kwargs={"video_metadata": metas, "do_sample_frames": False, "return_metadata": True,
                                    "cap_pixels_per_frame": cap} if videos else None,
                     return_tensors="pt")


CLIP = video(30, 10, seed=1)          # 6 sampled frames, 3 groups, times 0.3 / 1.4 (float64 1.45) / 2.6
ODD = video(7, 1, seed=2)             # 7 frames sampled: the last group repeats frame 6
OTHER = video(20, 5, width=96, height=64, seed=3)


# ---- sampling and decoding
@pytest.mark.parametrize("fps", [1, 10, 30000 / 1001])
@pytest.mark.parametrize("frames", [2, 3, 7, 30, 2000])
def test_frame_indices_and_frames_equal_transformers(planner, tmp_path, frames, fps):
    data = video(frames, fps, width=32, height=32, seed=frames)
    plan = planner.plan(data, 0, None)
    ref_frames, meta = load_video(tmp_path, data, planner.video_processor)
    assert plan.total_frames == frames == meta.total_num_frames
    assert plan.src_fps == meta.fps
    assert list(plan.indices) == [int(i) for i in meta.frames_indices]
    # the processor's own sampling, called on the header's metadata
    from transformers.video_utils import VideoMetadata
    assert list(plan.indices) == planner.video_processor.sample_frames(VideoMetadata(frames, meta.fps)).tolist()
    np.testing.assert_array_equal(decode_frames(data, 0, plan.indices), ref_frames)


def test_request_fps_changes_sampling(planner, tmp_path):
    for fps in (0.5, 1.0, 4.0):
        plan = planner.plan(CLIP, 0, fps)
        _, meta = load_video(tmp_path, CLIP, planner.video_processor, fps)
        assert list(plan.indices) == meta.frames_indices.tolist()


@pytest.mark.parametrize("container,codec", [("matroska", "libx264"), ("webm", "libvpx"), ("avi", "mjpeg")])
def test_other_containers_decode(planner, container, codec):
    import av

    data = video(12, 6, seed=4, codec=codec, container=container)
    frames, fps, width, height, turns = read_header(data, 0)
    assert (frames, width, height, turns) == (12, 64, 48, 0) and abs(fps - 6) < 1e-6
    plan = planner.plan(data, 0, None)
    with av.open(io.BytesIO(data)) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    np.testing.assert_array_equal(decode_frames(data, 0, plan.indices), np.stack([every[i] for i in plan.indices]))


def test_one_frame_clip_is_its_frame_twice(planner):
    plan = planner.plan(video(1, 5, seed=5), 0, None)
    assert plan.indices == (0, 0) and plan.timestamps == (0.0,) and plan.grid[0] == 1


# ---- as players show it: edit lists and rotation
def remux(data: bytes, hide: int) -> bytes:
    """The file trimmed without re-encoding, as `ffmpeg -ss ... -c copy` does: the same packets,
    the first `hide` frames presented before 0, so the MP4 muxer writes an edit list hiding them
    (the header still counts every frame)."""
    import av

    buf = io.BytesIO()
    with av.open(io.BytesIO(data)) as src, av.open(buf, mode="w", format="mp4") as out:
        stream = src.streams.video[0]
        copy = out.add_stream_from_template(stream)
        step = int(round(1 / (stream.average_rate * stream.time_base)))
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            packet.pts, packet.dts, packet.stream = packet.pts - hide * step, packet.dts - hide * step, copy
            out.mux(packet)
    return buf.getvalue()


def lossless_clip(upright: np.ndarray, fps: int = 5, rotation: int | None = None, hide: int = 0) -> bytes:
    """PNG frames in a MOV file, so that decoding gives them back exactly. With `rotation` (the
    display matrix, degrees counter-clockwise), the frames are stored turned the other way, as a
    phone writes them: displayed, they are `upright`. With `hide`, the first frames are presented
    before 0 (an edit list hides them)."""
    import fractions

    import av

    turns = (rotation or 0) // 90
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mov") as out:
        stream = out.add_stream("png", rate=fractions.Fraction(fps))
        stored = [np.ascontiguousarray(np.rot90(f, -turns)) for f in upright]
        stream.width, stream.height, stream.pix_fmt = stored[0].shape[1], stored[0].shape[0], "rgb24"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, f in enumerate(stored):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = i - hide, fractions.Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def noise_frames(n: int, height: int = 48, width: int = 64, seed: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("codec", ["mpeg4", "h264"])
def test_an_edit_list_hides_lead_in_frames_and_the_clip_is_sampled_over_those_that_play(planner, codec):
    """30 frames trimmed by 5 without re-encoding: the header says 30, 25 play (FFmpeg drops the
    first 5 from the index or flags them to discard); sampled and decoded over those 25."""
    import av
    from transformers.video_utils import VideoMetadata

    source = video(30, 10, seed=13, codec=codec)
    trimmed = remux(source, 5)
    with av.open(io.BytesIO(trimmed)) as c:
        assert c.streams.video[0].frames == 30
    with av.open(io.BytesIO(source)) as c:
        every = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert read_header(trimmed, 0).frames == 25
    plan = planner.plan(trimmed, 0, None)
    assert list(plan.indices) == planner.video_processor.sample_frames(VideoMetadata(25, 10.0)).tolist()
    np.testing.assert_array_equal(decode_frames(trimmed, 0, plan.indices), every[5:][list(plan.indices)])


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_a_rotated_clip_reaches_the_model_upright(planner, rotation):
    """A display matrix (a phone's -90: stored landscape, shown portrait) is applied: the header's
    size, the grid and the frames are the displayed ones."""
    upright = noise_frames(6, height=64, width=48)
    rotated, plain = lossless_clip(upright, rotation=rotation), lossless_clip(upright)
    header = read_header(rotated, 0)
    assert (header.width, header.height) == (48, 64) and header.quarter_turns == (rotation // 90) % 4
    plan = planner.plan(rotated, 0, None)
    assert plan.grid == planner.plan(plain, 0, None).grid
    np.testing.assert_array_equal(decode_frames(rotated, 0, plan.indices, plan.quarter_turns),
                                  upright[list(plan.indices)])


def test_trimmed_and_rotated_clips_are_encoded_as_the_frames_they_show(server):
    """Through the server's encoder: a phone-rotated clip gives the E->L tensors and the answer of
    the same frames stored upright; a clip whose edit list hides 5 of 30 frames those of a file
    holding only the 25 that play."""
    frames = noise_frames(30, height=64, width=48)
    for shown, stored in [(lossless_clip(frames[:8]), lossless_clip(frames[:8], rotation=-90)),
                          (lossless_clip(frames[5:]), lossless_clip(frames, hide=5))]:
        want, got = encode(server.grpc_url, [], videos=[shown]), encode(server.grpc_url, [], videos=[stored])
        for name in ("video_grid_thw", "video_timestamps", "visual_embeds", "deepstack_embeds"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        answers = [ask(server.grpc_url, "grpc", False, prompt="What happens?", videos=[v], max_tokens=4,
                       temperature=0.0).token_ids for v in (shown, stored)]
        assert answers[0] == answers[1]


# ---- limits
@pytest.mark.parametrize("limits,message", [
    (video_limits(max_bytes=100), "max_video_bytes"),
    (video_limits(max_seconds=2.0), "max_video_seconds"),
    (video_limits(max_frames=4), "max_video_frames"),
    (video_limits(max_frame_pixels=64 * 47), "max_video_frame_pixels"),
])
def test_limits_are_clear_invalid_input(reference, limits, message):
    with pytest.raises(VideoError, match=rf"videos\[0\].*{message}"):
        VideoPlanner(reference[1], limits).plan(CLIP, 0, None)


def test_undecodable_video_is_a_clear_error(planner):
    with pytest.raises(VideoError, match=r"videos\[0\].*not a decodable video"):
        planner.plan(b"\x00\x00\x00\x18ftypmp42 this is not a video", 0, None)
    with pytest.raises(VideoError, match="video_fps must be a positive number"):
        planner.plan(CLIP, 0, -1.0)


# ---- preprocessing
@pytest.mark.parametrize("cap", [False, True])
def test_pixels_and_grid_equal_the_processor(checkpoint, reference, tmp_path, cap):
    processor = reference[1]
    # 1280x720 frames: over the per-frame cap (768 * 32^2 pixels), so the cap changes the grid
    data = video(4, 2, width=1280, height=720, seed=6)
    plan = VideoPlanner(processor, video_limits(cap_pixels_per_frame=cap)).plan(data, 0, None)
    encoder = VisionEncoder.__new__(VisionEncoder)
    encoder.video_processor, encoder.cap_pixels_per_frame = processor.video_processor, cap
    pixels, grid = encoder.preprocess_videos([plan])
    ref = reference_video_inputs(processor, tmp_path, [{"type": "video"}], [], [data], cap=cap)
    assert torch.equal(grid, ref["video_grid_thw"]) and tuple(grid[0].tolist()) == plan.grid
    assert torch.equal(pixels, ref["pixel_values_videos"])
    if cap:
        assert int(grid[0, 1] * grid[0, 2]) * 16 * 16 <= 768 * 32 * 32


# ---- prompt: ids and MRoPE
PROMPT_CASES = {
    # content of the user turn, images, videos, our text_input
    "image-video-text": ([{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What changes?"}],
                         [png(90, 70, 7)], [CLIP], "<image><video>What changes?"),
    "video-before-image": ([{"type": "text", "text": "Watch "}, {"type": "video"}, {"type": "text", "text": " then "},
                            {"type": "image"}], [png(70, 100, 8)], [OTHER], "Watch <video> then <image>"),
    "two-videos": ([{"type": "video"}, {"type": "video"}, {"type": "text", "text": "Compare them."}],
                   [], [CLIP, OTHER], "Compare them."),
    "odd-frames": ([{"type": "video"}, {"type": "text", "text": "Count."}], [], [ODD], "Count."),
}


def _features(encoder, planner, images, videos):
    return encoder.encode([list(images) + [planner.plan(v, i, None) for i, v in enumerate(videos)]])[0]


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_prompt_ids_and_mrope_equal_transformers(served, planner, reference, tmp_path, case):
    engine, encoder = served
    model, processor = reference
    content, images, videos, text = PROMPT_CASES[case]
    ref = reference_video_inputs(processor, tmp_path, content, images, videos)
    features = _features(encoder, planner, images, videos)
    prompt = engine.prepare(text, features)
    assert prompt.input_ids.tolist() == ref["input_ids"][0].tolist()
    ref_positions, ref_delta = model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"],
                                                          ref.get("image_grid_thw"), ref["video_grid_thw"])
    assert torch.equal(prompt.positions, ref_positions[:, 0])
    assert prompt.rope_delta == int(ref_delta)
    # the 5.24 layout: the template's outer <|vision_start|>/<|vision_end|> kept around each video
    vs = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    groups = int(ref["video_grid_thw"][:, 0].sum())
    assert prompt.input_ids.tolist().count(vs) == groups + len(videos) + len(images)
    assert int(prompt.visual_mask.sum()) == int((ref["mm_token_type_ids"] > 0).sum())


def test_timestamp_is_printed_from_float64(served, planner):
    # frame 17 and 12 at 10 fps: (1.2 + 1.7) / 2 = 1.45, just under in float64: "1.4"
    engine, encoder = served
    features = _features(encoder, planner, [], [CLIP])
    assert features.video_timestamps.dtype == torch.float64
    text = engine.tokenizer.decode(engine.prepare("x", features).input_ids)
    assert "<0.3 seconds>" in text and "<1.4 seconds>" in text and "<2.6 seconds>" in text


# ---- encoder and language model
@pytest.mark.parametrize("case", ["image-video-text", "two-videos"])
def test_encoder_features_equal_transformers(served, planner, reference, tmp_path, case):
    _, encoder = served
    model, processor = reference
    content, images, videos, _ = PROMPT_CASES[case]
    ref = reference_video_inputs(processor, tmp_path, content, images, videos)
    with torch.no_grad():
        out = model.model.get_video_features(ref["pixel_values_videos"], ref["video_grid_thw"])
        parts = [model.model.get_image_features(ref["pixel_values"], ref["image_grid_thw"])] if images else []
    parts.append(out)
    ref_embeds = torch.cat([t for p in parts for t in p.pooler_output])   # images' rows, then videos'
    ref_deepstack = [torch.cat([t for p in parts for t in p.deepstack_features[layer]]) for layer in range(3)]
    got = _features(encoder, planner, images, videos)
    assert torch.equal(got.video_grid_thw, ref["video_grid_thw"])
    torch.testing.assert_close(got.visual_embeds, ref_embeds, rtol=0, atol=1e-5)
    for layer in range(3):
        torch.testing.assert_close(got.deepstack_embeds[layer], ref_deepstack[layer], rtol=0, atol=1e-5)
    assert ref_embeds.abs().mean() > 1e-2


@pytest.mark.parametrize("case", ["image-video-text", "video-before-image"])
def test_prefill_logits_equal_transformers(served, planner, reference, tmp_path, case):
    engine, encoder = served
    model, processor = reference
    content, images, videos, text = PROMPT_CASES[case]
    ref = reference_video_inputs(processor, tmp_path, content, images, videos)
    with torch.no_grad():
        ref_logits = model(**ref).logits[0]
    got = prefill_logits(engine, text, _features(encoder, planner, images, videos))
    torch.testing.assert_close(got, ref_logits, rtol=0, atol=1e-4)


# ---- through the served ensemble
def reference_generate(reference, tmp_path, content, images, videos, fps=None) -> list[int]:
    model, processor = reference
    inputs = reference_video_inputs(processor, tmp_path, content, images, videos, fps)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("case", ["video", "video-before-image", "one-frame", "fps-1"])
def test_ensemble_equals_transformers_generate(server, reference, tmp_path, case):
    fps = None
    if case == "video":
        content, images, videos, text = ([{"type": "video"}, {"type": "text", "text": "What happens?"}], [], [CLIP],
                                         "What happens?")
    elif case == "one-frame":
        content, images, videos, text = ([{"type": "video"}, {"type": "text", "text": "What is it?"}], [],
                                         [video(1, 5, seed=9)], "What is it?")
    elif case == "fps-1":
        content, images, videos, text = ([{"type": "video"}, {"type": "text", "text": "Go."}], [], [OTHER], "Go.")
        fps = 1.0
    else:
        content, images, videos, text = PROMPT_CASES[case]
    expected = reference_generate(reference, tmp_path, content, images, videos, fps)
    answer = ask(server.grpc_url, "grpc", True, prompt=text, images=images, videos=videos, video_fps=fps,
                 max_tokens=MAX_NEW, temperature=0.0)
    assert answer.token_ids == expected


def test_http_data_url_video_equals_grpc(server):
    grpc = ask(server.grpc_url, "grpc", False, prompt="Describe.", videos=[OTHER], max_tokens=4, temperature=0.0)
    http = infer(server.http_url, "http", prompt="Describe.", videos=[OTHER], max_tokens=4, temperature=0.0)
    assert http.token_ids == grpc.token_ids and http.num_input_tokens == grpc.num_input_tokens > 40


@pytest.mark.parametrize("data,message", [
    (b"RIFF\x00\x00\x00\x00AVI garbage", r"videos\[0\].*not a decodable video"),
    (video(601, 1, width=32, height=32, seed=10), r"videos\[0\] is 601.0 s long.*max_video_seconds"),
    (video(1, 1, width=4096, height=2048, seed=11, codec="mjpeg", container="avi"),
     r"videos\[0\] frames are 4096x2048.*max_video_frame_pixels"),
])
def test_bad_videos_get_invalid_argument_and_server_carries_on(server, data, message):
    failures = metric(server, "qwen3vl_encoder_failures_total")
    with pytest.raises(ServerError, match=message) as e:
        ask(server.grpc_url, "grpc", False, prompt="x", videos=[data], max_tokens=2)
    assert e.value.code == "INVALID_ARG"
    assert metric(server, "qwen3vl_encoder_failures_total") == failures + 1
    assert ask(server.grpc_url, "grpc", False, prompt="x", videos=[CLIP], max_tokens=2).token_ids


def test_video_markers_must_match(server):
    with pytest.raises(ServerError, match="markers") as e:
        ask(server.grpc_url, "grpc", False, prompt="<video><video> two?", videos=[CLIP], max_tokens=2)
    assert e.value.code == "INVALID_ARG"


def test_client_cli_sends_a_video_with_fps(server, tmp_path, capsys):
    import json

    from qwen3vl.cli.client import main

    path = tmp_path / "clip.mp4"
    path.write_bytes(OTHER)
    assert main(["--url", server.grpc_url, "--video", str(path), "--fps", "1", "--prompt", "Go.", "--max-tokens", "3",
                 "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = ask(server.grpc_url, "grpc", False, prompt="Go.", videos=[OTHER], video_fps=1.0, max_tokens=3,
               temperature=0.0)
    assert out["output_ids"] == want.token_ids and out["num_input_tokens"] == want.num_input_tokens
