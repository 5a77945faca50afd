"""Pure-decode steps over static buffers, replayed from CUDA graphs (after nano-vllm's
ModelRunner.capture_cudagraph and vLLM's FULL_DECODE_ONLY graphs).

A decode step of B sequences runs at a padded batch size P (1, 2, 4, 8, then steps of 16 up to
max_num_seqs: `capture_sizes`) over buffers whose addresses never change:

    input_ids [P] int64, positions [3, 1, P] int64 (delta + position on all three streams),
    slot_mapping [P] int64, seq_lens [P] int32, cu_seqlens_q [P + 1] int32 (0, 1, .., P),
    block_table [P, W] int32 (W = the blocks of the longest context the pool can hold)

Padding rows are harmless: slot -1 (store_kv skips the row), sequence length 0 (the paged
attention kernel reads no key and writes zeros), token 0 at position 0; their outputs are never
read. The decoder runs over those buffers (the unified paged attention and the fused MoE read
lengths and tables from device memory, so nothing in the step depends on the host knowing a
length) up to the final norm, into a static hidden-state buffer; the LM head and sampling run
outside, on the B real rows only. Prefill and mixed steps stay on ModelRunner's eager path.

On CUDA with the Triton kernels, one `torch.cuda.CUDAGraph` per padded size is captured at
start, largest first, all in one memory pool; a step then copies its inputs into the buffers
(pinned host staging, non-blocking copies: no host sync) and replays. Anywhere else the same
buffers and the same forward run without capture (`capture=False`): how the CPU tests check
this path against the eager one. Deepstack and visual rows never occur in a decode step.
"""

from __future__ import annotations

import time

import torch

from ..settings import ServingConfig
from .model_runner import AttentionMetadata, KernelPagedAttention, ModelRunner
from .scheduler import ScheduledSeq


