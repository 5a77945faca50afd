"""The served pipeline against transformers' generate(do_sample=False), through the ensemble
over gRPC (streaming) and HTTP (one response), plus sampling, chat and error handling."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import IMAGE_CASES, metric, png, reference_generate, reference_inputs
from qwen3vl.client import ServerError, ask, infer, stream_grpc

MAX_NEW = 12
CASES = IMAGE_CASES
PROMPT = "Describe the picture."


@pytest.fixture(scope="module")
def expected(reference):
    return {case: reference_generate(reference, PROMPT, images, MAX_NEW) for case, images in CASES.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grpc_streaming_matches_transformers(server, expected, case):
    chunks = list(stream_grpc(server.grpc_url, prompt=PROMPT, images=CASES[case], max_tokens=MAX_NEW, temperature=0.0))
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == expected[case]
    # really streamed: a response per new token, except that the server's response thread merges
    # a request's pieces that queued up while it was sending (tests/test_worker.py)
    assert 1 < len(chunks) <= len(ids) and all(c.token_ids for c in chunks)
    assert all(c.finish_reason == "" for c in chunks[:-1])
    assert chunks[-1].finish_reason in ("length", "stop")


@pytest.mark.parametrize("case", sorted(CASES))
def test_http_one_response_matches_transformers(server, expected, case):
    answer = infer(server.http_url, "http", prompt=PROMPT, images=CASES[case], max_tokens=MAX_NEW, temperature=0.0)
    assert answer.token_ids == expected[case]
    assert answer.finish_reason == ("stop" if len(answer.token_ids) < MAX_NEW else "length")


def test_language_model_serves_text_only_directly(server, expected):
    chunks = list(stream_grpc(server.grpc_url, model="qwen3_language", prompt=PROMPT, max_tokens=MAX_NEW,
                              temperature=0.0))
    assert [t for c in chunks for t in c.token_ids] == expected["text-only"]


def test_streamed_text_equals_whole_text(server, checkpoint):
    from transformers import AutoTokenizer

    images = CASES["one-image"]
    streamed = ask(server.grpc_url, "grpc", True, prompt="Hello there", images=images, max_tokens=20, temperature=0.0)
    whole = infer(server.grpc_url, "grpc", prompt="Hello there", images=images, max_tokens=20, temperature=0.0)
    assert streamed.token_ids == whole.token_ids
    assert streamed.text == whole.text
    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert whole.text == tok.decode(whole.token_ids, skip_special_tokens=True)


def test_sampling_with_a_seed_repeats_and_seeds_differ(server):
    def sample(seed):
        return infer(server.http_url, "http", prompt="Tell me a story", max_tokens=16, temperature=1.0,
                     top_p=0.95, top_k=50, seed=seed).token_ids

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert sample(9) != first


def test_chat_messages_with_system_prompt_and_image_markers(server, reference):
    model, processor = reference
    image = CASES["one-image"][0]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": "Say more."},
    ]
    import io

    from PIL import Image

    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(io.BytesIO(image))], return_tensors="pt")
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    got = infer(server.http_url, "http", prompt=json.dumps(messages), images=[image], max_tokens=8, temperature=0.0)
    assert got.token_ids == want
    # `<image>` markers place images inside a plain prompt: same as the equivalent chat.
    marked = infer(server.http_url, "http", prompt="Look:<image>What is it?", images=[image], max_tokens=8,
                   temperature=0.0)
    chat = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"},
                                         {"type": "text", "text": "What is it?"}]}]
    assert marked.token_ids == infer(server.http_url, "http", prompt=json.dumps(chat), images=[image], max_tokens=8,
                                     temperature=0.0).token_ids


BAD_REQUESTS = [
    (dict(prompt="hi", max_tokens=0), "max_tokens must be >= 1"),
    (dict(prompt="hi", temperature=-1.0), "temperature must be >= 0"),
    (dict(prompt="hi", top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(prompt="a <image> and <image>", images=[png(64, 64, 1)]), "2 '<image>' markers but the request has 1"),
    (dict(prompt="[not json", images=[]), "not a JSON message list"),
    (dict(prompt="hi", images=[b"\x89PNG broken"]), r"images\[0\].*not a decodable image"),
    (dict(prompt="hi", images=[png(32, 32, 1), b"GIF89a" + bytes(20)]), r"images\[1\].*not a decodable image"),
    (dict(prompt="hi", max_tokens=10**7), "exceeds the context window"),
    (dict(prompt="hi", top_k=-2), "top_k must be >= 0"),
]
# Data URLs as the image bytes themselves (gRPC; over HTTP the client wraps every image in a
# data URL of its own, so those go as raw JSON in the next test).
BAD_DATA_URLS = [
    (dict(prompt="hi", images=[b"data:image/png;base64,@@@"]), r"images\[0\]: bad base64 in data URL"),
    (dict(prompt="hi", images=[b"data:image/png,rawtext"]), r"images\[0\]: a data URL must be base64"),
]


@pytest.mark.parametrize("protocol, request_kwargs, message",
                         [(p, kw, m) for p in ("grpc", "http") for kw, m in BAD_REQUESTS]
                         + [("grpc", kw, m) for kw, m in BAD_DATA_URLS])
def test_bad_requests_get_clear_errors_and_server_stays_healthy(server, protocol, request_kwargs, message):
    """Each names the input and the problem, carries INVALID_ARG (HTTP: 400; gRPC: the marker
    on the stream's message), holds no Python object's repr, and the server carries on."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with pytest.raises(ServerError, match=message) as e:
        infer(url, protocol, **request_kwargs)
    assert e.value.code == "INVALID_ARG"
    if protocol == "http":
        assert e.value.http_status == 400
    assert " object at 0x" not in str(e.value)
    assert infer(url, protocol, prompt="still there?", max_tokens=2, temperature=0.0).finish_reason == "length"


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 4}, "text_input is required"),                        # a required input missing
    ({"text_input": "hi", "max_tokens": [1, 2]}, "max_tokens"),           # the wrong shape
    ({"text_input": "hi", "images": ["data:image/png;base64,@@@"]}, "images[0]: bad base64 in data URL"),
    ({"text_input": "hi", "images": ["data:image/png,raw"]}, "images[0]: a data URL must be base64"),
])
def test_malformed_http_requests_answer_400_naming_the_input(server, body, message):
    """Through Triton's generate endpoint: a wrong shape Triton itself rejects (no marker); a
    missing text_input and bad data URLs reach the encoder and come back marked INVALID_ARG.
    All answer 400 naming the input."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{server.http_url}/v2/models/ensemble/generate",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400
    assert message in json.loads(e.value.read())["error"]
    assert infer(server.http_url, "http", prompt="still there?", max_tokens=2, temperature=0.0).finish_reason == "length"


def test_cancelling_a_stream_stops_generation(server):
    """A client that goes away mid-stream frees the model: generation stops early."""
    import queue
    import time

    import tritonclient.grpc as grpcclient

    from qwen3vl.client import build_inputs

    def generated():
        return metric(server, "qwen3vl_language_generated_tokens_total")

    before = generated()
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("qwen3_language", build_inputs(grpcclient, "Tell me everything", max_tokens=4000,
                                                              temperature=0.0, stream=True, ignore_eos=True))
    for _ in range(3):
        result, error = results.get(timeout=60)
        assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    # The next request is served promptly: the cancelled one no longer holds the model.
    start = time.monotonic()
    assert infer(server.http_url, "http", prompt="next", max_tokens=2, temperature=0.0).finish_reason == "length"
    assert time.monotonic() - start < 30
    assert generated() - before < 4000


def test_repeated_image_is_restored_from_the_prefix_cache(server, reference):
    """A second question about the same image restores the image's KV instead of prefilling it,
    and still answers what transformers answers."""
    image = [png(224, 160, 77)]
    visual_tokens = (224 // 32) * (160 // 32)  # 16-pixel patches, 2x2 merge
    ask(server.grpc_url, "grpc", True, prompt="Describe the picture.", images=image, max_tokens=2, temperature=0.0)
    hits, cached = metric(server, "qwen3vl_language_prefix_cache_hits_total"), \
        metric(server, "qwen3vl_language_prefix_cache_tokens_total")
    prefilled = metric(server, "qwen3vl_language_prefill_tokens_total")
    question = "Which colour is in the top left corner?"
    answer = ask(server.grpc_url, "grpc", True, prompt=question, images=image, max_tokens=MAX_NEW, temperature=0.0)
    assert metric(server, "qwen3vl_language_prefix_cache_hits_total") == hits + 1
    restored = metric(server, "qwen3vl_language_prefix_cache_tokens_total") - cached
    assert restored >= visual_tokens - 16  # whole KV blocks of 16 tokens: the image's, up to its last block
    prompt_tokens = reference_inputs(reference[1], question, image)["input_ids"].shape[1]
    # the question and the image's tail past its last full block, not the image
    assert metric(server, "qwen3vl_language_prefill_tokens_total") - prefilled == prompt_tokens - restored
    assert answer.token_ids == reference_generate(reference, question, image, MAX_NEW)
