"""The glue between Triton's Python backend and the package: what the two `model.py` shells
share (reading inputs, error replies, metrics) and each model's service object. Triton's
`triton_python_backend_utils` module is handed in (`pb`), so everything here imports and tests
without a server."""
