"""The OpenAI-compatible API (`qwen3vl-openai`) against a real tritonserver, driven by the official
`openai` client and by raw HTTP: answers equal the ensemble's over gRPC (and, greedy,
transformers'), usage is the model's token counts, stop strings and clients that go away cancel
the generation in the model, every unsupported or malformed field gets a 400 in OpenAI's shape,
and the service stays up through all of it."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx2
import openai
import pytest
import torch
from conftest import LOG_DIR, metric, png, video
from PIL import Image
from qwen3vl.cli import openai_server, serve
from qwen3vl.client import infer, stream_grpc
from qwen3vl.launch import tritonserver
from qwen3vl.launch.server import free_ports
from qwen3vl.openai import DEFAULT_MODEL_NAME
from qwen3vl.openai.app import ServiceConfig, create_app
from qwen3vl.openai.errors import APIError
from qwen3vl.openai.images import ImagePolicy, decode_data_url, domain_allowed
from qwen3vl.engine.stop import StopStrings

ROOT = Path(__file__).resolve().parents[1]
MODEL = "qwen3-vl-tiny"
MAX_NEW = 12
# A prompt whose greedy answer on the test checkpoint is long (the stop and cancel tests check
# that first: the `long_answer` fixture), so that a generation left running shows in the counts.
LONG_PROMPT = "Once upon a time"
LONG_MAX = 2000


def data_url(image: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(image).decode()}"


def image_part(image: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image), "detail": "low"}}


IMAGE_A, IMAGE_B = png(200, 130, 1), png(96, 300, 2)
CLIP = video(20, 5, seed=21)  # 4 s: 8 frames sampled at the default 2 fps, 4 at 1 fps

# (OpenAI messages, the same conversation as the JSON chat the ensemble takes, its images)
CASES = {
    "text-only": (
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Describe the picture."}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Describe the picture."}],
        []),
    "one-image": (
        [{"role": "user", "content": [image_part(IMAGE_A), {"type": "text", "text": "What is this?"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        [IMAGE_A]),
    "two-images-two-turns": (
        [{"role": "user", "content": [image_part(IMAGE_A), {"type": "text", "text": "What is this?"}]},
         {"role": "assistant", "content": "A picture."},
         {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(IMAGE_B)]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
         {"role": "assistant", "content": "A picture."},
         {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]}],
        [IMAGE_A, IMAGE_B]),
}


# ---- the service ---------------------------------------------------------------------------


class Api:
    def __init__(self, base: str, proc: subprocess.Popen | None = None):
        self.base, self.proc = base, proc
        self.http = httpx2.Client(base_url=base, timeout=120)

    def post(self, body: dict, **kw) -> httpx2.Response:
        return self.http.post("/v1/chat/completions", json=body, **kw)

    def metric(self, name: str, **labels) -> float:
        text = self.http.get("/metrics").text
        total = 0.0
        for line in text.splitlines():
            named = line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")
            if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def wait_healthy(base: str, timeout_s: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, "the OpenAI service exited"
        try:
            if httpx2.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base}/health not ready within {timeout_s} s")


@pytest.fixture(scope="module")
def api(server):
    """`qwen3vl-openai` as its own process in front of the session's tritonserver."""
    (port,) = free_ports(1)
    log_path = LOG_DIR / "openai.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qwen3vl.cli.openai_server", "--triton-url", server.grpc_url,
                                 "--port", str(port), "--model-name", MODEL], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc=proc)
            yield Api(f"http://127.0.0.1:{port}", proc)
            assert proc.poll() is None, f"the service died:\n{log_path.read_text()[-4000:]}"
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
    log_text = log_path.read_text()
    # uvicorn shuts down cleanly, then dies of the signal it caught, as a supervisor expects
    assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in log_text, log_text[-4000:]
    assert "Traceback" not in log_text, log_text[-4000:]


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api.base + "/v1", api_key="unused", max_retries=0, timeout=120)


class InProcess:
    """The app under uvicorn on a thread of this process (services with other settings)."""

    def __init__(self, config: ServiceConfig):
        import uvicorn

        (self.port,) = free_ports(1)
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Api:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return Api(f"http://127.0.0.1:{self.port}")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


# ---- what the ensemble and transformers answer ---------------------------------------------