# Decode batches larger than this run eagerly (nano-vllm's bound): more graphs cost start time and
# memory, and a batch this large is bound by its weight reads, not by launches.
MAX_GRAPH_BATCH = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The padded batch sizes: 1, 2, 4, 8, then multiples of 16, up to the first that holds
    max_num_seqs (nano-vllm's list, which stops short of a max_num_seqs off the grid), at most
    MAX_GRAPH_BATCH."""
    sizes = []
    for size in [1, 2, 4, 8, *range(16, min(max_num_seqs, MAX_GRAPH_BATCH) + 16, 16)]:
        sizes.append(size)
        if size >= min(max_num_seqs, MAX_GRAPH_BATCH):
            break
    return sizes


def graphs_wanted(device, kernels: str, enforce_eager: bool) -> bool:
    """Whether pure-decode steps replay CUDA graphs: on CUDA, with the Triton kernels (the torch
    path's MoE reads expert offsets on the host), unless enforce_eager."""
    return str(device).startswith("cuda") and kernels == "triton" and not enforce_eager


class DecodeGraphRunner:
    """The static-buffer decode step of one ModelRunner (its model, KV pool and kernel ops).

    max_num_seqs: the largest decode batch it takes (larger ones go eager); max_model_len: the
    longest sequence (sizes the block table's width, capped at the pool's blocks); capture:
    capture CUDA graphs now (CUDA only) or run the same forward without them."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int, capture: bool):
        if capture and runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {runner.device}")
        self.runner, self.model, self.kv = runner, runner.model, runner.kv
        self.ops = runner.ops if runner.ops is not None else _torch_ops()
        self.sizes = capture_sizes(max_num_seqs)
        n, bs = self.sizes[-1], self.kv.block_size
        self.width = max(1, min(-(-max_model_len // bs), self.kv.num_blocks))
        dev = runner.device
        pin = dev.type == "cuda"
        with torch.inference_mode():
            # rows: input ids, the three position streams, slots; one copy a step
            self.i64 = torch.zeros(5, n, dtype=torch.int64, device=dev)
            self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
            self.block_table = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
            self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=dev)
            self.hidden = torch.zeros(n, runner.hidden, dtype=runner.dtype, device=dev)
            # host staging, two of each: a step writes one while the other may still be read
            self._stage = [_Staging(n, self.width, pin) for _ in range(2)]
        self._turn = 0
        self._rows: list[list[int] | None] = [None] * n  # the table each device row holds
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        if capture:
            self.capture()

    def host_buffers(self) -> list[torch.Tensor]:
        """The host staging tensors a step fills (pinned on CUDA): the only tensors it reads or
        writes on the host."""
        return [t for stage in self._stage for t in (stage.i64, stage.seq_lens, stage.block_table)]

    # ---- which steps
    def padded(self, num_seqs: int) -> int | None:
        """The padded size of a decode batch of num_seqs, None when it is too large."""
        return next((size for size in self.sizes if size >= num_seqs), None)

    def fits(self, batch: list[ScheduledSeq]) -> bool:
        """A pure-decode step (every sequence one token past its prompt) of a size it takes."""
        return (0 < len(batch) <= self.sizes[-1]
                and all(s.num_tokens == 1 and s.start >= s.seq.prompt_len for s in batch))

    # ---- the step
    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Run one pure-decode step (fits(batch)); logits [B, V] fp32 in batch order, as
        ModelRunner.execute."""
        b = len(batch)
        self.run_padded(batch)
        model = self.model
        return model.shard.gather_vocab(model.lm_head(self.hidden[:b]).float(), model.cfg.vocab_size)

    @torch.inference_mode()
    def run_padded(self, batch: list[ScheduledSeq]) -> int:
        """The part of a step that is captured: the inputs into the static buffers, then the
        decoder at the padded size (replayed when captured) into `hidden`. No host sync when
        captured. Returns the padded size."""
        size = self.padded(len(batch))
        if size is None:
            raise ValueError(f"a decode batch of {len(batch)} is larger than the largest size {self.sizes[-1]}")
        self.load(batch, size)
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
        else:  # uncaptured, the table's columns can stop at the step's longest context (the torch path gathers them all)
            self.hidden[:size] = self.forward(size, -(-max(s.end for s in batch) // self.kv.block_size))
        return size

    def load(self, batch: list[ScheduledSeq], size: int) -> None:
        """Copy a decode batch's inputs into the static buffers, rows past len(batch) padding.
        Host work only, and asynchronous copies out of pinned staging."""
        bs = self.kv.block_size
        stage = self._stage[self._turn]
        self._turn ^= 1
        stage.wait()  # the copies out of it two steps ago have been read
        b = len(batch)
        i64, lens = stage.i64.numpy(), stage.seq_lens.numpy()
        for i, s in enumerate(batch):
            seq, pos = s.seq, s.start
            i64[0, i] = seq.output_ids[-1]
            i64[1:4, i] = pos + seq.prompt.rope_delta
            i64[4, i] = seq.block_table[pos // bs] * bs + pos % bs
            lens[i] = pos + 1
        i64[:, b:size] = 0
        i64[4, b:size] = -1
        lens[b:size] = 0
        self.i64.copy_(stage.i64, non_blocking=True)
        self.seq_lens.copy_(stage.seq_lens, non_blocking=True)
        # Block tables: a row is copied only when it differs from what the device row holds (a
        # table hardly changes once admitted: blocks are reserved for all its tokens), so most
        # steps copy none. Entries past a sequence's blocks are never read (the kernels stop at
        # its length), stale ones included.
        tables = [s.seq.block_table for s in batch]
        changed = next((i for i in range(b) if self._rows[i] != tables[i]), None)
        if changed is not None:
            staged = stage.block_table.numpy()
            for i in range(changed, b):
                if stage.rows[i] != tables[i]:
                    staged[i, :min(len(tables[i]), self.width)] = tables[i][:self.width]
                    stage.rows[i] = list(tables[i])
            self.block_table[changed:b].copy_(stage.block_table[changed:b], non_blocking=True)
            self._rows[changed:b] = stage.rows[changed:b]
        stage.record()

    def forward(self, size: int, width: int | None = None) -> torch.Tensor:
        """The decoder over the first `size` rows of the static buffers, up to the final norm:
        hidden states [size, H] (LanguageModel.forward without deepstack, visual rows or head).
        width: the block table's columns to pass (default all, as captured)."""
        model = self.model
        meta = AttentionMetadata(self.i64[4, :size], 1, cu_seqlens_q=self.cu_seqlens_q[:size + 1],
                                 seq_lens=self.seq_lens[:size], block_table=self.block_table[:size, :width])
        cache = KernelPagedAttention(self.kv, meta, self.ops)
        x = model.embed(self.i64[0, :size][None])                         # [1, P, H]
        cos, sin = model.rotary(self.i64[1:4, None, :size], x.dtype)    # positions [3, 1, P]
        for layer in model.layers:
            x = layer(x, cos, sin, cache)
        return model.norm(x)[0]

    # ---- capture
    @torch.inference_mode()
    def capture(self) -> None:
        """One CUDA graph per padded size, largest first, sharing one memory pool. Inputs are
        padding (no KV written); each size runs once eagerly first (Triton compiles, the
        allocator warms). A step that syncs the host fails here (capture forbids it)."""
        start = time.perf_counter()
        print(f"language model: capturing decode CUDA graphs for batch sizes up to {self.sizes[-1]} "
              "(--enforce-eager: none)", flush=True)
        self.i64.zero_()
        self.i64[4].fill_(-1)
        self.seq_lens.zero_()
        pool = None
        for size in reversed(self.sizes):
            self.hidden[:size] = self.forward(size)  # warm-up
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:size] = self.forward(size)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        # the server's log is the model process's stdout (logging's INFO goes nowhere there)
        print(f"language model: captured {len(self.graphs)} decode CUDA graphs (batch sizes "
              f"{', '.join(map(str, self.sizes))}) in {self.capture_seconds:.1f} s", flush=True)


class _Staging:
    """Host copies of the static buffers (pinned on CUDA, so copies are asynchronous) and the
    event after which a step's copies out of them are done."""

    def __init__(self, n: int, width: int, pin: bool):
        self.i64 = torch.zeros(5, n, dtype=torch.int64, pin_memory=pin)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, pin_memory=pin)
        self.block_table = torch.zeros(n, width, dtype=torch.int32, pin_memory=pin)
        self.rows: list[list[int] | None] = [None] * n  # the table each row holds here
        self.event = torch.cuda.Event() if pin else None
        self.recorded = False

    def record(self) -> None:
        if self.event is not None:
            self.event.record()
            self.recorded = True

    def wait(self) -> None:
        # query first: a finished event needs no synchronize (which would count as a host sync)
        if self.recorded and not self.event.query():
            self.event.synchronize()


def _torch_ops():
    from ..kernels import kernel_ops

    return kernel_ops("torch")


def decode_graphs(runner: ModelRunner, settings: ServingConfig, max_model_len: int,
                  device, kernels: str) -> DecodeGraphRunner | None:
    """The served engine's decode graphs: captured now where graphs_wanted, else None (every
    step eager)."""
    if not graphs_wanted(device, kernels, settings.enforce_eager):
        return None
    return DecodeGraphRunner(runner, settings.max_num_seqs, max_model_len, capture=True)
