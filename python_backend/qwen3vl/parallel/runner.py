"""One step's forward from its inputs, as every rank runs it, and rank 0's model runner.

Rank 0 builds the step's inputs (engine/model_runner.py's `prepare`: token ids, MRoPE
positions, slot mapping, attention indices or block tables, the visual rows and deepstack rows
of the step's prefill chunks, which rows sample), broadcasts them (group.py), and every rank
runs `forward_step` on them: the same inputs, each rank's share of the weights and its own KV
pool. Rank 0 alone gets the logits.
"""

from __future__ import annotations

import torch

from ..engine.model_runner import KernelPagedAttention, ModelRunner, PagedAttention, StepInputs
from ..engine.scheduler import ScheduledSeq


@torch.inference_mode()
def forward_step(runner: ModelRunner, step: StepInputs) -> torch.Tensor | None:
    """Run `step` through `runner`'s model over its KV pool (the shard's share on this rank):
    logits [Bs, V] fp32 of the rows that sample on rank 0, None on the other ranks. As
    ModelRunner.execute after its prepare."""
    step = step.to(runner.device)
    x = runner.model.embed_rows(step.input_ids, step.visual_index, step.visual_embeds)
    cache = (PagedAttention(runner.kv, step.attention) if runner.ops is None
             else KernelPagedAttention(runner.kv, step.attention, runner.ops))
    logits = runner.model(x, step.positions, cache, visual_index=step.visual_index,
                          deepstack_embeds=step.deepstack_embeds, logits_rows=step.logits_rows)
    return None if logits is None else logits[0]


class ParallelRunner:
    """Rank 0's model runner (the engine's `runner`): each step's inputs are prepared here,
    broadcast to the other ranks (`group`, group.py's ParallelGroup), and run on every rank.
    A dead worker turns into WorkerDied naming it, at once for the steps after."""

    def __init__(self, group, model, kv, deepstack_layers: int, kernels: str = "torch"):
        self.group = group
        self.local = ModelRunner(model, kv, deepstack_layers, kernels)

    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits [Bs, V] fp32 of the sequences that sample, in batch order. Raises WorkerDied
        (a rank is gone, or the ranks fell out of step: every later step raises it too)."""
        self.group.check()
        step = self.local.prepare(batch)
        try:
            self.group.broadcast_step(step)
            return forward_step(self.local, step)
        except Exception as e:
            # A collective failed: a rank died (say which), or the ranks are out of step for good.
            self.group.check(wait_s=5.0)
            self.group.fail(f"rank 0's step failed part-way ({type(e).__name__}: {e}); the tensor-parallel "
                            "ranks are out of step")
            raise
