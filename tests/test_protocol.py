"""The encoder side of the E->L transfer, planned without a server: which responses answer a
request, chunked or whole, through shared memory or not; and how the language side reads an
encoder's error answers (by their code, never their prose)."""

from __future__ import annotations

import pytest
import torch

from qwen3vl import errors
from qwen3vl.disagg.protocol import ChunkRequest, plan_responses
from qwen3vl.disagg.stream import EncoderRejected, classify
from qwen3vl.errors import InvalidInput, NotCached, SharedMemoryUnavailable
from qwen3vl.features import VisualFeatures

H, L = 6, 3


def result(n: int) -> VisualFeatures:
    g = torch.Generator().manual_seed(n)
    return VisualFeatures(torch.randn(n, H, generator=g), torch.randn(L, n, H, generator=g),
                          torch.tensor([[1, 2, 2 * n]]))


def no_region(name, piece):
    raise AssertionError("no region was asked for")


def test_without_chunk_tokens_one_whole_response():
    r = result(10)
    [response] = plan_responses(r, ChunkRequest(), no_region)
    assert response.final and response.chunk_start is None and response.features is r


@pytest.mark.parametrize("n,chunk,resume,max_chunks", [(10, 4, 0, 0), (10, 4, 6, 0), (10, 3, 0, 2), (10, 10, 0, 0),
                                                       (10, 1, 9, 0), (0, 4, 0, 0), (10, 4, 10, 0)])
def test_chunks_cover_the_rest_of_the_tokens_in_order(n, chunk, resume, max_chunks):
    r = result(n)
    responses = plan_responses(r, ChunkRequest(chunk, resume, max_chunks), no_region)
    assert [x.final for x in responses] == [False] * (len(responses) - 1) + [True]
    starts = [x.chunk_start for x in responses]
    want = list(range(resume, max(n, resume + 1), chunk))[:max_chunks or None]
    assert starts == want
    assert all(x.total_tokens == n for x in responses)
    got = torch.cat([x.features.visual_embeds for x in responses])
    end = min(n, resume + chunk * max_chunks) if max_chunks else n
    assert torch.equal(got, r.visual_embeds[resume:end])
    assert torch.equal(torch.cat([x.features.deepstack_embeds for x in responses], 1), r.deepstack_embeds[:, resume:end])


def test_a_shared_memory_chunk_goes_into_the_region_and_the_response_carries_it_empty():
    r, written = result(10), {}
    [response] = plan_responses(r, ChunkRequest(4, 2, 1, "qwen3vl-transfer-x"),
                                lambda name, piece: written.setdefault(name, piece))
    piece = written["qwen3vl-transfer-x"]
    assert torch.equal(piece.visual_embeds, r.visual_embeds[2:6])
    assert response.final and response.chunk_start == 2 and response.total_tokens == 10
    assert response.features.visual_embeds.shape == (0, H) and response.features.deepstack_embeds.shape == (L, 0, H)
    assert response.shm_bytes == piece.nbytes


def test_a_region_that_cannot_be_written_is_unsupported_whatever_the_cause():
    def broken(name, piece):
        raise OSError(28, "No space left on device")

    with pytest.raises(SharedMemoryUnavailable, match="No space left") as e:
        plan_responses(result(4), ChunkRequest(4, 0, 1, "qwen3vl-transfer-x"), broken)
    assert errors.code_of(e.value) == errors.UNSUPPORTED


@pytest.mark.parametrize("request_kw,why", [
    (dict(chunk_tokens=0), "chunk_tokens must be >= 1"),
    (dict(chunk_tokens=4, resume_from=11), "resume_from 11 is outside"),
    (dict(chunk_tokens=4, resume_from=-1), "resume_from -1 is outside"),
])
def test_bad_chunking_inputs_are_invalid_arguments(request_kw, why):
    with pytest.raises(InvalidInput, match=why):
        plan_responses(result(10), ChunkRequest(**request_kw), no_region)


def test_a_region_without_a_size_is_an_invalid_argument():
    with pytest.raises(InvalidInput, match="shm_region needs chunk_tokens"):
        ChunkRequest(shm_region="qwen3vl-transfer-x")


@pytest.mark.parametrize("error,kind", [
    (InvalidInput("images[0] is not a decodable image"), EncoderRejected),
    (NotCached("images[0] is not in the encoder's cache"), NotCached),
    (SharedMemoryUnavailable("shared-memory region 'x' does not exist"), SharedMemoryUnavailable),
    (errors.Unavailable("no encoder could serve it"), ConnectionError),
    (RuntimeError("vision encoder failed"), ConnectionError),         # INTERNAL: retry elsewhere
    (RuntimeError("Socket closed"), ConnectionError),                 # not ours: transport
    (RuntimeError("Request for unknown model: 'qwen3_encoder' is not found"), ConnectionError),
])
def test_the_language_side_reads_an_encoders_answer_by_its_code(error, kind):
    """What the stream client gets is a message: marked as the encoder's shell marks it (plus
    the prefix tritonclient may add), or not marked at all when it is not ours."""
    ours = isinstance(error, errors.ServingError) or str(error).startswith("vision")
    wire = "[StatusCode.INTERNAL] " + (errors.marked(errors.code_for(error), str(error)) if ours else str(error))
    got = classify(RuntimeError(wire))
    assert type(got) is kind
    if kind is not ConnectionError:
        assert str(got) == str(error)  # the marker and the client's prefix are gone


def test_prose_that_looks_like_a_code_is_not_a_code():
    """A message that merely mentions a code (an image file name, say) is not marked."""
    assert errors.code_of("images[0] named 'NOT_FOUND.png' is not a decodable image") is None
    assert errors.code_of(errors.marked(errors.NOT_FOUND, "[qwen3vl:INVALID_ARG] x")) == errors.INVALID_ARG


def test_wire_format_and_request_state_load_without_transformers_modeling():
    """The E->L features live beside the contract (qwen3vl.features), not beside the vision
    tower: the wire protocol and the engine's request state import no transformers modeling."""
    import subprocess
    import sys

    code = ("import sys, qwen3vl.disagg.protocol, qwen3vl.engine.sequence; "
            "print([m for m in sys.modules if m.startswith('transformers.models') or 'modeling' in m])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded
