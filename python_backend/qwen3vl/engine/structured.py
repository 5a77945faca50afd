"""Structured output: a grammar per sequence constrains which tokens it may sample (xgrammar,
the default backend of vLLM, SGLang and TensorRT-LLM).

A request asks for it with vLLM's `structured_outputs` object (exactly one of `json`: a JSON
schema; `json_object`: true; `regex`; `choice`: a list of strings; `grammar`: EBNF;
`structural_tag`: xgrammar's structural tag JSON; the OpenAI service builds the last from
`tools` / `tool_choice`). The flow, after vLLM's StructuredOutputManager
(`v1/structured_output/__init__.py`) and TensorRT-LLM's GuidedDecoder:

- `StructuredOutputs.parse` checks the request's object at once (bad JSON, two kinds at once:
  InvalidInput, before the request is queued).
- `GrammarCompiler.submit` compiles it on a small thread pool, never on the engine thread;
  compiled grammars are cached by their kind and text (LRU, bounded). A sequence waits in the
  queue until its grammar is ready (the scheduler skips it; the batch does not wait); a grammar
  that fails to compile fails its request alone (InvalidInput naming the problem).
- Each step, `GrammarCompiler.mask` fills one bitmask row per constrained row that samples
  (`fill_next_token_bitmask`) and applies them to the raw logits, before temperature, top-k and
  top-p (`apply_token_bitmask_inplace`, -inf where the grammar forbids); rows without a grammar
  are not touched, so their tokens are bit-identical to an unconstrained batch. A row whose mask
  allows nothing is not masked (no all -inf row, no NaN) and its request fails alone. The row's
  most likely tokens that xgrammar's mask leaves out are checked against its matcher and let
  back where it accepts them (`repair_mask`: an xgrammar bug).
- `GrammarState.accept` advances the matcher with the sampled token. The stop tokens are allowed
  only where the grammar is complete, so a grammar's end ends the sequence (finish_reason
  `stop`); max_tokens inside the grammar ends it with `length` (the output may be cut short, as
  in OpenAI's API).
"""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from cachetools import LRUCache

from ..errors import InvalidInput

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
# How many of a constrained row's most likely tokens are checked against its matcher when the
# mask leaves them out (xgrammar's mask can leave out a token its matcher accepts: MaskRepair).
MASK_REPAIR_TOP_K = 16
# Compiled grammars kept (each is the token-level automaton over the vocabulary: small for most
# schemas). Compiles run on this many threads, off the engine thread.
GRAMMAR_CACHE_SIZE = 128
COMPILE_THREADS = 1


@dataclass(frozen=True)
class StructuredOutputs:
    """One request's constraint: `kind` (one of KINDS) and its text (a JSON schema re-dumped
    compact, keys in their order: a schema's properties are written in the order it gives them;
    the regex, the EBNF, the choices as a JSON list, ...): the cache key."""
    kind: str
    spec: str

    @classmethod
    def parse(cls, text: str) -> "StructuredOutputs":
        """vLLM's `structured_outputs` object as JSON text, e.g. `{"json": {...schema...}}`,
        `{"regex": "[0-9]+"}`, `{"choice": ["yes", "no"]}`, `{"json_object": true}`. Raises
        InvalidInput naming what is wrong (not JSON, no kind or two, a value of the wrong type)."""
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidInput(f"structured_outputs is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise InvalidInput("structured_outputs must be a JSON object, e.g. {\"json\": {...schema...}}")
        given = [k for k in KINDS if obj.get(k) not in (None, False)]
        unknown = sorted(set(obj) - set(KINDS))
        if unknown:
            raise InvalidInput(f"structured_outputs: unknown field(s) {', '.join(unknown)}; use one of "
                               f"{', '.join(KINDS)}")
        if len(given) != 1:
            raise InvalidInput(f"structured_outputs: give exactly one of {', '.join(KINDS)}, got "
                               f"{', '.join(given) or 'none'}")
        kind, value = given[0], obj[given[0]]
        if kind == "json":
            value = _json_value(value, "structured_outputs.json: the schema")
            if not isinstance(value, (dict, bool)):
                raise InvalidInput("structured_outputs.json: a JSON schema must be an object (or true/false)")
            return cls(kind, json.dumps(value, ensure_ascii=False))
        if kind == "json_object":
            if value is not True:
                raise InvalidInput("structured_outputs.json_object: must be true")
            return cls(kind, "")
        if kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise InvalidInput("structured_outputs.choice: a non-empty list of non-empty strings")
            return cls(kind, json.dumps(value, ensure_ascii=False))
        if kind == "structural_tag":
            value = _json_value(value, "structured_outputs.structural_tag")
            if not isinstance(value, dict):
                raise InvalidInput("structured_outputs.structural_tag: must be a JSON object")
            return cls(kind, json.dumps(value, ensure_ascii=False))
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"structured_outputs.{kind}: must be a non-empty string")
        return cls(kind, value)