def reference_answer(reference, chat: list[dict], images: list[bytes]) -> tuple[list[int], int]:
    """transformers' greedy ids for the conversation, and its prompt's token count."""
    model, processor = reference
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    pil = [Image.open(io.BytesIO(b)) for b in images]
    inputs = processor(text=[text], images=pil or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    return out[0, prompt_len:].tolist(), prompt_len


@pytest.fixture(scope="module")
def expected(server, reference):
    """Per case: the ensemble's answer over gRPC for the same conversation, and transformers'."""
    out = {}
    for case, (_, chat, images) in CASES.items():
        ensemble = infer(server.grpc_url, "grpc", prompt=json.dumps(chat), images=images, max_tokens=MAX_NEW,
                         temperature=0.0)
        out[case] = (ensemble, *reference_answer(reference, chat, images))
    return out


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def long_answer(server):
    """The ensemble's streamed greedy answer to LONG_PROMPT: its pieces, ids and finish reason."""
    chunks = list(stream_grpc(server.grpc_url, prompt=LONG_PROMPT, max_tokens=LONG_MAX, temperature=0.0))
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) >= 800, "the long prompt's answer is too short to show a cancelled generation"
    return chunks, ids


def wait_for_language_requests(server, count: float, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(server, "qwen3vl_language_requests_total") < count:
        assert time.monotonic() < deadline, "the generation did not finish"
        time.sleep(0.1)


# ---- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_answers_equal_the_ensemble_and_transformers(client, expected, tokenizer, case, stream):
    messages, _, _ = CASES[case]
    ensemble, reference_ids, prompt_len = expected[case]
    assert ensemble.token_ids == reference_ids  # the ensemble is transformers' greedy answer
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": MAX_NEW, "temperature": 0.0}
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        *answer, usage_chunk = chunks
        assert answer[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in answer)
        finish_reason = answer[-1].choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in answer[:-1])
        assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
        assert usage_chunk.choices == [] and all(c.usage is None for c in answer)
        usage = usage_chunk.usage
    else:
        completion = client.chat.completions.create(**kwargs)
        assert completion.object == "chat.completion" and completion.model == MODEL
        (choice,) = completion.choices
        assert choice.message.role == "assistant"
        text, finish_reason, usage = choice.message.content, choice.finish_reason, completion.usage
    assert text == ensemble.text
    assert text == tokenizer.decode(reference_ids, skip_special_tokens=True)
    assert finish_reason == ensemble.finish_reason == ("stop" if len(reference_ids) < MAX_NEW else "length")
    assert usage.prompt_tokens == prompt_len == ensemble.num_input_tokens
    assert usage.completion_tokens == len(reference_ids)
    assert usage.total_tokens == prompt_len + len(reference_ids)


def test_server_sent_events_follow_openai(api, expected):
    """Raw events: `data: ` lines, one id, the role first, content deltas, the finish reason, the
    usage chunk with no choices, then `data: [DONE]`; the Content-Type is text/event-stream."""
    messages, _, _ = CASES["one-image"]
    body = {"model": MODEL, "messages": messages, "max_tokens": MAX_NEW, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
    with api.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["delta"] == {} and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] == expected["one-image"][2]
    assert len({(e["id"], e["created"]) for e in events}) == 1
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected["one-image"][0].text


def test_max_completion_tokens_wins_and_seeds_repeat(client, server):
    messages = [{"role": "user", "content": "Tell me a story"}]
    want = infer(server.grpc_url, "grpc", prompt="Tell me a story", max_tokens=5, temperature=0.0)
    assert want.finish_reason == "length"  # else 5 and 9 tokens could not be told apart
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                                max_completion_tokens=5, temperature=0)
    assert completion.choices[0].message.content == want.text
    assert completion.usage.completion_tokens == 5 and completion.choices[0].finish_reason == "length"

    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=1.0,
                                              top_p=0.95, seed=seed, extra_body={"top_k": 50}).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


# ---- stop strings and cancelling -----------------------------------------------------------


def boundary_stop(chunks) -> str:
    """A stop string across the boundary of two streamed pieces (2 characters of each)."""
    for i in range(3, len(chunks) - 1):
        if len(chunks[i].text) >= 2 and len(chunks[i + 1].text) >= 2:
            return chunks[i].text[-2:] + chunks[i + 1].text[:2]
    raise AssertionError("no two neighbouring pieces of 2 characters or more")


