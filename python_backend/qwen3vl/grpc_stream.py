"""One request to a decoupled Triton model over gRPC's bidirectional stream (the only way
tritonclient reaches a decoupled model over gRPC), shared by the client CLI and the E->L transfer."""

from __future__ import annotations

import queue
from typing import Callable, Iterator


class StreamError(RuntimeError):
    """The server answered the request with an error; `error` is tritonclient's exception
    (`str(error)` holds the server's message, with the project's marker where it raised it)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def stream_infer(client, model: str, inputs: list, timeout_s: float, next_timeout_s: float | None = None,
                 on_unfinished: Callable[[], None] | None = None, parameters: dict | None = None) -> Iterator:
    """tritonclient InferResults of one request on `client` (a tritonclient.grpc
    InferenceServerClient), each response that has outputs, until the one flagged final.

    The first response may take `timeout_s`, each later one `next_timeout_s` (default the same).
    Raises TimeoutError when one does not come, StreamError when the server answers with an error.
    A request left unfinished (an error, a timeout, the caller stopped reading) is cancelled,
    and `on_unfinished()` runs (e.g. to drop a client whose stream may be broken)."""
    results: queue.Queue = queue.Queue()
    finished = False
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            client.async_stream_infer(model, inputs, enable_empty_final_response=True, parameters=parameters)
        except Exception:
            # A stream that broke at once (nothing listens at the address): tritonclient's own
            # exception only says the error went to the callback; raise that one.
            try:
                _, error = results.get(timeout=1.0)
            except queue.Empty:
                raise
            if error is None:
                raise
            raise StreamError(error) from None
        wait = timeout_s
        while True:
            try:
                result, error = results.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError(f"no response from {model} within {wait:g} s") from None
            wait = next_timeout_s or timeout_s
            if error is not None:
                raise StreamError(error)
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if response.outputs:
                yield result
            if final:
                finished = True
                return
    finally:
        # Cancel only a request that is still running: cancelling a finished one is needless,
        # and a server shutting down right after must not wait on it. A stream per request, not
        # one kept open: an open stream holds up the server's shutdown until its exit timeout.
        try:
            client.stop_stream(cancel_requests=not finished)
        except Exception:  # noqa: BLE001 - a dead connection
            finished = False
        if not finished and on_unfinished is not None:
            on_unfinished()
