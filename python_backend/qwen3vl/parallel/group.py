"""Rank 0's side of the tensor-parallel group: it starts ranks 1..N-1 as worker processes
(multiprocessing `spawn`: a fresh interpreter each, from the stub's own Python), joins them in a
torch.distributed process group, broadcasts each step's inputs, and watches them.

- Rendezvous: rank 0 opens a TCPStore on a free port (port 0: the OS picks, so a reload never
  meets the last instance's port) and hands the port to the workers. NCCL on GPUs (rank r on
  `cuda:r`) with a gloo group beside it for the step's metadata; gloo alone on the CPU.
- Timeouts (`distributed_timeout_s`): on the rendezvous, on each rank's loading, on every
  collective (the backstop behind the watch below); shutdown waits a few seconds, then kills.
- A step: its inputs without the visual rows go as one pickled object over the gloo group;
  the visual and deepstack rows of its prefill chunks follow as tensors broadcast from rank 0
  (NCCL on GPUs), once per step.
- A watch thread waits on the workers' process sentinels. A worker that dies fails the group
  at once: the message names the rank, every later step raises WorkerDied with it, the other
  workers are ended, and the callbacks (backend/language.py: fail new requests, mark the model
  not ready) are told. A step in flight fails too: its collective errors when the dead rank's
  sockets close (gloo), or is aborted (NCCL).

After nano-vllm's LLMEngine / ModelRunner (spawn, one event loop per worker), with what it
lacks: a free port, timeouts, failure handling.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import signal
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait as wait_any
from typing import Callable

import torch
import torch.distributed as dist

from ..engine.model_runner import StepInputs
from ..errors import Unavailable
from ..model.config import ModelConfig
from ..settings import ServingConfig
from .shard import Shard
from .worker import worker_main

STOP_WAIT_S = 10.0   # a worker's time to leave after the stop message before it is killed


class WorkerDied(Unavailable):
    """A tensor-parallel rank is gone (or the ranks fell out of step): the model cannot run."""


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: `cuda:r` on GPUs, the CPU as given."""
    return f"cuda:{rank}" if str(device).startswith("cuda") else "cpu"


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker is started with (pickled to the spawned process)."""
    config: ModelConfig        # rank 0's; the worker moves it to its own device
    settings: ServingConfig
    rank: int
    port: int


def send_step(step: StepInputs | None, cpu_group, device) -> None:
    """Rank 0: the step's inputs to every rank (None: stop). The visual rows go as tensors."""
    if step is None:
        dist.broadcast_object_list([None], src=0, group=cpu_group)
        return
    nv = step.visual_embeds.shape[0]
    meta = dataclasses.replace(step, visual_embeds=step.visual_embeds[:0], deepstack_embeds=step.deepstack_embeds[:, :0])
    dist.broadcast_object_list([(meta, nv)], src=0, group=cpu_group)
    if nv:
        for t in (step.visual_embeds, step.deepstack_embeds):
            dist.broadcast(t.to(device).contiguous(), src=0)