def tokens_up_to_stop(checkpoint, ids: list[int], stop: str) -> int:
    """How many of the answer's tokens it holds when it stops at `stop`: up to and including the
    token whose text completes the stop string (as vLLM counts), by the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return next(k for k in range(1, len(ids) + 1)
                if stop in tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_strings_end_the_text_and_the_generation(api, client, server, checkpoint, long_answer, stream):
    """The text ends just before the stop string, and the answer's tokens at the token that
    completes it: `completion_tokens` is that count, streamed or not, and it is all the model
    generated (it stops there itself)."""
    chunks, ids = long_answer
    full = "".join(c.text for c in chunks)
    stop = boundary_stop(chunks)
    want = full[:full.index(stop)]
    requests, generated = (metric(server, f"qwen3vl_language_{m}_total") for m in ("requests", "generated_tokens"))
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": LONG_MAX,
                  "temperature": 0, "stop": ["\x00 never in the text", stop]}
    if stream:
        pieces = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in pieces[:-1])
        finish_reason, usage = pieces[-2].choices[0].finish_reason, pieces[-1].usage
    else:
        completion = client.chat.completions.create(**kwargs)
        text, finish_reason, usage = (completion.choices[0].message.content, completion.choices[0].finish_reason,
                                      completion.usage)
    assert text == want and finish_reason == "stop"
    assert usage.prompt_tokens == chunks[-1].num_input_tokens
    assert usage.completion_tokens == tokens_up_to_stop(checkpoint, ids, stop) < len(ids) // 2
    wait_for_language_requests(server, requests + 1)
    assert metric(server, "qwen3vl_language_generated_tokens_total") - generated == usage.completion_tokens


def test_the_stop_parameter_through_tritons_generate_endpoint(server, long_answer):
    """Stop strings are the model's (the request parameter `stop`, a JSON array as text), so
    Triton's own clients have them too; anything else there is refused naming it."""
    chunks, ids = long_answer
    full = "".join(c.text for c in chunks)
    stop = boundary_stop(chunks)
    url = f"http://{server.http_url}/v2/models/ensemble/generate"
    body = {"text_input": LONG_PROMPT, "max_tokens": LONG_MAX, "temperature": 0.0}
    answer = httpx2.post(url, json={**body, "stop": json.dumps([stop])}, timeout=120).json()
    assert answer["text_output"] == full[:full.index(stop)] and answer["finish_reason"] == "stop"
    for bad in ("not json", json.dumps(["ok", 3]), json.dumps([""])):
        r = httpx2.post(url, json={**body, "stop": bad}, timeout=120)
        assert r.status_code == 400 and "stop" in r.json()["error"], (bad, r.text)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_goes_away_cancels_the_generation(api, server, long_answer, stream):
    _, ids = long_answer
    requests, generated = (metric(server, f"qwen3vl_language_{m}_total") for m in ("requests", "generated_tokens"))
    cancelled = api.metric("qwen3vl_openai_cancelled_requests_total", reason="client_disconnected")
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": LONG_MAX,
                "temperature": 0, "stream": stream}
    if stream:
        with httpx2.Client(base_url=api.base, timeout=60) as http, \
                http.stream("POST", "/v1/chat/completions", json=body) as response:
            events = response.iter_lines()
            received = [line for line, _ in zip(events, range(8))]
            assert all(line.startswith("data: {") or not line for line in received)
    else:
        with pytest.raises(httpx2.ReadTimeout), httpx2.Client(base_url=api.base, timeout=1.0) as http:
            http.post("/v1/chat/completions", json=body)
    wait_for_language_requests(server, requests + 1)
    assert metric(server, "qwen3vl_language_generated_tokens_total") - generated < len(ids) // 2
    deadline = time.monotonic() + 10
    while api.metric("qwen3vl_openai_cancelled_requests_total", reason="client_disconnected") < cancelled + 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert api.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


# ---- errors --------------------------------------------------------------------------------


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def with_content(*parts) -> dict:
    return chat(messages=[{"role": "user", "content": list(parts)}])