def _json_value(value, what: str):
    """`value` itself, or parsed when a client sent it as JSON text (vLLM accepts both).
    Raises InvalidInput naming `what` when the text is not JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise InvalidInput(f"{what} is not valid JSON: {e}") from None


# What a JSON string may hold unescaped (RFC 8259: no quote, backslash or control character).
_STRING_CHARACTER = '[^\\x00-\\x1f"\\\\]'
# Schema keywords whose values are data, not schemas.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "required"})


def json_safe_schema(schema):
    """`schema` with every string bounded by minLength/maxLength (and without its own pattern
    or format) given the equivalent `pattern` instead. xgrammar 0.2.8 (and 0.2.9) compiles a
    length-bounded string to characters `[^"\\\r\n]`, which lets raw control characters
    (U+0000-U+001F) into it: not valid JSON, and a random model writes them. The pattern keeps the
    bounds and JSON's character rule (no escapes inside such a string)."""
    if isinstance(schema, list):
        return [json_safe_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _DATA_KEYWORDS else json_safe_schema(v)) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and "pattern" not in out and "format" not in out:
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f"^{_STRING_CHARACTER}{{{low},{'' if high is None else int(high)}}}$"
    return out


def _json_safe_tag(tag):
    """A structural tag with the JSON schemas of its json_schema formats made json-safe."""
    if isinstance(tag, list):
        return [_json_safe_tag(t) for t in tag]
    if not isinstance(tag, dict):
        return tag
    if tag.get("type") == "json_schema" and "json_schema" in tag:
        return {**tag, "json_schema": json_safe_schema(tag["json_schema"])}
    return {k: _json_safe_tag(v) for k, v in tag.items()}


# UTF-8 decoding states (RFC 3629's table): continuation bytes still needed, and the range the
# next one must be in. The first byte after E0, ED, F0 and F4 has a narrower range: that is what
# rules out overlong forms and surrogates.
_UTF8_START = (0, 0, 0)
_UTF8_STATES = [_UTF8_START, (1, 0x80, 0xBF), (2, 0x80, 0xBF), (2, 0xA0, 0xBF), (2, 0x80, 0x9F),
                (3, 0x80, 0xBF), (3, 0x90, 0xBF), (3, 0x80, 0x8F)]
_UTF8_INDEX = {state: i for i, state in enumerate(_UTF8_STATES)}
# The states right after E0, ED, F0 or F4: a token may not end in one (see Utf8Guard).
_UTF8_NARROW = {(2, 0xA0, 0xBF), (2, 0x80, 0x9F), (3, 0x90, 0xBF), (3, 0x80, 0x8F)}


def _utf8_step(state: tuple[int, int, int], byte: int) -> tuple[int, int, int] | None:
    """The state after `byte`, or None when it cannot come next in valid UTF-8."""
    need, low, high = state
    if need:
        return None if not low <= byte <= high else ((need - 1, 0x80, 0xBF) if need > 1 else _UTF8_START)
    if byte < 0x80:
        return _UTF8_START
    if 0xC2 <= byte <= 0xDF:
        return (1, 0x80, 0xBF)
    if 0xE0 <= byte <= 0xEF:
        return {0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F)}.get(byte, (2, 0x80, 0xBF))
    if 0xF0 <= byte <= 0xF4:
        return {0xF0: (3, 0x90, 0xBF), 0xF4: (3, 0x80, 0x8F)}.get(byte, (3, 0x80, 0xBF))
    return None


