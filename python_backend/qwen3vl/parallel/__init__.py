"""Tensor and expert parallel language model across processes (after nano-vllm's model runner:
rank 0 schedules, every rank runs each step's forward on the same inputs).

    shard.py    which part of each tensor a rank holds, the collectives the layers call, what
                a rank reads of each checkpoint tensor: a leaf the model imports
    group.py    rank 0's side: the worker processes, the process group (free port, timeouts),
                each step's inputs broadcast, a dead worker turned into a clear error
    worker.py   ranks 1..N-1: load their shard, then run every step rank 0 broadcasts
    runner.py   the forward of one step from its inputs (every rank), rank 0's model runner
    engine.py   an Engine over the group (what backend/language.py builds when
                tensor_parallel_size > 1)
"""