TEXT = {"type": "text", "text": "hi"}
REFUSED = [  # (body, the field the 400 names)
    (chat(n=2), "n"),
    (chat(logprobs=True), "logprobs"),
    (chat(top_logprobs=3), "top_logprobs"),
    (chat(tools=[{"type": "retrieval"}]), "tools[0].type"),  # function tools only (test_structured_api.py)
    (chat(functions=[{"name": "f"}]), "functions"),
    (chat(logit_bias={"100": 5}), "logit_bias"),
    (chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    (chat(modalities=["text", "audio"]), "modalities"),
    (chat(response_format={"type": "yaml"}), "response_format.type"),
    (chat(frequency_penalty=0.5), "frequency_penalty"),
    (chat(presence_penalty=-0.5), "presence_penalty"),
    (chat(prediction={"type": "content", "content": "x"}), "prediction"),
    (with_content({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
     "messages[0].content[0].type"),
    (with_content(TEXT, {"type": "file", "file": {"file_id": "f"}}), "messages[0].content[1].type"),
    (chat(messages=[{"role": "user", "content": "hi"}, {"role": "function", "content": "42", "name": "f"}]),
     "messages[1].role"),
    (chat(messages=[{"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]),
     "messages[0].function_call"),
    (chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE_A)}}]}]),
     "messages[0].content[0]"),
]
MALFORMED = [
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=2.5), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_k=-2), "top_k"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_completion_tokens=1.5), "max_completion_tokens"),
    (chat(seed="7"), "seed"),
    (chat(seed=2**64), "seed"),
    (chat(stream="yes"), "stream"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(stop=[""]), "stop"),
    (chat(stop=7), "stop"),
    (chat(stream_options={"include_usage": True}), "stream_options"),  # without stream
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (chat(tool_choice="required"), "tool_choice"),  # without tools
    (chat(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]),
     "messages[0].tool_calls[0].function"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (with_content({"type": "text"}), "messages[0].content[0].text"),
    (with_content({"type": "image_url"}), "messages[0].content[0].image_url"),
    (with_content({"type": "image_url", "image_url": {"url": 5}}), "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
]
BAD_IMAGES = [  # (the second image's URL, the message)
    ("data:image/png;base64,@@@@", "bad base64"),
    ("data:image/png," + "rawbytes", "must be base64"),
    (data_url(b"GIF89a", "text/plain"), "not an image"),
    ("file:///etc/passwd", "must be a data URL"),
    (data_url(b"\x89PNG broken"), "not a decodable image"),  # the model's verdict, mapped to its place
    (data_url(b"GIF89a" + bytes(20)), "not a decodable image"),
]


def assert_openai_error(response: httpx2.Response, status: int, param: str | None, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    assert "Traceback" not in error["message"] and " object at 0x" not in error["message"]
    return error


@pytest.mark.parametrize("body, param", REFUSED, ids=[p for _, p in REFUSED])
def test_unsupported_fields_get_400_naming_the_field(api, body, param):
    error = assert_openai_error(api.post(body), 400, param, param.split(".")[0].split("[")[0])
    assert error["code"] == "unsupported_parameter"


@pytest.mark.parametrize("body, param", MALFORMED, ids=[f"{p}-{i}" for i, (_, p) in enumerate(MALFORMED)])
def test_malformed_fields_get_400_naming_the_field(api, body, param):
    counted = api.metric("qwen3vl_openai_requests_total", status="400")
    assert_openai_error(api.post(body), 400, param, param)
    assert api.metric("qwen3vl_openai_requests_total", status="400") == counted + 1  # every answer counted


@pytest.mark.parametrize("body, param", [
    (chat(messages=[{"role": "user", "content": "half a pair: \ud800"}]), "messages[0].content"),
    (with_content({"type": "text", "text": "\udfff!"}), "messages[0].content[0].text"),
    (chat(stream=True, messages=[{"role": "system", "content": "\ud83d"}, {"role": "user", "content": "hi"}]),
     "messages[0].content"),
], ids=["string", "text-part", "streamed"])
def test_an_unpaired_surrogate_gets_400_naming_the_field(api, body, param):
    """JSON can carry half a surrogate pair ("\\ud800"), which is no text: a 400 naming where, counted."""
    counted = api.metric("qwen3vl_openai_requests_total", status="400")
    response = api.http.post("/v1/chat/completions", content=json.dumps(body).encode(),  # ASCII-escaped, as sent
                             headers={"content-type": "application/json"})
    assert_openai_error(response, 400, param, param, "unpaired surrogate")
    assert api.metric("qwen3vl_openai_requests_total", status="400") == counted + 1
    assert api.post(chat()).status_code == 200  # and the service carries on


def test_a_png_labelled_as_generic_bytes_is_decided_by_its_content(api):
    """`data:application/octet-stream;base64,...` holding a PNG: the picture, as image/png."""
    answers = [api.post(chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGE_A, media_type)}}, TEXT]}],
        max_tokens=MAX_NEW, temperature=0)) for media_type in ("image/png", "application/octet-stream")]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[0].json()["choices"] == answers[1].json()["choices"]