def receive_step(cpu_group, device) -> StepInputs | None:
    """Ranks 1..N-1: the next step's inputs from rank 0 (None: stop)."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=cpu_group)
    if box[0] is None:
        return None
    meta, nv = box[0]
    if not nv:
        return meta
    ve, ds = meta.visual_embeds, meta.deepstack_embeds
    visual = torch.empty((nv, ve.shape[1]), dtype=ve.dtype, device=device)
    deep = torch.empty((ds.shape[0], nv, ds.shape[2]), dtype=ds.dtype, device=device)
    for t in (visual, deep):
        dist.broadcast(t, src=0)
    return dataclasses.replace(meta, visual_embeds=visual, deepstack_embeds=deep)


def describe_exit(process) -> str:
    # Its sentinel closes as it exits, a moment before it can be reaped: wait for that.
    process.join(2.0)
    code = process.exitcode
    if code is None:
        return "is running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class ParallelGroup:
    """The group seen from rank 0 (the Triton model instance). `start` it, build rank 0's
    model with `shard`, hand it to the Engine (`parallel=`), `stop` it on unload."""

    def __init__(self, config: ModelConfig, settings: ServingConfig):
        self.config, self.settings = config, settings
        self.world_size = settings.tensor_parallel_size
        self.shard = Shard(0, self.world_size, settings.enable_expert_parallel, settings.vocab_parallel)
        self.device = rank_device(config.device, 0)
        self.backend = backend_for(config.device)
        self.timeout = timedelta(seconds=settings.distributed_timeout_s)
        self.procs: list = []      # ranks 1..N-1
        self.conns: list = []      # their pipes (loading reports)
        self.cpu_group = None      # gloo: the step's metadata (the default group on the CPU)
        self.failure: str | None = None
        self.callbacks: list[Callable[[str], None]] = []
        self.weight_bytes: dict[int, int] = {}   # rank -> bytes of its weights, once loaded
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.watch: threading.Thread | None = None

    # ---- start
    @classmethod
    def start(cls, config: ModelConfig, settings: ServingConfig) -> "ParallelGroup":
        """Spawn ranks 1..N-1 and join them in the process group (rank 0 is this process).
        Raises InvalidInput when the model does not split into N ranks, RuntimeError when a
        worker dies or the rendezvous times out (the workers are ended then)."""
        group = cls(config, settings)
        group.shard.check(config.text, fp8=config.quantization is not None)
        if group.backend == "nccl" and torch.cuda.device_count() < group.world_size:
            raise Unavailable(f"tensor_parallel_size {group.world_size} needs {group.world_size} GPUs; "
                              f"{torch.cuda.device_count()} are visible")
        try:
            group._spawn_and_join()
        except BaseException:
            group.stop()
            raise
        return group

    def _spawn_and_join(self) -> None:
        if self.backend == "nccl":
            torch.cuda.set_device(self.device)
        store = dist.TCPStore("127.0.0.1", 0, self.world_size, is_master=True, timeout=self.timeout,
                              wait_for_workers=False)
        ctx = mp.get_context("spawn")   # a fresh interpreter: it imports worker_main by name
        for rank in range(1, self.world_size):
            parent, child = ctx.Pipe(duplex=False)
            spec = WorkerSpec(self.config, self.settings, rank, store.port)
            p = ctx.Process(target=worker_main, args=(spec, child), name=f"qwen3vl-tp-rank{rank}", daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        print(f"qwen3_language: tensor parallel {self.world_size} ({self.backend}, "
              f"{'expert parallel' if self.shard.expert_parallel else 'experts split by intermediate size'}): "
              f"workers {[p.pid for p in self.procs]}, rendezvous on port {store.port}", flush=True)
        error: list[BaseException] = []

        def join():
            try:
                dist.init_process_group(self.backend, store=store, rank=0, world_size=self.world_size,
                                        timeout=self.timeout)
                self.cpu_group = dist.new_group(backend="gloo") if self.backend == "nccl" else None
            except BaseException as e:  # noqa: BLE001 - reported on the caller's thread
                error.append(e)

        joiner = threading.Thread(target=join, name="qwen3vl-tp-rendezvous", daemon=True)
        joiner.start()
        self._wait(lambda: not joiner.is_alive(), "the rendezvous")
        if error:
            raise RuntimeError(f"tensor-parallel rendezvous failed: {error[0]}") from error[0]
        self.store = store   # kept open: the workers' store clients talk to it
        self.watch = threading.Thread(target=self._watch, name="qwen3vl-tp-watch", daemon=True)
        self.watch.start()

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        """Until done(); RuntimeError naming the rank when a worker dies first, or after the timeout."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not done():
            for rank, p in enumerate(self.procs, 1):
                if not p.is_alive():
                    raise RuntimeError(f"tensor-parallel rank {rank} (pid {p.pid}) {describe_exit(p)} during "
                                       f"{what}{self._worker_error(rank)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel {what} did not finish within distributed_timeout_s "
                                   f"{self.timeout.total_seconds():g} s")
            time.sleep(0.05)

    def _worker_error(self, rank: int) -> str:
        conn = self.conns[rank - 1]
        try:
            while conn.poll():
                kind, value = conn.recv()
                if kind == "error":
                    return f": {value}"
        except (EOFError, OSError):
            pass
        return ""

    # ---- what the Engine asks (engine.py's `parallel`)
    def agree_num_blocks(self, num_blocks: int, weight_bytes: int) -> int:
        """Rank 0's KV block count and weight bytes -> the count every rank can hold (the
        smallest: block tables are shared). Waits for each worker's loading (its report)."""
        self.weight_bytes[0] = weight_bytes
        for rank, conn in enumerate(self.conns, 1):
            self._wait(conn.poll, f"loading of rank {rank}")
            kind, value = conn.recv()
            if kind == "error":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to load: {value}")
            self.weight_bytes[rank] = value
        t = torch.tensor([num_blocks], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        print(f"qwen3_language: weights per rank (MiB): "
              f"{', '.join(f'{r}: {b / 2**20:.1f}' for r, b in sorted(self.weight_bytes.items()))}; "
              f"KV blocks per rank {int(t)}", flush=True)
        return int(t)

    def runner(self, model, kv, deepstack_layers: int, kernels: str):
        from .runner import ParallelRunner
        return ParallelRunner(self, model, kv, deepstack_layers, kernels)

    def broadcast_step(self, step: StepInputs) -> None:
        send_step(step, self.cpu_group, self.device)

    # ---- failure
    def on_failure(self, callback: Callable[[str], None]) -> None:
        """callback(message) once, on the first failure (called on the watch thread)."""
        self.callbacks.append(callback)
        if self.failure is not None:
            callback(self.failure)

    def check(self, wait_s: float = 0.0) -> None:
        """Raise WorkerDied when the group has failed; with wait_s, first wait up to that long for
        a worker that is dying (a collective can fail before its process is reaped)."""
        deadline = time.monotonic() + wait_s
        while self.failure is None and time.monotonic() < deadline:
            dead = [(r, p) for r, p in enumerate(self.procs, 1) if not p.is_alive()]
            if dead:
                self._died(*dead[0])
                break
            time.sleep(0.05)
        if self.failure is not None:
            raise WorkerDied(self.failure)

    def _died(self, rank: int, p) -> None:
        self.fail(f"tensor-parallel rank {rank} of {self.world_size} (pid {p.pid}) {describe_exit(p)}")

    def fail(self, reason: str) -> None:
        """Mark the group failed (once): every later step raises WorkerDied; the workers are
        ended; the callbacks are told."""
        with self.lock:
            if self.failure is not None or self.stopping.is_set():
                return
            self.failure = (f"{reason}: the language model cannot run and qwen3_language is no longer ready; "
                            "restart the server")
        print(f"qwen3_language: {self.failure}", flush=True)
        self._abort()
        self._end_workers(0.0)
        for callback in self.callbacks:
            try:
                callback(self.failure)
            except Exception:  # noqa: BLE001 - one callback must not stop the others
                traceback.print_exc()

    def _abort(self) -> None:
        """NCCL: abort the communicators so a collective waiting on the dead rank returns
        (gloo's fail by themselves when the rank's sockets close)."""
        if self.backend != "nccl":
            return
        try:
            dist.distributed_c10d._abort_process_group()  # noqa: SLF001 - torch's own way out of a hung collective
        except Exception:  # noqa: BLE001 - older torch: the collective timeout is the backstop
            pass

    def _watch(self) -> None:
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, 1)}
        while not self.stopping.is_set():
            ready = wait_any(list(sentinels), timeout=0.5)
            if ready and not self.stopping.is_set():
                self._died(*sentinels[ready[0]])
                return

    # ---- stop
    def _end_workers(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)

    def stop(self) -> None:
        """End the workers: the stop message when the group is whole (STOP_WAIT_S to leave),
        then kill what is left; the process group destroyed. Never waits on a collective for
        more than a few seconds."""
        if self.stopping.is_set():
            return
        whole = self.failure is None and self.procs and all(p.is_alive() for p in self.procs) and dist.is_initialized()
        self.stopping.set()
        if whole:
            _bounded(lambda: send_step(None, self.cpu_group, self.device), 5.0)
        self._end_workers(STOP_WAIT_S if whole else 0.0)
        if dist.is_initialized():
            _bounded(dist.destroy_process_group, 5.0)
        for conn in self.conns:
            conn.close()


def _bounded(fn: Callable[[], None], timeout_s: float) -> None:
    """fn() on a daemon thread, waited on for at most timeout_s (a collective that will not
    return must not hold up an unload)."""
    def quietly():
        try:
            fn()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to tell it
            pass

    t = threading.Thread(target=quietly, daemon=True)
    t.start()
    t.join(timeout_s)
