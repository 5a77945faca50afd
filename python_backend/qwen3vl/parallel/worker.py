"""Ranks 1..N-1 of the tensor-parallel group, each a process rank 0 spawned (group.py): join
the process group, load this rank's share of the language model (only its slices of each
checkpoint tensor), size its KV pool with rank 0 (the same number of blocks everywhere: the
block tables are rank 0's), then run every step rank 0 broadcasts until the stop message.

A worker holds no scheduler, sampler or request state: rank 0 decides everything and sends
each step's inputs. It ends itself when rank 0's process goes (its parent pid changes) and on
any error (its traceback printed to the server's log), so rank 0's watch sees it die instead
of waiting on it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import traceback

PARENT_POLL_S = 0.5


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(3)


def worker_main(spec, conn) -> None:
    """The spawned process's entry point (group.WorkerSpec, the pipe to rank 0)."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    try:
        _serve(spec, conn)
    except BaseException as e:  # noqa: BLE001 - tell rank 0, then die: it must never wait on us
        traceback.print_exc()
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except Exception:  # noqa: BLE001
            pass
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _serve(spec, conn) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from ..engine.engine import kv_cache_budget
    from ..engine.model_runner import ModelRunner, PagedKVCache
    from ..model.text import LanguageModel
    from .group import backend_for, rank_device, receive_step
    from .runner import forward_step
    from .shard import Shard

    settings, rank, world = spec.settings, spec.rank, spec.settings.tensor_parallel_size
    device = rank_device(spec.config.device, rank)
    config = dataclasses.replace(spec.config, device=device)
    if device == "cpu":
        torch.set_num_threads(settings.torch_threads)
    else:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=settings.distributed_timeout_s)
    store = dist.TCPStore("127.0.0.1", spec.port, world, is_master=False, timeout=timeout)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo") if backend_for(device) == "nccl" else None
    shard = Shard(rank, world, settings.enable_expert_parallel, settings.vocab_parallel)
    model = LanguageModel.from_checkpoint(config, shard)
    conn.send(("loaded", sum(p.numel() * p.element_size() for p in model.parameters())))
    cfg = config.text
    block_bytes = PagedKVCache.bytes_per_block(cfg, settings.block_size, config.dtype, model.num_kv_heads)
    blocks = torch.tensor([max(1, kv_cache_budget(config, settings) // block_bytes)], dtype=torch.int64)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=cpu_group)
    kv = PagedKVCache(cfg, int(blocks), settings.block_size, config.dtype, device, model.num_kv_heads)
    runner = ModelRunner(model, kv, config.deepstack_layers, config.kernels)
    while (step := receive_step(cpu_group, device)) is not None:
        forward_step(runner, step)
    dist.destroy_process_group()