@pytest.mark.parametrize("url, message", BAD_IMAGES, ids=[m for _, m in BAD_IMAGES])
def test_a_bad_image_gets_400_naming_its_place(api, url, message):
    body = chat(messages=[{"role": "user", "content": [image_part(IMAGE_A), TEXT]},
                          {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": [TEXT, {"type": "image_url", "image_url": {"url": url}}]}])
    assert_openai_error(api.post(body), 400, "messages[2].content[1].image_url.url", message)


def test_other_failures_answer_in_openai_shape(api, client):
    assert_openai_error(api.post(chat(max_tokens=10**7)), 400, None, "exceeds the context window")  # the model's
    assert_openai_error(api.post(chat(model="gpt-4o")), 404, "model", "gpt-4o")
    bad_json = api.http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(bad_json, 400, None, "not valid JSON")
    assert_openai_error(api.http.get("/v1/chat/completions"), 405, None)
    assert_openai_error(api.http.get("/v1/nothing"), 404, None)
    with pytest.raises(openai.BadRequestError) as e:  # the official client reads the shape
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    assert e.value.param == "n" and e.value.code == "unsupported_parameter"


def test_ignored_and_unknown_fields_change_nothing(api):
    """Fields accepted and ignored (and `developer` as `system`) give the plain request's answer."""
    plain = chat(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": [TEXT]}],
                 max_tokens=MAX_NEW, temperature=0)
    decorated = {**plain, "user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                 "parallel_tool_calls": True, "some_future_field": {"x": 1}, "n": 1, "logprobs": False,
                 "tool_choice": "none", "response_format": {"type": "text"}, "frequency_penalty": 0,
                 "modalities": ["text"],
                 "messages": [{"role": "developer", "content": "Be brief.", "name": "ops"},
                              {"role": "user", "content": [TEXT], "name": "me"}]}
    answers = [api.post(body) for body in (plain, decorated)]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[0].json()["choices"] == answers[1].json()["choices"]
    assert answers[0].json()["usage"] == answers[1].json()["usage"]


def test_models_health_and_metrics(api, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert_openai_error(api.http.get("/v1/models/other"), 404, "model", "other")
    assert api.http.get("/health").json() == {"status": "ok"}
    answered = api.metric("qwen3vl_openai_requests_total", status="200", stream="true")
    ttft = api.metric("qwen3vl_openai_time_to_first_token_seconds_count")
    refused = api.metric("qwen3vl_openai_requests_total", status="400")
    list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                        stream=True))
    api.post(chat(n=2))
    assert api.metric("qwen3vl_openai_requests_total", status="200", stream="true") == answered + 1
    assert api.metric("qwen3vl_openai_time_to_first_token_seconds_count") == ttft + 1
    assert api.metric("qwen3vl_openai_requests_total", status="400") == refused + 1
    assert api.metric("qwen3vl_openai_requests_in_flight") == 0


# ---- image URLs ----------------------------------------------------------------------------


class ImageHost:
    """A local HTTP server counting the requests for each path."""

    def __init__(self, big: int):
        hits = self.hits = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits[self.path] = hits.get(self.path, 0) + 1
                if self.path == "/redirect.png":
                    self.send_response(302)
                    self.send_header("Location", "/a.png")
                    self.end_headers()
                    return
                if self.path == "/slow.png":
                    time.sleep(3)
                body = bytes(big) if self.path == "/big.png" else CLIP if self.path == "/clip.mp4" else IMAGE_A
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if self.path != "/big.png":  # no length: the limit must hold while reading
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the reader stopped at its limit
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost(big=300_000)
    yield host
    host.close()


def image_request(url: str) -> dict:
    return chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, TEXT]}],
                max_tokens=MAX_NEW, temperature=0)


def test_image_urls_are_refused_unless_allowed_without_any_connection(api, server, image_host):
    error = assert_openai_error(api.post(image_request(image_host.url("127.0.0.1", "/a.png"))), 400,
                                "messages[0].content[0].image_url.url", "data URL", "--allow-image-url-domains")
    assert error["code"] == "image_url_not_allowed"
    policy = ImagePolicy(allowed_domains=("127.0.0.1", "*.example.invalid"), max_bytes=100_000, fetch_timeout_s=1.0)
    with InProcess(ServiceConfig(server.grpc_url, MODEL, images=policy)) as allowed:
        # another host (the same server under another name) is refused before any connection
        assert_openai_error(allowed.post(image_request(image_host.url("localhost", "/a.png"))), 400,
                            "messages[0].content[0].image_url.url", "localhost", "127.0.0.1")
        assert image_host.hits == {}
        # an allowed one is fetched, and answers as the same image in a data URL does
        fetched = allowed.post(image_request(image_host.url("127.0.0.1", "/a.png")))
        assert fetched.status_code == 200, fetched.text
        inline = api.post(image_request(data_url(IMAGE_A)))
        assert fetched.json()["choices"] == inline.json()["choices"]
        assert fetched.json()["usage"] == inline.json()["usage"]
        for path, words in [("/big.png", ("larger than", "100000")), ("/slow.png", ("not fetched within 1 s",)),
                            ("/redirect.png", ("redirect (not followed)",))]:
            start = time.monotonic()
            assert_openai_error(allowed.post(image_request(image_host.url("127.0.0.1", path))), 400,
                                "messages[0].content[0].image_url.url", *words)
            assert time.monotonic() - start < 2.5
        assert image_host.hits == {"/a.png": 1, "/big.png": 1, "/slow.png": 1, "/redirect.png": 1}
        big = data_url(bytes(150_000))
        assert_openai_error(allowed.post(image_request(big)), 400, "messages[0].content[0].image_url.url",
                            "larger than")
    assert api.http.get("/health").status_code == 200


