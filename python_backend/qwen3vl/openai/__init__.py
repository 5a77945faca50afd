"""The OpenAI-compatible HTTP API (`qwen3vl-openai`): `/v1/chat/completions` with images and
videos, and `/v1/completions`, in front of the Triton `ensemble` over gRPC's stream. One concern
per module:

- `schemas`: the request and response bodies (pydantic v2), and which fields are refused;
- `messages`: OpenAI messages -> the JSON chat the model takes, images in their places;
- `images`: data URLs, and http(s) URLs of allowed domains within size and time limits (images
  and the videos of `video_url` parts);
- `triton`: the async gRPC stream to the ensemble, cancelled when left unfinished;
- `handlers`: one chat completion, streamed (server-sent events) or not;
- `completions`: `/v1/completions` (text prompts) on the handlers' machinery;
- `errors`: OpenAI's error body, and the HTTP status of every failure;
- `metrics`: the service's own Prometheus metrics;
- `app`: the FastAPI application.

Nothing here imports torch: the service runs beside tritonserver or on its own.
"""

# The served model's name in every deployment (qwen3vl-openai, qwen3vl-serve --openai-port, the
# compose files and manifests): what clients send as `model`, whatever the checkpoint.
DEFAULT_MODEL_NAME = "qwen3-vl"
