"""Starting servers, as libraries for the command line, the tools and the tests:

- `tritonserver`: what `qwen3vl-serve` runs: the binary, its Python backend directory, its
  command line per role, its environment, and running it with the OpenAI API beside it;
- `server`: `Server`, a `qwen3vl-serve` child process on free ports that is waited on until its
  models are ready, and stopped like an operator stops it.
"""