# ---- video parts ---------------------------------------------------------------------------


def video_part(url: str, **extra) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **extra}}


@pytest.mark.parametrize("fps", [None, 1.0], ids=["default-rate", "fps-1"])
def test_a_video_url_gives_the_ensembles_tokens(client, server, fps):
    """A `video_url` part (vLLM's) in a data URL, with the sampling rate as its `fps`: the answer
    and usage of the ensemble's `videos` input with `video_fps` for the same conversation."""
    question = "What happens?"
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [video_part(data_url(CLIP, "video/mp4"), **({"fps": fps} if fps else {})),
                                             {"type": "text", "text": question}]}]
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_NEW, temperature=0)
    chat = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    want = infer(server.grpc_url, "grpc", prompt=json.dumps(chat), videos=[CLIP], video_fps=fps, max_tokens=MAX_NEW,
                 temperature=0.0)
    assert completion.choices[0].message.content == want.text
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (want.num_input_tokens,
                                                                                    len(want.token_ids))
    at_2_fps = infer(server.grpc_url, "grpc", prompt=json.dumps(chat), videos=[CLIP], max_tokens=1).num_input_tokens
    assert (want.num_input_tokens == at_2_fps) == (fps is None)  # the rate reached the sampling


def test_video_parts_errors_name_the_part(api, server, image_host):
    url = data_url(CLIP, "video/mp4")
    body = lambda *parts, **kw: chat(messages=[{"role": "user", "content": [*parts, TEXT]}], max_tokens=2, **kw)  # noqa: E731
    assert_openai_error(api.post(body(video_part(url, fps=1.0), video_part(url, fps=2.0))), 400,
                        "messages[0].content[1].video_url.fps", "one rate")
    assert_openai_error(api.post(body(video_part(url, fps=1.0), mm_processor_kwargs={"fps": 2})), 400,
                        "messages[0].content[0].video_url.fps", "mm_processor_kwargs.fps")
    assert_openai_error(api.post(body(video_part(url), mm_processor_kwargs={"max_frames": 4})), 400,
                        "mm_processor_kwargs.max_frames")
    assert_openai_error(api.post(body(video_part(url, fps=0))), 400, "messages[0].content[0].video_url.fps")
    assert_openai_error(api.post(body(video_part(data_url(b"not a video at all", "video/mp4")))), 400,
                        "messages[0].content[0].video_url.url", "not a decodable video")
    assert_openai_error(api.post(body(video_part(data_url(IMAGE_A, "image/png")))), 400,
                        "messages[0].content[0].video_url.url", "not a video")
    assistant = chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": [video_part(url)]}])
    assert_openai_error(api.post(assistant), 400, "messages[1].content[0]", "user messages")
    # http(s): the image URL hosts and rules
    error = assert_openai_error(api.post(body(video_part(image_host.url("127.0.0.1", "/clip.mp4")))), 400,
                                "messages[0].content[0].video_url.url", "--allow-image-url-domains")
    assert error["code"] == "video_url_not_allowed" and "/clip.mp4" not in image_host.hits
    policy = ImagePolicy(allowed_domains=("127.0.0.1",), max_bytes=100, max_video_bytes=len(CLIP))
    with InProcess(ServiceConfig(server.grpc_url, MODEL, images=policy)) as allowed:
        fetched = allowed.post(body(video_part(image_host.url("127.0.0.1", "/clip.mp4")), temperature=0))
        inline = api.post(body(video_part(url), temperature=0))
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["choices"] == inline.json()["choices"] and fetched.json()["usage"] == inline.json()["usage"]
        error = assert_openai_error(allowed.post(body(video_part(image_host.url("127.0.0.1", "/big.png")))), 400,
                                    "messages[0].content[0].video_url.url", "larger than")
        assert error["code"] == "video_too_large"
    assert api.http.get("/health").status_code == 200


# ---- text completions ----------------------------------------------------------------------