class Utf8Guard:
    """Which tokens keep a constrained answer valid UTF-8, by the decoding state its bytes so
    far leave. xgrammar 0.2.8 decodes UTF-8 leniently: it takes an overlong form (E0 96 AD) as the
    character it spells (U+05AD), so a grammar that allows that character lets the model write
    bytes that are no text at all (the detokenizer's U+FFFD, three of them where the schema allowed
    one character). Byte-level vocabularies hold every byte, so a random model does write them.

    So a token is allowed only where its bytes continue valid UTF-8, and only if it does not end
    right after a lead byte E0, ED, F0 or F4: the byte after those is the one the lenient decoding
    gets wrong, so it must come in the same token as its lead byte, where the grammar sees both
    (a model could otherwise pick E0 where the grammar's only ways on are overlong: a dead end).
    Characters of those lead bytes need such a token in the vocabulary (byte-level BPE
    vocabularies merge them: Qwen's has them for the scripts and emoji it writes).

    `token_bytes[i]`: token i's bytes (xgrammar's TokenizerInfo.decoded_vocab); `vocab_size`:
    the logits' width. `masks` [8, ceil(V / 32)] int32: xgrammar's bitmask layout, one row per
    state. A token of no bytes (a special token) is allowed only between characters."""

    def __init__(self, token_bytes: list[bytes], vocab_size: int):
        allowed = np.zeros((len(_UTF8_STATES), vocab_size), dtype=bool)
        self.next_state = np.zeros((len(_UTF8_STATES), vocab_size), dtype=np.int8)
        for token, data in enumerate(token_bytes[:vocab_size]):
            for index, state in enumerate(_UTF8_STATES):
                if index and (not data or data[0] < 0x80 or data[0] > 0xBF):
                    continue  # a character is unfinished: only a continuation byte may come
                for byte in data:
                    state = _utf8_step(state, byte)
                    if state is None:
                        break
                else:
                    if state not in _UTF8_NARROW:
                        allowed[index, token] = True
                        self.next_state[index, token] = _UTF8_INDEX[state]
        words = -(-vocab_size // 32)
        padded = np.zeros((len(_UTF8_STATES), words * 32), dtype=np.int64)
        padded[:, :vocab_size] = allowed
        packed = (padded.reshape(len(_UTF8_STATES), words, 32) << np.arange(32, dtype=np.int64)).sum(-1)
        self.masks = torch.from_numpy(packed.astype(np.uint32).view(np.int32))

    def after(self, state: int, token: int) -> int:
        return int(self.next_state[state, token]) if 0 <= token < self.next_state.shape[1] else state


# Schema keywords xgrammar 0.2.8 compiles without enforcing (vLLM's
# has_xgrammar_unsupported_json_features); such schemas go to llguidance.
_XGRAMMAR_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "uuid", "ipv4", "ipv6",
                               "hostname", "uri", "uri-reference"})


# Keywords whose value maps names (of properties, definitions) to schemas.
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def xgrammar_unenforced(schema) -> list[str]:
    """The keywords of a JSON schema (a dict, bool or list, walked whole) that xgrammar accepts
    but does not enforce: `multipleOf`, `uniqueItems`, `contains`, a `format` it does not know,
    `minLength`/`maxLength` beside a `pattern` or `format`. Sorted, each once; [] for none."""
    found = set()

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                continue
            if key in _NAMED_SCHEMAS and isinstance(value, dict):
                walk(list(value.values()))      # its keys are names, not keywords
                continue
            if key == "multipleOf" or key == "contains" or (key == "uniqueItems" and value is True):
                found.add(key)
            elif key == "format" and isinstance(value, str) and value not in _XGRAMMAR_FORMATS:
                found.add(f"format {value!r}")
            walk(value)
        if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
            found.add("minLength/maxLength with pattern or format")

    walk(schema)
    return sorted(found)


class LLGuidanceMatcher:
    """llguidance's LLMatcher behind the xgrammar GrammarMatcher methods the engine calls
    (accept_token, rollback, fill_next_token_bitmask into the same int32 bitmask layout)."""

    def __init__(self, matcher):
        self._matcher = matcher

    def accept_token(self, token: int) -> bool:
        return bool(self._matcher.consume_token(token))

    def rollback(self, num_tokens: int = 1) -> None:
        self._matcher.rollback(num_tokens)

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, index)

    def is_completed(self) -> bool:
        return bool(self._matcher.is_accepting())


@dataclass(eq=False)
class GrammarState:
    """A sequence's grammar: its compile (a future) until it is ready, then its matcher."""
    spec: StructuredOutputs
    compiled: Future
    matcher: object | None = None  # xgrammar.GrammarMatcher once the compile is done
    error: Exception | None = None
    utf8_state: int = 0  # where its bytes so far leave UTF-8 decoding (Utf8Guard)
    guard: Utf8Guard | None = None

    @property
    def ready(self) -> bool:
        return self.matcher is not None

    def poll(self) -> bool:
        """Whether the compile has ended (then `matcher` or `error` is set). Engine thread."""
        if self.matcher is not None or self.error is not None:
            return True
        if not self.compiled.done():
            return False
        try:
            new_matcher, self.guard = self.compiled.result()
            self.matcher = new_matcher()
        except InvalidInput as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - whatever the library raised, this request fails alone
            self.error = InvalidInput(f"structured_outputs.{self.spec.kind}: {type(e).__name__}: {e}")
        return True

    def accept(self, token: int) -> Exception | None:
        """Advance the matcher by the sampled token; an error (the request's) if the grammar
        rejects it, which the mask makes impossible unless something is wrong."""
        if self.matcher.accept_token(token):
            self.utf8_state = self.guard.after(self.utf8_state, token)
            return None
        return InvalidInput(f"structured_outputs.{self.spec.kind}: the grammar rejected sampled token {token}")


