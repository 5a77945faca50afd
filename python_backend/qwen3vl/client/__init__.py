"""A client of the served models, torch-free (tritonclient and numpy only): what the client CLI,
the OpenAI service, the E->L transfer, the tools and the tests use to talk to Triton.

- `inputs`: the one place that turns a request into the contract's tensors (generation,
  encode, E->L transfer) or into the JSON body of Triton's generate endpoint;
- `responses`: `Chunk`, one response of a generation, `ServerError`, and `NoServer` (nothing
  answers at the address);
- `cancel`: cancel tokens and cancel requests, blocking and asyncio (why they are needed);
- `calls`: blocking calls, one request each, over gRPC streaming or HTTP.
"""

from .calls import Answer, ask, encode, infer, raw_results, stream_grpc, stream_results
from .cancel import cancel_generation
from .inputs import build_inputs, encode_inputs, generate_body, infer_input, transfer_inputs
from .responses import Chunk, NoServer, ServerError, chunk_of

__all__ = ["Answer", "Chunk", "NoServer", "ServerError", "ask", "build_inputs", "cancel_generation", "chunk_of", "encode",
           "encode_inputs", "generate_body", "infer", "infer_input", "raw_results", "stream_grpc", "stream_results",
           "transfer_inputs"]
