"""The encoder service: image files -> E->L tensors, with a per-image feature cache and batching
of concurrent requests into one vision forward (`qwen3_encoder` in local mode)."""
