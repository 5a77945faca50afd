"""The language engine: continuous batching over a paged KV cache with prefix caching and
chunked prefill (after nano-vllm's LLMEngine and vLLM V1's engine core).

`step()` runs one scheduler step: the scheduler picks the step's decodes and prefill chunks,
the model runner runs them as one batched forward, each sequence that reached a token samples
it with its own parameters and generator, and `step()` returns what happened (EngineOutputs):
each request's new tokens and text (the last with why it ended: stop, length, cancelled), the
requests that failed, and the prompts whose prefill completed. Requests join at the next step
and leave when they finish; a failing step fails its own requests only.

The engine sends nothing and starts no thread: whoever calls `step()` delivers its outputs.
The served model calls it on its engine thread and hands the outputs to its response thread
(worker.py); `generate()` drives one request alone on the caller's thread (tests, benchmarks).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from ..errors import InvalidInput
from ..features import VisualFeatures
from ..model.config import ModelConfig
from ..model.prompt import Prompt, PromptBuilder, check_context_window
from ..model.text import LanguageModel
from ..settings import ServingConfig
from ..tensors import raw_bytes
from .block_manager import BlockManager, block_keys, image_key
from .detokenize import IncrementalDetokenizer
from .graph_runner import decode_graphs
from .logprobs import StepLogprobs, TokenBytes, TokenLogprobs
from .model_runner import ModelRunner, PagedKVCache
from .sampling import SamplingParams, generation_defaults, sample_batch
from .scheduler import Scheduler
from .sequence import Sequence, Status, Step
from .structured import GrammarCompiler, StructuredOutputs

log = logging.getLogger(__name__)


CPU_KV_CACHE_BYTES = 1 << 30
# GPU memory kept free for a step's activations (the gathered K/V of the reference attention
# path, MoE intermediates, logits) when the KV pool is sized from what is left.
ACTIVATION_RESERVE_BYTES = 2 << 30
# An idle engine waits this long at most for a grammar compile before its next step (a new
# request arriving meanwhile waits no longer than this).
GRAMMAR_WAIT_S = 0.02


def kv_cache_budget(config: ModelConfig, settings: ServingConfig) -> int:
    """Bytes for the KV pool: `kv_cache_mb` when set, else (after the weights are loaded) on a
    GPU what gpu_kv_budget leaves, on the CPU 1 GiB (pages are only touched as blocks are used)."""
    if settings.kv_cache_mb:
        return settings.mib(settings.kv_cache_mb)
    if str(config.device).startswith("cuda"):
        device = torch.device(config.device)
        free, total = torch.cuda.mem_get_info(device)
        return gpu_kv_budget(total, free, torch.cuda.memory_reserved(device), settings.gpu_memory_utilization)
    return CPU_KV_CACHE_BYTES


def gpu_kv_budget(total: int, free: int, own: int, utilization: float) -> int:
    """Bytes for the KV pool on a GPU of `total` bytes with `free` free, this process holding
    `own` (torch's reserved memory: the weights): vLLM's gpu_memory_utilization, the share of the
    card this model may use in all (other processes on the card do not count against it), less
    what it holds and the activation reserve, and never more than is free less that reserve.
    Raises InvalidInput when nothing is left."""
    budget = min(int(utilization * total) - own, free) - ACTIVATION_RESERVE_BYTES
    if budget <= 0:
        raise InvalidInput(f"no GPU memory left for the KV cache: the model holds {own / 2**30:.1f} GiB, "
                           f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} at gpu_memory_utilization "
                           f"{utilization}; raise --gpu-memory-utilization or set --kv-cache-mb")
    return budget


@dataclass
class PrefillReport:
    """One request's prefill: prompt tokens restored from the prefix cache and computed."""
    cached_tokens: int = 0
    computed_tokens: int = 0


@dataclass
class EngineOutputs:
    """What the engine did since its outputs were last taken: one `step()`, or a `fail_waiting`
    or `abort_all`. Keyed by request id (Sequence.request_id). Over all its outputs, each
    request ends exactly once: with a Step whose finish_reason is set (stop, length, or
    cancelled when the engine dropped it) or with a failure. When a request has both a step
    and a failure in one EngineOutputs, the step came first."""
    steps: dict[int, Step] = field(default_factory=dict)          # its new tokens and text
    failures: dict[int, Exception] = field(default_factory=dict)  # why it failed (its end)
    prefills: list[PrefillReport] = field(default_factory=list)   # prompts whose prefill completed
    num_seqs: int = 0  # sequences that ran in the step


class Engine:
    """The engine of one language model. `settings` (the one serving config) gives its limits:
    max_model_len, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill,
    enable_prefix_caching, block_size, kv_cache_mb, gpu_memory_utilization."""

    def __init__(self, config: ModelConfig, model: LanguageModel, prompts: PromptBuilder, tokenizer,
                 defaults: SamplingParams, stop_ids: list[int], settings: ServingConfig = ServingConfig(),
                 parallel=None):
        """`parallel`: rank 0's tensor-parallel group (parallel/group.py), `model` its share:
        the KV pool holds that rank's heads, its block count is agreed with the other ranks,
        and the group's runner broadcasts each step to them."""
        self.config, self.model, self.prompts, self.tokenizer = config, model, prompts, tokenizer
        self.defaults, self.stop_ids = defaults, set(stop_ids)
        self.settings = settings
        self.token_bytes = TokenBytes(tokenizer)  # token id -> its bytes (logprobs' tokens)
        self.max_model_len = settings.context_window(config.text.max_position_embeddings)
        kv_heads = getattr(model, "num_kv_heads", None)
        block_bytes = PagedKVCache.bytes_per_block(config.text, settings.block_size, config.dtype, kv_heads)
        num_blocks = max(1, kv_cache_budget(config, settings) // block_bytes)
        if parallel is not None:
            num_blocks = parallel.agree_num_blocks(num_blocks, sum(p.numel() * p.element_size()
                                                                   for p in model.parameters()))
        self.kv = PagedKVCache(config.text, num_blocks, settings.block_size, config.dtype, config.device, kv_heads)
        self.blocks = BlockManager(num_blocks, settings.block_size)
        self.scheduler = Scheduler(settings, self.blocks)
        self.runner = (ModelRunner(model, self.kv, config.deepstack_layers, config.kernels) if parallel is None
                       else parallel.runner(model, self.kv, config.deepstack_layers, config.kernels))
        if parallel is None:  # pure-decode steps from CUDA graphs on one device; tensor parallel steps run eagerly
            self.runner.decode = decode_graphs(self.runner, settings, self.max_model_len, config.device,
                                               config.kernels)
        # structured output: grammars compiled off this thread, masks applied before sampling
        self.grammars = GrammarCompiler(tokenizer, config.text.vocab_size, sorted(self.stop_ids),
                                        settings.max_num_seqs)
        # Collected as they happen and handed out whole by the next step(), fail_waiting() or
        # abort_all(): outputs of a step that raised part-way go out with abort_all's failures.
        self._outputs = EngineOutputs()
        self.steps = 0
        self.last_batch_size = 0  # sequences in the last step (a gauge)

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, settings: ServingConfig = ServingConfig(),
                        parallel=None) -> "Engine":
        """With `parallel` (a started tensor-parallel group): rank 0's share of the model."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(config.checkpoint)
        model = (LanguageModel.from_checkpoint(config) if parallel is None
                 else LanguageModel.from_checkpoint(config, parallel.shard))
        defaults, stop_ids = generation_defaults(config.checkpoint)
        if not stop_ids and processor.tokenizer.eos_token_id is not None:
            stop_ids = [processor.tokenizer.eos_token_id]
        prompts = PromptBuilder(processor, config.image_token_id, config.spatial_merge_size,
                                settings.allow_special_tokens_in_prompt)
        return cls(config, model, prompts, processor.tokenizer, defaults, stop_ids, settings, parallel)

    # ---- requests in
    def params(self, **given) -> SamplingParams:
        """Request parameters over the checkpoint's defaults; None means not given. Raises
        InvalidInput naming a parameter that is out of range or not finite."""
        values = {k: v for k, v in given.items() if v is not None}
        p = SamplingParams(**{**self.defaults.__dict__, **values, "fits_window": "max_tokens" not in values})
        p.validate()
        return p

    def prepare(self, text: str, features: VisualFeatures, raw: bool = False, tools: list | None = None) -> Prompt:
        """The prompt's ids and positions (`raw`: the text tokenized as it is, no chat template;
        `tools`: for the chat template). Raises InvalidInput when the text and the visual
        tensors do not fit together."""
        merge = self.config.spatial_merge_size
        for name, grids in (("image_grid_thw", features.image_grid_thw), ("video_grid_thw", features.video_grid_thw)):
            if grids.ndim != 2 or grids.shape[1] != 3 or bool((grids < 1).any()):
                raise InvalidInput(f"{name} must be [items, 3] of positive (t, h, w), got shape {list(grids.shape)}")
            if bool((grids[:, 1:] % merge).any()):
                raise InvalidInput(f"{name}: h and w must be multiples of the spatial merge size {merge}")
        if features.video_timestamps.ndim != 1 or not bool(torch.isfinite(features.video_timestamps).all()):
            raise InvalidInput("video_timestamps must be [frame groups] of finite seconds")
        self.prompts.check_size(text, self.max_model_len)
        prompt = self.prompts(text, features.image_grid_thw, features.video_grid_thw, features.video_timestamps, raw,
                              tools=tools)
        n, h = prompt.num_visual_tokens, self.config.text.hidden_size
        if tuple(features.visual_embeds.shape) != (n, h):
            raise InvalidInput(f"visual_embeds has shape {tuple(features.visual_embeds.shape)}, "
                               f"{'image_grid_thw and video_grid_thw imply' if len(features.video_grid_thw) else 'image_grid_thw implies'} "
                               f"({n}, {h})")
        want = (self.config.deepstack_layers, n, h)
        if n and tuple(features.deepstack_embeds.shape) != want:
            raise InvalidInput(f"deepstack_embeds has shape {tuple(features.deepstack_embeds.shape)}, expected {want}")
        for name, t in (("visual_embeds", features.visual_embeds), ("deepstack_embeds", features.deepstack_embeds)):
            if n and not bool(torch.isfinite(t).all()):
                raise InvalidInput(f"{name} holds NaN or infinite values")
        return prompt

    @staticmethod
    def in_prompt_order(prompt: Prompt, features: VisualFeatures) -> VisualFeatures:
        """The E->L rows (images', then videos') reordered to where the prompt consumes them."""
        if prompt.row_order is None:
            return features
        return features.rows(features.visual_embeds[prompt.row_order], features.deepstack_embeds[:, prompt.row_order])

    def new_sequence(self, text: str, features: VisualFeatures, params: SamplingParams, raw: bool = False,
                     structured: StructuredOutputs | None = None, tools: list | None = None) -> Sequence:
        """A validated sequence, ready for `add` (`raw`: the text is the whole prompt, see
        PromptBuilder; `structured`: its grammar, engine/structured.py; `tools`: function
        definitions the chat template renders into the prompt). Raises InvalidInput (bad text,
        tensors, or a request longer than max_model_len)."""
        if structured is not None and params.ignore_eos:
            raise InvalidInput("ignore_eos cannot be combined with structured output: the grammar's end "
                               "ends the sequence")
        prompt = self.prepare(text, features, raw, tools)
        features = self.in_prompt_order(prompt, features)
        left = self.max_model_len - len(prompt.input_ids)
        if params.fits_window and 0 < left < params.max_tokens:
            params = replace(params, max_tokens=left)
        check_context_window(len(prompt.input_ids), params.max_tokens, self.max_model_len)
        keys = self._block_keys(prompt, features) if self.settings.enable_prefix_caching else []
        seq = Sequence(prompt, features, params, IncrementalDetokenizer(self.tokenizer), self._generator(params), keys)
        seq.structured = structured
        # Choices 1..n-1 (the n choices of one request): the same prompt and visual rows, each its
        # own detokenizer and generator, seeded with seed + i (mod 2**64): choice i is what the
        # request alone with that seed gives. They run once choice 0's prefill is done.
        seq.followers = [Sequence(prompt, features, params, IncrementalDetokenizer(self.tokenizer),
                                  self._generator(params, i), keys, index=i, leader=seq) for i in range(1, params.n)]
        for follower in seq.followers:  # each choice gets its own matcher of the same grammar (`add`)
            follower.structured = structured
        return seq

    def _generator(self, params: SamplingParams, choice: int = 0) -> torch.Generator | None:
        """Choice `choice`'s generator: seeded with seed + choice (mod 2**64), or a fresh random seed."""
        if params.greedy:
            return None
        generator = torch.Generator(device=self.config.device)
        seed = ((params.seed + choice) % 2**64 if params.seed is not None
                else int.from_bytes(os.urandom(8), "little") >> 1)
        generator.manual_seed(seed)
        return generator

    def _block_keys(self, prompt: Prompt, features: VisualFeatures) -> list[bytes]:
        """features: in prompt order. Each run of visual tokens (an image, a video's frame
        group) keys the blocks it overlaps by its content."""
        images, row = [], 0
        for first, count, grid in prompt.runs:
            embeds = features.visual_embeds[row:row + count].contiguous()
            deepstack = features.deepstack_embeds[:, row:row + count].contiguous()
            key = image_key(raw_bytes(embeds), raw_bytes(deepstack), tuple(grid))
            images.append((first, count, key))
            row += count
        return block_keys(prompt.input_ids.numpy(), self.blocks.block_size, images)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it joins the running batch at the next step with room. Raises
        InvalidInput if it could never fit in the KV cache. A sequence with structured output
        starts its grammar's compile (or finds it cached) and waits until it is ready."""
        self.scheduler.add(seq)
        if seq.structured is not None:
            # one compile (cached by its text), a matcher per choice: the followers' states share
            # the leader's compile and get their matchers when it is ready (_poll_grammars)
            for choice in seq.choices:
                choice.grammar = self.grammars.submit(seq.structured)

    # ---- the step
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> EngineOutputs:
        """One scheduler step: drop the sequences whose cancel was requested (each ends with a
        `cancelled` step), run the rest that fit, sample. Returns what happened, including the
        requests this step failed (its forward or sampling raised). Raises only on a bug
        outside the forward; then `abort_all` hands out what the step had done so far."""
        self._drop_cancelled()
        compiling = self._poll_grammars()
        batch = self.scheduler.schedule()
        self.last_batch_size = len(batch)
        self._outputs.num_seqs = len(batch)
        if not batch:
            if compiling:  # nothing to run until a grammar is ready: wait for one, not spin
                wait_futures(compiling, timeout=GRAMMAR_WAIT_S, return_when=FIRST_COMPLETED)
            return self._take_outputs()
        self.steps += 1
        try:
            logits = self.runner.execute(batch)
            # A leader's last prefill chunk samples its followers' first tokens from its row too.
            rows = [(row, choice) for row, s in enumerate(s for s in batch if s.samples)
                    for choice in (s.seq.choices if s.start < s.seq.prompt_len else [s.seq]) if not choice.finished]
            seqs = [choice for _, choice in rows]
            if len(rows) != logits.shape[0]:
                logits = logits.index_select(0, torch.tensor([row for row, _ in rows], device=logits.device))
            # Taken from the raw logits, before the grammar's mask and sampling (docs/logprobs-and-n.md).
            logprobs = StepLogprobs(logits, [seq.params.logprobs for seq in seqs])
            no_token = self.grammars.mask(logits, [seq.grammar for seq in seqs])
            sampled = sample_batch(logits, seqs)
        except Exception as e:  # noqa: BLE001 - the step's requests fail; the engine goes on
            log.exception("engine step failed (%d sequences)", len(batch))
            for s in batch:
                self._fail(s.seq, RuntimeError(f"the engine step running this request failed: "
                                               f"{type(e).__name__}: {e}"))
            return self._take_outputs()
        failed = {id(seqs[i]): error for i, error in no_token.items()}
        for s in batch:
            seq = s.seq
            seq.num_computed = s.end
            if self.settings.enable_prefix_caching and s.start < seq.prompt_len:
                self._register_prompt_blocks(seq, s.start)
            if s.samples and s.start < seq.prompt_len:  # the prompt's last chunk: its prefill is done
                self._outputs.prefills.append(PrefillReport(seq.num_cached, seq.prompt_len - seq.num_cached))
        for seq in seqs:  # before any choice appends (and maybe frees its blocks)
            if seq.leader is not None and seq.status is Status.WAITING:
                self._fork(seq)
        for seq, token, token_logprobs in zip(seqs, sampled, logprobs.of(sampled)):
            error = failed.get(id(seq)) or (seq.grammar.accept(token) if seq.grammar is not None else None)
            if error is not None:  # its grammar allows nothing (or rejects the token): it fails alone
                self._fail(seq, error)
                continue
            self._append(seq, token, token_logprobs)
        return self._take_outputs()

    def _fork(self, follower: Sequence) -> None:
        """A follower joins the batch after its leader's prefill: the prompt's full blocks are
        already its own (shared at admission); the partial last block's KV is copied into its
        own block (the leader's generated tokens go into the leader's copy). The copy is made at
        the start of the next step's forward, on every rank of a tensor-parallel group, before
        anything writes to either block."""
        leader = follower.leader
        full, tail = divmod(leader.prompt_len, self.blocks.block_size)
        if tail:
            self.runner.copy_before_next_step(leader.block_table[full], follower.block_table[full], tail)
        follower.num_computed, follower.num_cached = leader.prompt_len, leader.num_cached
        follower.admitted = leader.admitted
        leader.followers.remove(follower)
        self.scheduler.join(follower)

    def _poll_grammars(self) -> list:
        """Waiting sequences whose grammar compile ended: ready, or failed (the request fails
        alone with its InvalidInput). Returns the compiles still running."""
        compiling = []
        for seq in list(self.scheduler.waiting):
            if seq.grammar is None or seq.grammar.ready:
                continue
            if not seq.grammar.poll():
                compiling.append(seq.grammar.compiled)
            elif seq.grammar.error is not None:
                self._fail(seq, seq.grammar.error)   # its waiting choices fail with it
            else:
                for follower in seq.followers:       # the same compile: each its own matcher
                    follower.grammar.poll()
        return compiling

    def _take_outputs(self) -> EngineOutputs:
        out, self._outputs = self._outputs, EngineOutputs()
        return out

    def _register_prompt_blocks(self, seq: Sequence, start: int) -> None:
        """Full prompt blocks whose KV this step completed become reusable."""
        bs = self.blocks.block_size
        for b in range(start // bs, min(seq.num_computed, seq.prompt_len) // bs):
            if b < len(seq.block_keys):
                self.blocks.register(seq.block_table[b], seq.block_keys[b])

    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> None:
        seq.output_ids.append(token)
        # A stop string ends the answer at the token that completes it (that token is the
        # answer's last, as in vLLM): nothing after it is generated, sent or counted.
        text, stopped = seq.stops.feed(seq.detokenizer.push(token))
        reason = ("stop" if stopped or (token in self.stop_ids and not seq.params.ignore_eos) else
                  "length" if len(seq.output_ids) >= seq.params.max_tokens else "")
        if reason:
            if not stopped:
                text += self._rest(seq)
            self.scheduler.finish(seq, reason)
        self._outputs.steps[seq.request_id] = Step([token], text, reason, seq.index, logprobs)

    @staticmethod
    def _rest(seq: Sequence) -> str:
        """The text still held back when the answer ends without a stop string: the detokenizer's
        incomplete characters, and text that could have begun a stop string (up to one, if the
        flushed characters complete it)."""
        text, stopped = seq.stops.feed(seq.detokenizer.flush())
        return text if stopped else text + seq.stops.flush()

    def _drop_cancelled(self) -> None:
        for seq in self._in_flight():
            if seq.cancelled and not seq.finished:
                text = self._rest(seq)
                self.scheduler.finish(seq, "cancelled")
                self._outputs.steps[seq.request_id] = Step([], text, "cancelled", seq.index,
                                                           None if seq.params.logprobs is None else TokenLogprobs())

    def _in_flight(self) -> list[Sequence]:
        """Running and waiting sequences, with the followers their leaders still hold."""
        return [c for seq in [*self.scheduler.running, *self.scheduler.waiting] for c in seq.choices]

    def _fail(self, seq: Sequence, error: Exception) -> None:
        if not seq.finished:
            self.scheduler.finish(seq, "error")
            self._outputs.failures[seq.request_id] = error
        for follower in seq.followers:  # choices not yet forked fail with their leader
            self._fail(follower, error)

    def fail_waiting(self, seq: Sequence, error: Exception) -> EngineOutputs:
        """Fail a sequence that has not started (e.g. past its queue deadline); returns its
        failure (with anything else not yet handed out)."""
        self._fail(seq, error)
        return self._take_outputs()

    def abort_all(self, error: Exception) -> EngineOutputs:
        """Fail every request in flight (shutdown, a bug in the loop); returns their failures,
        after whatever a step that raised had already produced."""
        for seq in self._in_flight():
            self._fail(seq, error)
        return self._take_outputs()

    def stats(self) -> dict[str, int]:
        """Running and waiting requests, KV blocks used and in all, the last step's batch (gauges)."""
        running = len(self.scheduler.running)
        return {"running": running, "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": self.blocks.num_used, "kv_blocks_total": self.blocks.num_blocks,
                "batch_size": self.last_batch_size if running else 0}

    # ---- one request alone (tests, benchmarks)
    def generate(self, text: str, features: VisualFeatures, params: SamplingParams,
                 is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        """Run one request to its end on this thread (no other request may be in flight),
        yielding its steps (of all its choices: Step.index). Raises what it fails with."""
        seq = self.new_sequence(text, features, params)
        choices = seq.choices
        self.add(seq)
        while True:
            out = self.step()
            for choice in choices:
                if choice.request_id in out.failures:
                    raise out.failures[choice.request_id]
                if choice.request_id in out.steps:
                    yield out.steps[choice.request_id]
            if all(choice.finished for choice in choices):
                return
            if is_cancelled():
                seq.cancel_requested = True