def raw_reference(reference, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens for the prompt tokenized as it is (no chat template)."""
    model, processor = reference
    ids = processor.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_completions_with_the_openai_sdk(client, reference, stream):
    """`/v1/completions` on a text prompt: transformers' greedy answer to the prompt as it is
    (no chat template), in OpenAI's `text_completion` shape, streamed (with usage) or not."""
    prompt, tokenizer = "The picture shows", reference[1].tokenizer
    want = raw_reference(reference, prompt, MAX_NEW)
    kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}
    if stream:
        events = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        assert {e.object for e in events} == {"text_completion"} and not events[-1].choices
        text = "".join(e.choices[0].text for e in events if e.choices)
        finish_reason, usage = events[-2].choices[0].finish_reason, events[-1].usage
        assert all(e.choices[0].finish_reason is None for e in events[:-2])
    else:
        completion = client.completions.create(**kwargs)
        assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
        text, finish_reason, usage = completion.choices[0].text, completion.choices[0].finish_reason, completion.usage
    assert text == tokenizer.decode(want, skip_special_tokens=True)
    assert finish_reason == ("stop" if len(want) < MAX_NEW else "length")
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(tokenizer(prompt).input_ids), len(want))


def test_text_completions_defaults_stop_and_refusals(api, client, reference):
    prompt = "Once upon a time"
    # max_tokens defaults to 16 (OpenAI's and vLLM's); a list of one prompt is that prompt
    default = client.completions.create(model=MODEL, prompt=[prompt], temperature=0)
    want = raw_reference(reference, prompt, 16)
    assert default.usage.completion_tokens == len(want) and default.choices[0].finish_reason == (
        "stop" if len(want) < 16 else "length")
    text = default.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = client.completions.create(model=MODEL, prompt=prompt, temperature=0, stop=stop)
    assert stopped.choices[0].text == text[:text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    refused = [({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"echo": True}, "echo"), ({"logprobs": 2}, "logprobs"),
               ({"suffix": "end"}, "suffix"), ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
               ({"prompt": "\ud800"}, "prompt"), ({"stop": [""]}, "stop"), ({"presence_penalty": 1.0}, "presence_penalty")]
    for fields, param in refused:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, **fields}
        sent = api.http.post("/v1/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert_openai_error(sent, 400, param, param)  # json.dumps: "\ud800" escaped as JSON can carry it
    assert_openai_error(api.http.post("/v1/completions", json={"model": "other", "prompt": "x"}), 404, "model", "other")
    assert_openai_error(api.http.post("/v1/completions", json={"model": MODEL}), 400, "prompt", "required")
    assert api.http.get("/health").status_code == 200


# ---- Triton's side failing ------------------------------------------------------------------


def test_deadline_is_504_and_cancels_the_generation(server, long_answer):
    _, ids = long_answer
    requests, generated = (metric(server, f"qwen3vl_language_{m}_total") for m in ("requests", "generated_tokens"))
    with InProcess(ServiceConfig(server.grpc_url, MODEL, request_timeout_s=1.0)) as short:
        body = {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": LONG_MAX,
                    "temperature": 0}
        error = assert_openai_error(short.post(body), 504, None, "time limit")
        assert error["code"] == "timeout"
        wait_for_language_requests(server, requests + 1)
        assert metric(server, "qwen3vl_language_generated_tokens_total") - generated < len(ids) // 2
        assert short.post(chat()).status_code == 200


def test_an_unreachable_triton_is_503():
    (dead,) = free_ports(1)
    with InProcess(ServiceConfig(f"127.0.0.1:{dead}", MODEL)) as orphan:
        assert_openai_error(orphan.http.get("/health"), 503, None, f"127.0.0.1:{dead}")
        error = assert_openai_error(orphan.post(chat()), 503, None, "unavailable")
        assert error["code"] == "service_unavailable"
        assert orphan.http.get("/v1/models").status_code == 200


# ---- qwen3vl-serve --openai-port, compose, packaging ---------------------------------------


def fake_tritonserver(tmp: Path) -> Path:
    """A `tritonserver` that only waits for SIGTERM (the launcher's handling of the API)."""
    bindir = tmp / "bin"
    bindir.mkdir()
    script = bindir / "tritonserver"
    script.write_text("#!/bin/sh\ntrap 'exit 0' TERM INT\nwhile true; do sleep 0.1; done\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bindir


def launch(checkpoint, tmp_path, openai_port: int, log_name: str, extra: list[str] = ()) -> subprocess.Popen:
    http, grpc, metrics_port = free_ports(3)
    env = {**os.environ, "QWEN3VL_SYSTEM_TRITON": "1",
           "PATH": os.pathsep.join([str(fake_tritonserver(tmp_path)), os.environ.get("PATH", "")])}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / log_name, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "qwen3vl.cli.serve", "--checkpoint", str(checkpoint),
                                 "--http-port", str(http), "--grpc-port", str(grpc),
                                 "--metrics-port", str(metrics_port), "--openai-port", str(openai_port), *extra],
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def test_serve_starts_the_api_beside_tritonserver_and_stops_both(checkpoint, tmp_path):
    (port,) = free_ports(1)
    proc = launch(checkpoint, tmp_path, port, "serve-openai.log")
    try:
        deadline, health = time.monotonic() + 60, None
        while health is None:
            assert proc.poll() is None and time.monotonic() < deadline, (LOG_DIR / "serve-openai.log").read_text()
            try:
                health = httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2)
            except httpx2.HTTPError:
                time.sleep(0.2)
        assert health.status_code == 503  # this tritonserver serves nothing
        models = httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == [DEFAULT_MODEL_NAME]  # the one name, whatever the checkpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, (LOG_DIR / "serve-openai.log").read_text()
    with pytest.raises(httpx2.ConnectError):  # the API went with it
        httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_serve_stops_tritonserver_when_the_api_cannot_start(checkpoint, tmp_path):
    (port,) = free_ports(1)
    # (a taken port is refused before anything starts: test_serve.py)
    proc = launch(checkpoint, tmp_path, port, "serve-openai-bad.log", ["--openai-arg=--log-level=loud"])
    rc = proc.wait(60)
    assert rc != 0
    assert "the OpenAI API exited" in (LOG_DIR / "serve-openai-bad.log").read_text()


