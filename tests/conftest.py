"""Shared fixtures: tiny random checkpoints, the transformers reference, and real servers."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# Off a GPU the OpenAI Triton kernels run under Triton's interpreter, and triton decides that when
# it is first imported (its standard library's @jit functions): set it before anything imports
# triton (transformers does, through its image processors). Servers the tests start inherit it,
# which changes nothing where kernels=auto picks torch on a CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from PIL import Image  # noqa: E402

from qwen3vl.launch.processes import SHM_DIR, STUB, ModelProcess, process_table  # noqa: E402
from qwen3vl.launch.server import Server  # noqa: E402
from qwen3vl.paths import PACKAGE_ROOT  # noqa: E402
from qwen3vl.tools.make_checkpoint import make_checkpoint  # noqa: E402

LOG_DIR = Path(os.environ.get("QWEN3VL_TEST_LOGS", Path(__file__).resolve().parents[1] / ".work" / "test-logs"))


def png(width: int, height: int, seed: int) -> bytes:
    """A random-noise PNG (noise, so every patch differs and a mix-up shows)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def video(frames: int, fps: float, width: int = 64, height: int = 48, seed: int = 0, codec: str = "mpeg4",
          container: str = "mp4") -> bytes:
    """A video file of seeded-noise frames, written with PyAV (its wheel bundles the encoders)."""
    import fractions

    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(100000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


# Prompts with no, one and two images (different sizes and aspect ratios), shared by the tests.
IMAGE_CASES = {
    "text-only": [],
    "one-image": [png(200, 130, 1)],
    "two-images": [png(96, 300, 2), png(260, 180, 3)],
}


def metric(server, name: str) -> float:
    """A counter's value summed over its labels, from the server's Prometheus endpoint."""
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def leftovers(processes: list[ModelProcess], timeout_s: float) -> list[str]:
    """What of `processes` is still there after up to `timeout_s`: a model process still
    running, a shared-memory region of one in /dev/shm. Empty once all are gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [f"model process {p.pid} ({p.model})" for p in processes if p.alive()]
        left += [f"{SHM_DIR}/{name}" for p in processes for name in p.regions()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def orphaned_model_processes() -> list[int]:
    """Stubs of this checkout's models (their environment names its package) whose tritonserver
    has gone: their parent is no tritonserver any more (init, or a subreaper)."""
    table = process_table()
    mine = f"QWEN3VL_PACKAGE_ROOT={PACKAGE_ROOT}".encode()
    orphans = []
    for pid, (ppid, name, state) in table.items():
        if not STUB.startswith(name) or state == "Z" or table.get(ppid, (0, ""))[1] == "tritonserver":
            continue
        try:
            if mine in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                orphans.append(pid)
        except OSError:
            continue
    return orphans


def pytest_sessionfinish(session, exitstatus):
    """The tests leave no model process behind: one whose server has gone fails the run (after
    10 s: one may be on its way out)."""
    deadline = time.monotonic() + 10
    while (orphans := orphaned_model_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if orphans:
        print(f"\nmodel processes left behind by their servers (tritonserver gone): {orphans}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-hub", "tiny", seed=0, layout="hub")


@pytest.fixture(scope="session")
def reference(checkpoint):
    """transformers' model and the checkpoint's own processor: the oracle."""
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def server(checkpoint):
    """One aggregated tritonserver for the session (ensemble, encoder, language)."""
    # A short queue delay lets concurrent encoder requests meet in one forward deterministically.
    os.environ["QWEN3VL_ENCODER_MAX_QUEUE_DELAY_MS"] = "50"
    with Server(checkpoint, LOG_DIR / "aggregated.log", models=("ensemble", "qwen3_encoder", "qwen3_language"),
                extra=["--device", "cpu"]) as s:
        yield s
        assert s.alive(), f"server died during the tests:\n{s.tail()}"


def reference_inputs(processor, prompt: str, images: list[bytes]):
    """What transformers gets for the same request: the processor on the same image bytes, with
    the images first in one user turn (our documented default placement)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    pil = [Image.open(io.BytesIO(b)) for b in images]
    return processor(text=[text], images=pil or None, return_tensors="pt")


def reference_generate(reference, prompt: str, images: list[bytes], max_new_tokens: int) -> list[int]:
    model, processor = reference
    inputs = reference_inputs(processor, prompt, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
