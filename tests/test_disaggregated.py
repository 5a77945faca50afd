"""Disaggregated deployment: encoder servers + language servers, chunked resumable transfer,
encoder cache, routing. Every test starts real servers on loopback."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from conftest import IMAGE_CASES, LOG_DIR, leftovers, metric, png, video
from qwen3vl.client import ServerError, encode, infer, stream_results
from qwen3vl.launch.server import Server
from qwen3vl.disagg.routing import HashRing
from tcp_proxy import CuttingProxy

CHUNK = 8                 # visual tokens per chunk: many chunks even for small images
FAULT_IMAGE_SIZE = 320    # -> 100 visual tokens, 13 chunks of ~8 KiB (fp32, tiny preset)
LARGE = png(1440, 1440, 7)  # -> 2025 visual tokens


def start_encoder(checkpoint, name):
    return Server(checkpoint, LOG_DIR / f"{name}.log", role="encoder", models=("qwen3_encoder",),
                  extra=["--device", "cpu"])


def start_language(checkpoint, name, urls, **settings):
    env = {f"QWEN3VL_{k.upper()}": str(v) for k, v in settings.items()}
    extra = ["--device", "cpu", "--chunk-tokens", str(CHUNK)] + [a for u in urls for a in ("--encoder-url", u)]
    return Server(checkpoint, LOG_DIR / f"{name}.log", role="language", extra=extra, env=env)


def generate(server, images, max_tokens=8):
    return infer(server.http_url, "http", prompt="Describe.", images=images, max_tokens=max_tokens,
                 temperature=0.0).token_ids


def image_owned_by(url: str, urls: list[str], seed: int = 0) -> bytes:
    """An image whose content hash routes to `url` first."""
    ring = HashRing(urls)
    while True:
        image = png(FAULT_IMAGE_SIZE, FAULT_IMAGE_SIZE, seed)
        if ring.order(hashlib.sha256(image).hexdigest())[0] == url:
            return image
        seed += 1


@pytest.fixture(scope="module")
def encoder_a(checkpoint):
    with start_encoder(checkpoint, "encoder-a") as s:
        yield s


@pytest.fixture(scope="module")
def language(checkpoint, encoder_a):
    with start_language(checkpoint, "language", [encoder_a.grpc_url]) as s:
        yield s


@pytest.mark.parametrize("case", ["text-only", "one-image", "two-images", "large-image"])
def test_disaggregated_outputs_are_bit_identical(server, encoder_a, language, case):
    images = [LARGE] if case == "large-image" else IMAGE_CASES[case]
    assert generate(language, images) == generate(server, images)
    if images:
        sent = encode(encoder_a.grpc_url, images)      # what the encoder server computes
        arrived = encode(language.grpc_url, images)    # what reaches the language server
        for name in sent:
            assert sent[name].dtype == arrived[name].dtype and sent[name].shape == arrived[name].shape
            assert sent[name].tobytes() == arrived[name].tobytes(), name
        if case == "large-image":
            assert sent["visual_embeds"].shape[0] >= 2000


def test_concurrent_mixed_requests_through_the_language_server_equal_the_aggregated_ones(server, language):
    """Continuous batching behind the transfer: 16 concurrent requests (text-only, one and two
    images, streamed and not, greedy and seeded) each give what the aggregated server gives alone."""
    from test_batching import concurrently, mixed_requests, run

    requests = mixed_requests()
    alone = [run(server.grpc_url, r) for r in requests]
    assert concurrently(lambda r: run(language.grpc_url, r), requests, 16) == alone


def test_repeated_image_runs_no_vision_forward(encoder_a, language):
    """The second request with an image runs no vision forward, even when it comes another way
    (raw bytes over gRPC first, a base64 data URL over HTTP second)."""
    from qwen3vl.client import stream_grpc

    image = png(150, 120, 42)
    list(stream_grpc(language.grpc_url, prompt="Describe.", images=[image], max_tokens=2, temperature=0.0))
    forwards, hits = metric(encoder_a, "qwen3vl_encoder_forwards_total"), metric(encoder_a, "qwen3vl_encoder_cache_hits_total")
    generate(language, [image])
    assert metric(encoder_a, "qwen3vl_encoder_forwards_total") == forwards
    assert metric(encoder_a, "qwen3vl_encoder_cache_hits_total") == hits + 1


VIDEO_CASES = {  # prompt, images, videos, video_fps
    "video": ("What happens?", [], [video(30, 10, seed=21)], None),
    "video-before-image": ("Watch <video> then <image>", [png(90, 70, 22)], [video(20, 5, width=96, height=64, seed=23)],
                           None),
    "two-videos-fps": ("Compare.", [], [video(30, 10, seed=21), video(7, 1, seed=24)], 1.5),
}


@pytest.mark.parametrize("case", sorted(VIDEO_CASES))
def test_disaggregated_video_is_bit_identical(server, encoder_a, language, case):
    """Videos travel like images (named by file digest and sampling rate, chunked): the same
    tokens as the aggregated server, the E->L tensors bit for bit, a repeat runs no forward."""
    prompt, images, videos, fps = VIDEO_CASES[case]

    def ask_ids(s):
        return infer(s.http_url, "http", prompt=prompt, images=images, videos=videos, video_fps=fps, max_tokens=8,
                     temperature=0.0).token_ids

    assert ask_ids(language) == ask_ids(server)
    sent = encode(encoder_a.grpc_url, images, videos=videos, video_fps=fps)
    arrived = encode(language.grpc_url, images, videos=videos, video_fps=fps)
    assert sent["video_grid_thw"].shape == (len(videos), 3) and sent["video_timestamps"].dtype.name == "float64"
    for name in sent:
        assert sent[name].dtype == arrived[name].dtype and sent[name].shape == arrived[name].shape
        assert sent[name].tobytes() == arrived[name].tobytes(), name
    forwards = metric(encoder_a, "qwen3vl_encoder_forwards_total")
    ask_ids(language)
    assert metric(encoder_a, "qwen3vl_encoder_forwards_total") == forwards


def chunks_of(n_tokens: int) -> int:
    return -(-n_tokens // CHUNK)


def test_cut_connection_resumes_with_only_the_missing_chunks(checkpoint, server, encoder_a):
    proxy = CuttingProxy(encoder_a.grpc_port)
    with start_language(checkpoint, "language-proxy", [proxy.url], encoder_same_wait_s=10) as lang:
        image = png(FAULT_IMAGE_SIZE, FAULT_IMAGE_SIZE, 1000)
        want = generate(server, [image])
        misses = metric(encoder_a, "qwen3vl_encoder_cache_misses_total")
        proxy.arm(cut_after_bytes=40_000)  # a few chunks in
        assert generate(lang, [image]) == want
        assert proxy.cuts == 1
        assert metric(lang, "qwen3vl_transfer_resumes_total") == 1
        assert metric(lang, "qwen3vl_transfer_chunks_received_total") == chunks_of(100)  # none twice
        assert metric(encoder_a, "qwen3vl_encoder_cache_misses_total") == misses + 1     # tower ran once
    proxy.close()


def test_cut_connection_resumes_a_video_with_only_the_missing_chunks(checkpoint, server, encoder_a):
    proxy = CuttingProxy(encoder_a.grpc_port)
    clip = video(30, 10, width=320, height=240, seed=1001)  # 3 frame groups of 8 x 10 tokens
    with start_language(checkpoint, "language-proxy-video", [proxy.url], encoder_same_wait_s=10) as lang:
        want = infer(server.http_url, "http", prompt="What?", videos=[clip], max_tokens=8, temperature=0.0).token_ids
        misses = metric(encoder_a, "qwen3vl_encoder_cache_misses_total")
        proxy.arm(cut_after_bytes=40_000)
        got = infer(lang.http_url, "http", prompt="What?", videos=[clip], max_tokens=8, temperature=0.0).token_ids
        assert got == want
        assert proxy.cuts == 1
        assert metric(lang, "qwen3vl_transfer_resumes_total") == 1
        assert metric(lang, "qwen3vl_transfer_chunks_received_total") == chunks_of(240)  # none twice
        assert metric(encoder_a, "qwen3vl_encoder_cache_misses_total") == misses + 1     # tower ran once
    proxy.close()


def test_dead_encoder_fails_over_to_another(checkpoint, server):
    with start_encoder(checkpoint, "encoder-dying") as dying, start_encoder(checkpoint, "encoder-b") as encoder_b:
        proxy = CuttingProxy(dying.grpc_port)
        urls = [proxy.url, encoder_b.grpc_url]
        with start_language(checkpoint, "language-failover", urls, encoder_same_wait_s=1) as lang:
            image = image_owned_by(proxy.url, urls)
            want = generate(server, [image])
            proxy.arm(cut_after_bytes=40_000, on_cut=dying.kill)
            assert generate(lang, [image]) == want
            assert proxy.cuts == 1
            assert not dying.alive()
            received_before = chunks_of(100) - metric(encoder_b, "qwen3vl_transfer_chunks_sent_total")
            assert 0 < received_before < chunks_of(100)  # B sent only what A had not delivered
            assert metric(encoder_b, "qwen3vl_encoder_cache_misses_total") == 1  # B re-encoded
            assert metric(lang, "qwen3vl_transfer_chunks_received_total") == chunks_of(100)
            assert metric(lang, "qwen3vl_transfer_failovers_total") == 1
        proxy.close()


def test_an_encoder_killed_under_load_loses_no_request(checkpoint, server):
    """Eight concurrent image requests, half routed to an encoder that is killed mid-transfer:
    every request is answered, each equal to the aggregated server's answer (failover and
    resume under load, not one request at a time)."""
    with start_encoder(checkpoint, "encoder-dying-load") as dying, \
            start_encoder(checkpoint, "encoder-b-load") as encoder_b:
        proxy = CuttingProxy(dying.grpc_port)
        urls = [proxy.url, encoder_b.grpc_url]
        with start_language(checkpoint, "language-load", urls, encoder_same_wait_s=1) as lang:
            images = [image_owned_by(proxy.url, urls, seed=3000 + 50 * i) for i in range(4)]
            images += [image_owned_by(encoder_b.grpc_url, urls, seed=4000 + 50 * i) for i in range(4)]
            want = [generate(server, [image]) for image in images]
            proxy.arm(cut_after_bytes=60_000, on_cut=dying.kill)
            got: dict[int, object] = {}

            def send(i):
                try:
                    got[i] = generate(lang, [images[i]])
                except Exception as e:  # noqa: BLE001 - recorded and asserted below
                    got[i] = e

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert proxy.cuts == 1 and not dying.alive()
            assert [got.get(i) for i in range(len(images))] == want
            assert metric(lang, "qwen3vl_transfer_failovers_total") >= 1
        proxy.close()


def test_restarted_encoder_serves_only_the_missing_chunks(checkpoint, server):
    with start_encoder(checkpoint, "encoder-restarting") as enc:
        proxy = CuttingProxy(enc.grpc_port)
        with start_language(checkpoint, "language-restart", [proxy.url], encoder_same_wait_s=120,
                            encoder_timeout_s=180) as lang:
            image = png(FAULT_IMAGE_SIZE, FAULT_IMAGE_SIZE, 2000)
            want = generate(server, [image])
            restarted = threading.Event()

            def crash_and_restart():
                enc.kill()
                threading.Thread(target=lambda: (enc.start(append=True), restarted.set()), daemon=True).start()

            proxy.arm(cut_after_bytes=40_000, on_cut=crash_and_restart)
            assert generate(lang, [image]) == want
            assert restarted.wait(60)  # start() returns a moment after the server became ready
            # The new encoder process: one forward for this image, only the missing chunks.
            assert metric(enc, "qwen3vl_encoder_forwards_total") == 1
            sent_after = metric(enc, "qwen3vl_transfer_chunks_sent_total")
            assert 0 < sent_after < chunks_of(100)
            assert metric(lang, "qwen3vl_transfer_resumes_total") == 1
            assert metric(lang, "qwen3vl_transfer_chunks_received_total") == chunks_of(100)
        proxy.close()


def test_routing_is_sticky_and_survives_a_dead_encoder(checkpoint, encoder_a):
    with start_encoder(checkpoint, "encoder-c") as encoder_c:
        urls = [encoder_a.grpc_url, encoder_c.grpc_url]
        with start_language(checkpoint, "language-routing", urls, encoder_same_wait_s=0.5) as lang:
            def images_on(s):
                # served images: from the cache or through the tower (a digest probe that
                # missed and was followed by the file counts once)
                return metric(s, "qwen3vl_encoder_cache_hits_total") + metric(s, "qwen3vl_encoder_cache_misses_total")

            image = png(100, 100, 3000)
            before = [images_on(s) for s in (encoder_a, encoder_c)]
            for _ in range(3):
                generate(lang, [image], max_tokens=2)
            after = [images_on(s) for s in (encoder_a, encoder_c)]
            assert sorted(a - b for a, b in zip(after, before)) == [0, 3]  # all three on one encoder
            owners = {HashRing(urls).order(hashlib.sha256(png(90, 90, s)).hexdigest())[0] for s in range(8)}
            assert owners == set(urls)  # and images spread over both
            encoder_c.stop()
            for s in range(8):
                assert len(generate(lang, [png(90, 90, s)], max_tokens=2)) == 2


def test_no_reachable_encoder_is_a_clear_error_and_text_still_works(checkpoint):
    from qwen3vl.launch.server import free_ports

    dead = f"127.0.0.1:{free_ports(1)[0]}"
    with start_language(checkpoint, "language-orphan", [dead], encoder_timeout_s=3, encoder_same_wait_s=0.5) as lang:
        start = time.monotonic()
        with pytest.raises(ServerError, match=rf"no encoder could serve it within 3 s.*{dead}"):
            generate(lang, [png(64, 64, 1)])
        assert time.monotonic() - start < 20
        assert len(generate(lang, [])) == 8


def test_shared_memory_transfer_is_bit_identical(checkpoint, server, encoder_a):
    """Same host, opt-in: the encoder writes the bulk of each image into the language server's
    shared memory; a repeat comes in one response per image, handed on without a copy."""
    extra = ["--shared-memory"]
    lang = Server(checkpoint, LOG_DIR / "language-shm.log", role="language",
                  extra=["--device", "cpu", "--chunk-tokens", str(CHUNK), "--encoder-url", encoder_a.grpc_url, *extra])
    with lang:
        images = IMAGE_CASES["two-images"]
        sent, arrived = encode(encoder_a.grpc_url, images), encode(lang.grpc_url, images)
        for name in sent:
            assert sent[name].tobytes() == arrived[name].tobytes(), name
        # All but each image's one-token first chunk (which tells the total) came through shared memory.
        first_chunks = 2 * (sent["visual_embeds"].nbytes + sent["deepstack_embeds"].nbytes) // len(sent["visual_embeds"])
        total = sent["visual_embeds"].nbytes + sent["deepstack_embeds"].nbytes
        assert metric(lang, "qwen3vl_transfer_shm_bytes_received_total") == total - first_chunks
        assert metric(lang, "qwen3vl_transfer_bytes_received_total") == first_chunks
        # Regions are kept for the next fetch: it needs no one-token probe again.
        shm_bytes, grpc_bytes = (metric(lang, f"qwen3vl_transfer_{k}_received_total") for k in ("shm_bytes", "bytes"))
        again = encode(lang.grpc_url, images)
        for name in sent:
            assert sent[name].tobytes() == again[name].tobytes(), name
        moved_by_shm = metric(lang, "qwen3vl_transfer_shm_bytes_received_total") - shm_bytes
        moved_by_grpc = metric(lang, "qwen3vl_transfer_bytes_received_total") - grpc_bytes
        assert moved_by_shm + moved_by_grpc == total
        assert moved_by_shm >= total - first_chunks  # at most the probes of threads without a region
        assert generate(lang, images) == generate(server, images)
        # A video the same way: its grid and float64 timestamps ride on the (empty) responses.
        clip = [video(30, 10, seed=31)]
        sent = encode(encoder_a.grpc_url, [], videos=clip)
        for arrived in (encode(lang.grpc_url, [], videos=clip), encode(lang.grpc_url, [], videos=clip)):
            for name in sent:
                assert sent[name].dtype == arrived[name].dtype and sent[name].tobytes() == arrived[name].tobytes(), name
        assert metric(lang, "qwen3vl_transfer_shm_bytes_received_total") > shm_bytes + total


def test_shared_memory_survives_an_encoder_restart(checkpoint, server):
    """Across an encoder restart the language server goes on through shared memory, bit for
    bit, and the encoder still stops promptly. Regions are capped here at 20 visual tokens
    (20 KiB), so each 100-token image takes several responses."""
    with start_encoder(checkpoint, "encoder-shm-restart") as enc:
        with start_language(checkpoint, "language-shm-restart", [enc.grpc_url], transfer_shared_memory=1,
                            transfer_shm_region_mib=20 / 1024, encoder_same_wait_s=60, encoder_timeout_s=120) as lang:
            first, second = png(FAULT_IMAGE_SIZE, FAULT_IMAGE_SIZE, 3000), png(FAULT_IMAGE_SIZE, FAULT_IMAGE_SIZE, 3001)
            assert generate(lang, [first]) == generate(server, [first])
            # a one-token probe over gRPC, then 99 tokens through shared memory, 20 at a time
            assert metric(lang, "qwen3vl_transfer_chunks_received_total") == 1 + 5
            enc.restart()
            shm_bytes = metric(lang, "qwen3vl_transfer_shm_bytes_received_total")
            assert generate(lang, [second]) == generate(server, [second])
            assert generate(lang, [first]) == generate(server, [first])  # re-encoded after the restart
            assert metric(lang, "qwen3vl_transfer_shm_bytes_received_total") > shm_bytes
            assert "using gRPC" not in lang.tail(200)
        start = time.monotonic()
        enc.stop()
        assert time.monotonic() - start < 20


def test_a_language_server_killed_under_load_leaves_no_process_and_no_shared_memory(checkpoint, encoder_a):
    """SIGKILL a same-host language server while image requests stream through shared memory:
    within 10 s none of its model processes is left, nor their shared-memory regions (transfer
    regions, their regions with the server); the encoder serves on."""
    lang = start_language(checkpoint, "language-shm-killed", [encoder_a.grpc_url], transfer_shared_memory=1)
    with lang:
        generate(lang, [png(FAULT_IMAGE_SIZE, FAULT_IMAGE_SIZE, 5000)], max_tokens=2)
        processes = lang.model_processes()
        transfer = [name for p in processes for name in p.regions() if name != p.region]
        assert len(processes) == 2 and transfer  # regions are kept for the next fetch
        stop = threading.Event()

        def load(seed):
            while not stop.is_set():
                try:
                    generate(lang, [png(FAULT_IMAGE_SIZE, FAULT_IMAGE_SIZE, seed)], max_tokens=16)
                except Exception:  # noqa: BLE001 - the server is killed under it
                    time.sleep(0.2)
                seed += 100

        threads = [threading.Thread(target=load, args=(5001 + i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(3)
        killed_at = time.monotonic()
        lang.kill()
        assert leftovers(processes, timeout_s=killed_at + 10 - time.monotonic()) == []
        stop.set()
        for t in threads:
            t.join(60)
    assert encode(encoder_a.grpc_url, [png(64, 64, 5)])["visual_embeds"].shape[0] > 0


def test_encoder_refuses_shared_memory_it_must_not_write(encoder_a):
    """A region name outside the transfer prefix, one that does not exist on the encoder's
    host, or one without a size: a clear error, and the encoder serves the next request."""
    import numpy as np

    from qwen3vl import errors

    image = png(64, 64, 5)

    def request(region: str, chunk_tokens: int | None):
        def inputs_for(grpcclient):
            values = [("images", np.array([image], dtype=object), "BYTES"),
                      ("shm_region", np.array([region.encode()], dtype=object), "BYTES")]
            if chunk_tokens:
                values.append(("chunk_tokens", np.array([chunk_tokens], dtype=np.int32), "INT32"))
            inputs = []
            for name, value, dtype in values:
                inputs.append(grpcclient.InferInput(name, list(value.shape), dtype))
                inputs[-1].set_data_from_numpy(value)
            return inputs
        return list(stream_results(encoder_a.grpc_url, "qwen3_encoder", inputs_for, timeout_s=60))

    for region, chunk_tokens, why in [("../../etc/hostname", 64, "is not a transfer region"),
                                      ("qwen3vl-transfer-nobody", 64, "does not exist on the encoder's host"),
                                      ("qwen3vl-transfer-nobody", None, "shm_region needs chunk_tokens")]:
        with pytest.raises(ServerError, match=why) as e:
            request(region, chunk_tokens)
        # UNSUPPORTED is the language server's cue to use gRPC; a bad request is INVALID_ARG
        assert e.value.code == (errors.UNSUPPORTED if chunk_tokens else errors.INVALID_ARG)
    assert encode(encoder_a.grpc_url, [image])["visual_embeds"].shape[0] > 0


@pytest.mark.parametrize("case", ["encoder-cannot-see-it", "no-room-for-it"])
def test_shared_memory_falls_back_to_grpc(checkpoint, encoder_a, monkeypatch, tmp_path, case):
    """An encoder that cannot see the language side's regions (another host, another IPC
    namespace; here: regions made outside /dev/shm) answers so, and that encoder is served
    over gRPC from then on; a region that cannot be made (here: no such directory; a full
    /dev/shm) sends that image over gRPC. Either way bit for bit."""
    from qwen3vl.disagg import shm
    from qwen3vl.disagg.remote import RemoteEncoder
    from qwen3vl.model.config import ModelConfig
    from qwen3vl.settings import ServingConfig

    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path if case == "encoder-cannot-see-it" else tmp_path / "absent"))
    image = png(FAULT_IMAGE_SIZE, FAULT_IMAGE_SIZE, 77)
    remote = RemoteEncoder(ModelConfig.load(checkpoint, device="cpu"),
                           ServingConfig(encoder_urls=encoder_a.grpc_url, transfer_chunk_tokens=CHUNK,
                                         transfer_shared_memory=True))
    try:
        got, stats = remote.fetcher.fetch(image)
        assert remote.fetcher.shm_ok == ({encoder_a.grpc_url: False} if case == "encoder-cannot-see-it" else {})
        assert stats.shm_bytes == 0 and stats.bytes == got.visual_embeds.nbytes + got.deepstack_embeds.nbytes
    finally:
        remote.close()
    sent = encode(encoder_a.grpc_url, [image])
    assert sent["visual_embeds"].tobytes() == got.visual_embeds.numpy().tobytes()
    assert sent["deepstack_embeds"].tobytes() == got.deepstack_embeds.numpy().tobytes()
