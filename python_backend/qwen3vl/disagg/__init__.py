"""Encode/language disaggregation: the E->L tensors move between servers in chunks of visual
tokens that resume after a broken connection, routed to encoders by image content.

By role, as vLLM's encoder-cache connector splits it:
- protocol.py  the wire: chunking a result, and the encoder side's plan of responses
- routing.py   which encoder serves an image (consistent hashing), which ones are live
- stream.py    one request to an encoder and the chunks it sends (gRPC, per-thread clients)
- fetch.py     one image's transfer: assembly in place, resume, failover, the shared-memory path
- remote.py    RemoteEncoder: the language server's stand-in for the vision tower (fan-out)
- shm.py       same-host regions the encoder model writes into
"""
