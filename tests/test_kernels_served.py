"""A served language model on the OpenAI Triton kernels (`--kernels triton`; on a CPU under
Triton's interpreter, set in the server's environment) answers what the torch kernels and
transformers answer, for concurrent text-only and image requests through the ensemble."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import IMAGE_CASES, LOG_DIR, reference_generate
from qwen3vl.client import ask
from qwen3vl.launch.server import Server

MAX_NEW = 4  # each step runs every kernel under the interpreter: a few tokens say enough
REQUESTS = [("Describe the picture.", IMAGE_CASES["one-image"]), ("Hello there", []),
            ("Describe the picture.", IMAGE_CASES["two-images"])]


@pytest.fixture(scope="module")
def triton_server(checkpoint):
    with Server(checkpoint, LOG_DIR / "kernels-triton.log", models=("ensemble", "qwen3_encoder", "qwen3_language"),
                extra=["--device", "cpu", "--kernels", "triton"], env={"TRITON_INTERPRET": "1"}) as s:
        yield s
        assert s.alive(), f"server died during the tests:\n{s.tail()}"


def test_triton_kernels_serve_the_torch_kernels_and_transformers_tokens(triton_server, server, reference):
    def on(url):
        return lambda r: ask(url, "grpc", True, prompt=r[0], images=r[1], max_tokens=MAX_NEW, temperature=0.0)

    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # together: they share the engine's steps
        served = [a.token_ids for a in pool.map(on(triton_server.grpc_url), REQUESTS)]
    on_torch = [on(server.grpc_url)(r).token_ids for r in REQUESTS]
    expected = [reference_generate(reference, prompt, images, MAX_NEW) for prompt, images in REQUESTS]
    assert served == on_torch == expected
    assert all(len(ids) == MAX_NEW for ids in served)


def test_triton_on_a_cpu_without_the_interpreter_is_refused_clearly(checkpoint, tmp_path):
    """The setting is checked before any weight is loaded: the server does not start, and its
    log says why and what to do."""
    s = Server(checkpoint, tmp_path / "refused.log", models=("qwen3_language",),
               extra=["--device", "cpu", "--kernels", "triton"], env={"TRITON_INTERPRET": "0"}, ready_timeout_s=120)
    with pytest.raises(RuntimeError, match="exited"):
        s.start()
    s.stop()
    assert "needs Triton's interpreter: set TRITON_INTERPRET=1" in (tmp_path / "refused.log").read_text()