def test_serve_builds_the_api_command():
    args = serve.parse_args(["--checkpoint", "/models/Qwen3-VL-30B-A3B-Instruct", "--grpc-port", "9001",
                             "--openai-port", "9000", "--openai-host", "0.0.0.0",
                             "--openai-arg=--allow-image-url-domains=example.com"])
    cmd = tritonserver.openai_command(args)
    assert cmd[:3] == [sys.executable, "-m", "qwen3vl.cli.openai_server"]
    config = openai_server.config_from_args(openai_server.parse_args(cmd[3:]))
    assert config.triton_url == "127.0.0.1:9001" and config.model_name == DEFAULT_MODEL_NAME
    assert config.images.allowed_domains == ("example.com",)
    assert "--host" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    with pytest.raises(SystemExit) as e:
        serve.main(["--role", "encoder", "--checkpoint", str(ROOT), "--openai-port", "9000"])
    assert "--openai-port needs the ensemble" in str(e.value.code)


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["qwen3vl-openai"].partition(":")
    assert module == openai_server.__name__ and callable(getattr(openai_server, func))


# ---- the pieces, without a server ----------------------------------------------------------


@pytest.mark.parametrize("text, stops", [
    ("hello world, hello moon", ["lo m"]),
    ("abcabcabd", ["abd", "cabx"]),
    ("no stop here", ["zz", "here!"]),
    ("aaaa", ["aaab", "aa"]),
    ("stop at once", ["stop"]),
    ("ends with a partial st", ["stx"]),
])
def test_stop_strings_over_every_split_of_the_text(text, stops):
    """However the text arrives in pieces, what goes out ends just before the first stop string."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    want = text[:min(hits)] if hits else text
    splits = [[text[:a], text[a:b], text[b:]] for a in range(len(text) + 1) for b in range(a, len(text) + 1)]
    splits.append(list(text))
    for pieces in splits:
        matcher, out, stopped = StopStrings(stops), "", False
        for piece in pieces:
            released, stopped = matcher.feed(piece)
            out += released
            if stopped:
                break
        if not stopped:
            out += matcher.flush()
        assert (out, stopped) == (want, bool(hits)), pieces


def test_data_urls_and_domains():
    image = png(8, 8, 3)
    assert decode_data_url(data_url(image), "p", 10**6) == image
    assert decode_data_url("data:;base64," + base64.b64encode(image).decode(), "p", 10**6) == image
    for url, word in [("data:image/png;base64", "','"), ("data:image/png;base64,%%%", "bad base64"),
                      ("data:text/html;base64,AAAA", "not an image"), (data_url(bytes(3000)), "larger than")]:
        with pytest.raises(APIError, match=word) as e:
            decode_data_url(url, "p", 1000)
        assert e.value.status == 400 and e.value.param == "p"
    allowed = ("images.example.com", "*.cdn.example.org")
    assert domain_allowed("IMAGES.example.com.", allowed)
    assert domain_allowed("a.b.cdn.example.org", allowed)
    assert not domain_allowed("cdn.example.org", allowed)
    assert not domain_allowed("evil-images.example.com", allowed)
    assert not domain_allowed("images.example.com.evil.net", allowed)