def repair_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], matchers: list,
                stop_ids: set[int], top_k: int = MASK_REPAIR_TOP_K) -> int:
    """Let back into `bitmask` (in place; [>= B, ceil(V / 32)] int32, xgrammar's layout) the
    tokens among each constrained row's `top_k` highest logits (logits [B, V]) that the mask
    leaves out but the row's matcher accepts; returns how many were let back.

    Why: xgrammar 0.2.8 (and 0.2.9) computes a mask that can leave out a token its own matcher
    accepts. Found on the demo checkpoint's vocabulary: with the tokens `"`, `pl` and `purple`,
    the grammar `"\"purple\""` after `"` masks `purple` off, while `accept_token` takes it; the
    model, trained to write `purple` as one token, was pushed to another colour. It happens where a
    token rejected earlier in the sorted vocabulary (`pl`) occurs later inside the literal. The
    answers stay valid but greedy decoding misses the grammar's true best token. Checking each
    left-out top-k token with `accept_token` and undoing it with `rollback` makes the mask right
    over the k most likely tokens, which is where greedy and top-k/top-p sampling choose; a
    wrongly left-out token further down stays out. Stop tokens are left to the mask (its rule
    for them is right: allowed only where the grammar is complete). Costs one top-k per step over
    the constrained rows and an accept/rollback per left-out candidate (microseconds)."""
    k = min(top_k, logits.shape[1])
    candidates = torch.topk(logits[rows], k, dim=1).indices.cpu()          # [R, k]
    # the mask's bit of each candidate only (not whole rows: ceil(V / 32) words each)
    bits = (bitmask[rows].gather(1, candidates >> 5) >> (candidates & 31)) & 1
    left_out = torch.where(bits == 0, candidates, -1).tolist()             # one host read per step
    let_back = 0
    for row, matcher, tokens in zip(rows, matchers, left_out):
        for token in tokens:
            if token < 0 or token in stop_ids:
                continue
            if matcher.accept_token(token):
                matcher.rollback(1)
                bitmask[row, token >> 5] |= _bit(token & 31)
                let_back += 1
    return let_back


def _bit(position: int) -> int:
    """The int32 word holding only bit `position` (bit 31 is the sign bit)."""
    return (1 << position) - (1 << 32) if position == 31 else 1 << position


@dataclass
class GrammarCompiler:
    """xgrammar's compiler for one tokenizer, its cache and thread pool, and the step's bitmask.

    `tokenizer`: the checkpoint's (Hugging Face) tokenizer; `vocab_size`: the logits' width
    (the model's vocabulary, padded past the tokenizer: those ids are always masked off);
    `stop_ids`: the engine's stop tokens (allowed only where a grammar is complete);
    `max_rows`: the most sequences in a step (max_num_seqs)."""
    tokenizer: object
    vocab_size: int
    stop_ids: list[int]
    max_rows: int
    cache_size: int = GRAMMAR_CACHE_SIZE
    _cache: LRUCache = field(init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _compiler: object = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _bitmask: torch.Tensor | None = field(default=None, init=False, repr=False)
    _guard: Utf8Guard | None = field(default=None, init=False, repr=False)
    _llguidance_tokenizer: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self._cache = LRUCache(self.cache_size)

    def submit(self, spec: StructuredOutputs) -> GrammarState:
        """Start (or reuse) the compile of `spec`; engine thread. A failed compile is not kept."""
        key = (spec.kind, spec.spec)
        future = self._cache.get(key)
        if future is None or (future.done() and future.exception() is not None):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="qwen3vl-grammar")
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
        return GrammarState(spec, future)

    def _xgrammar_compiler(self):
        """Built on first use, on a compile thread (the tokenizer's info takes up to a second
        for a 152k vocabulary)."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=sorted(self.stop_ids))
                # our own LRU holds the results; xgrammar's cache would keep a second copy
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
                self._guard = Utf8Guard(info.decoded_vocab, self.vocab_size)
            return self._compiler

    def _compile(self, spec: StructuredOutputs):
        """(A function making one matcher per sequence, xgrammar's or llguidance's; the UTF-8
        guard). A JSON schema using what xgrammar accepts without enforcing it goes to llguidance
        (vLLM's `auto` policy). Raises InvalidInput naming the request's problem."""
        compiler = self._xgrammar_compiler()
        if spec.kind == "json":
            unenforced = xgrammar_unenforced(json.loads(spec.spec))
            if unenforced:
                return self._llguidance_matcher_factory(spec, unenforced), self._guard
        import xgrammar as xgr

        return functools.partial(xgr.GrammarMatcher, self._compile_with(compiler, spec)), self._guard

    def _llguidance_matcher_factory(self, spec: StructuredOutputs, unenforced: list[str]):
        """A function making one LLGuidanceMatcher per sequence for a JSON schema, compact as
        xgrammar writes it. Raises InvalidInput naming what llguidance cannot enforce either."""
        import llguidance
        import llguidance.hf

        with self._lock:
            if self._llguidance_tokenizer is None:
                self._llguidance_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size, eos_token=sorted(self.stop_ids))
        tokenizer = self._llguidance_tokenizer
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            spec.spec, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if failed or messages:
            raise InvalidInput(f"structured_outputs.json: the JSON schema uses {', '.join(unenforced)}, which "
                               f"xgrammar does not enforce, and llguidance cannot: {'; '.join(messages)[:500]}")
        return lambda: LLGuidanceMatcher(llguidance.LLMatcher(tokenizer, grammar))

    @staticmethod
    def _compile_with(compiler, spec: StructuredOutputs):
        try:
            # JSON compact (`{"a": 1, "b": [2]}`): no free whitespace, which a model could emit forever
            if spec.kind == "json":
                return compiler.compile_json_schema(json.dumps(json_safe_schema(json.loads(spec.spec))),
                                                    any_whitespace=False)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.spec)
            if spec.kind == "choice":
                choices = json.loads(spec.spec)
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                         for c in choices))
            if spec.kind == "grammar":
                return compiler.compile_grammar(spec.spec)
            return compiler.compile_structural_tag(json.dumps(_json_safe_tag(json.loads(spec.spec))))
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError, ValueError and its own
            what = {"json": "the JSON schema", "regex": "the regex", "grammar": "the EBNF grammar",
                    "structural_tag": "the structural tag"}.get(spec.kind, "the constraint")
            message = str(e).strip().splitlines()[-1][:500] if str(e).strip() else type(e).__name__
            raise InvalidInput(f"structured_outputs.{spec.kind}: {what} cannot be compiled: {message}") from None

    def mask(self, logits: torch.Tensor, grammars: list[GrammarState | None]) -> dict[int, Exception]:
        """logits [B, V] (fp32, any device), one row per sampling sequence, in place: rows whose
        grammar is given get -inf where it forbids a token. Returns {row: error} for the rows
        whose grammar allows no token at all (those rows are left unmasked: their requests fail)."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return {}
        import xgrammar as xgr

        if self._bitmask is None:
            self._bitmask = xgr.allocate_token_bitmask(self.max_rows, self.vocab_size)
        bitmask = self._bitmask[:len(grammars)]
        for i in rows:
            grammars[i].matcher.fill_next_token_bitmask(bitmask, i)
        # (the repair is for xgrammar's masks; llguidance's matcher stops at a rejected token, so
        # it cannot be probed with accept_token)
        xgrammar_rows = [i for i in rows if not isinstance(grammars[i].matcher, LLGuidanceMatcher)]
        if xgrammar_rows:
            repair_mask(logits, bitmask, xgrammar_rows, [grammars[i].matcher for i in xgrammar_rows],
                        set(self.stop_ids))
        guard = grammars[rows[0]].guard
        states = torch.tensor([grammars[i].utf8_state for i in rows])
        bitmask[rows] = bitmask[rows] & guard.masks[states]
        allows = (bitmask[rows] != 0).any(dim=1).tolist()
        failed = {i: InvalidInput(f"structured_outputs.{grammars[i].spec.kind}: the grammar allows no token "
                                  "here (nothing the tokenizer can write continues it)")
                  for i, ok in zip(rows, allows) if not ok}
        apply = [i for i in rows if i not in failed]
        if apply:
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                            vocab_size=self.vocab_size, indices=apply)
        return failed

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
