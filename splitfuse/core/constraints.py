"""Constrained decoding: per sequence a grammar matcher (xgrammar) that says which tokens may come
next; the engine masks those sequences' logits before sampling and advances the matchers after.

A matcher follows its sequence's generated tokens, not the steps: it replays whatever it has not
seen yet, so preemption (recompute keeps the tokens) and a copied sequence both stay in step.
"""

from __future__ import annotations

import json
import os
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from splitfuse.config import SamplingParams, StructuredOutputsParams

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed check
_LOCATION = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s+(Check failed: .*? is false: )?")
_NUM_CACHED_GRAMMARS = 256


class ConstraintError(ValueError):
    """A schema, regex, choice list or grammar that cannot be compiled; the message names the field."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # what is wrong, without the field's name


def _xgrammar():
    try:
        import xgrammar
    except ImportError:  # an optional extra
        raise ConstraintError("structured outputs need xgrammar: pip install 'splitfuse[structured]'") from None
    return xgrammar


def _reason(exc: Exception) -> str:
    return _LOCATION.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def spec_key(spec: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, text) that names a compiled grammar: the cache key."""
    if spec.json_schema is not None:
        text = spec.json_schema if isinstance(spec.json_schema, str) else json.dumps(spec.json_schema)
        return "json", text
    if spec.json_object:
        return "json_object", ""
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.choice is not None:
        return "choice", "root ::= " + " | ".join(_ebnf_literal(c) for c in spec.choice)
    return "grammar", spec.grammar


def _ebnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def validate(spec: StructuredOutputsParams) -> None:
    """Raise ConstraintError naming the field when spec cannot compile (needs no tokenizer)."""
    xgr = _xgrammar()
    kind, text = spec_key(spec)
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(text, any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind in ("choice", "grammar"):
            xgr.Grammar.from_ebnf(text)
    except Exception as exc:  # xgrammar raises RuntimeError for every kind of bad input
        raise ConstraintError(f"structured_outputs.{kind}: {_reason(exc)}", _reason(exc)) from None


class _Matcher:
    """A sequence's matcher and how many of its generated tokens it has accepted."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.num_accepted = 0

    def sync(self, generated: list[int]) -> None:
        if self.num_accepted > len(generated):  # the sequence lost tokens: start over
            self.matcher.reset()
            self.num_accepted = 0
        for token in generated[self.num_accepted:]:
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"token {token} breaks the request's structured_outputs constraint")
            self.num_accepted += 1


class Constraints:
    """The compiled grammars (cached by their text) and the matchers of one engine's sequences."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int], overlap: bool = False) -> None:
        """overlap: compute the masks on worker threads while the forward pass runs; worth it
        where the forward runs on a device, not where it needs the same CPU cores."""
        self.tokenizer = tokenizer
        self.overlap = overlap
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiler = None  # built at the first constrained request: xgrammar is optional
        self._grammars: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Sequence -> _Matcher
        self._lock = threading.Lock()  # admission (front end thread) and steps may compile at once
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._stop_masks: dict[frozenset[int], torch.Tensor] = {}
        self._batch = None  # xgrammar's BatchGrammarMatcher

    # ---- compiling -------------------------------------------------------------------------
    def check(self, params: SamplingParams) -> None:
        """Compile the request's constraint now (cached), so a bad one fails at admission."""
        if params.structured_outputs is not None:
            self.compiled(params.structured_outputs)

    def compiled(self, spec: StructuredOutputsParams):
        key = spec_key(spec)
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                return grammar
            grammar = self._compile(*key)
            self._grammars[key] = grammar
            if len(self._grammars) > _NUM_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
            return grammar

    def _compile(self, kind: str, text: str):
        if self.tokenizer is None:
            raise ConstraintError("structured_outputs needs the model's tokenizer, and this model has none")
        xgr = _xgrammar()
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.eos_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        try:
            if kind == "json":
                return self._compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return self._compiler.compile_regex(text)
            return self._compiler.compile_grammar(text)
        except Exception as exc:
            raise ConstraintError(f"structured_outputs.{kind}: {_reason(exc)}", _reason(exc)) from None

    # ---- one step --------------------------------------------------------------------------
    def begin(self, sampled: list) -> None:
        """Start computing the allowed tokens of the constrained sequences among `sampled` (the
        rows of this step's logits): on a worker thread while the forward pass runs (overlap),
        else now."""
        self._wait()
        rows = [(row, seq) for row, seq in enumerate(sampled) if seq.params.structured_outputs is not None]
        if not rows:
            return
        if not self.overlap:
            self._pending = Future()
            self._pending.set_result(self._fill(rows))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitfuse-grammar")
        self._pending = self._pool.submit(self._fill, rows)

    def mask(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """logits [S', V] with -inf at the tokens the constraints forbid (a copy; unconstrained
        rows are untouched). A row whose grammar may only end gets its stop tokens back even
        before min_new_tokens (batch.suppressed), since nothing else can follow."""
        filled = self._wait()
        if filled is None:
            return logits
        rows, bitmask, must_end = filled
        for row in must_end:
            batch.suppressed[row] = []
        return apply_token_bitmask(logits, rows, bitmask)

    def advance(self, results: Iterable) -> None:
        """Feed each constrained sequence its new token (results: the scheduler's TokenResults)."""
        for result in results:
            seq = result.sequence
            if seq.params.structured_outputs is None:
                continue
            if result.finish_reason is not None:
                self._matchers.pop(seq, None)
            else:
                self._matcher(seq).sync(seq.generated_ids)

    def _wait(self):
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def _matcher(self, seq) -> _Matcher:
        state = self._matchers.get(seq)
        if state is None:
            xgr = _xgrammar()
            compiled = self.compiled(seq.params.structured_outputs)
            stop = sorted(seq.stop_token_ids) or self.eos_token_ids
            state = self._matchers[seq] = _Matcher(xgr.GrammarMatcher(compiled, override_stop_tokens=stop))
        return state

    def _stop_bits(self, stop_ids: frozenset[int]) -> torch.Tensor:
        """A bitmask row [ceil(V/32)] int32 with the bits of stop_ids set (cached per set)."""
        bits = self._stop_masks.get(stop_ids)
        if bits is None:
            words = [0] * ((self.vocab_size + 31) // 32)
            for token in stop_ids:
                if token < self.vocab_size:
                    words[token // 32] |= 1 << (token % 32)
            bits = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
            self._stop_masks[stop_ids] = bits
        return bits

    def _fill(self, rows: list) -> tuple[list[int], torch.Tensor, list[int]]:
        """Bitmask [len(rows), ceil(V/32)] int32 of the rows' allowed tokens, and the rows whose
        only allowed tokens are stop tokens."""
        xgr = _xgrammar()
        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        matchers = []
        for _, seq in rows:
            state = self._matcher(seq)
            state.sync(seq.generated_ids)
            matchers.append(state.matcher)
        if self._batch is None:  # fills the rows in C++, on several threads when overlapping
            threads = min(8, max(1, (os.cpu_count() or 2) // 2)) if self.overlap else 1
            self._batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)
        stops = torch.stack([self._stop_bits(seq.stop_token_ids) for _, seq in rows])
        only_stops = (bitmask & ~stops).eq(0).all(dim=1).tolist()
        return [row for row, _ in rows], bitmask, [row for (row, _), end in zip(rows, only_stops) if end]


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of logits [S', V] whose `rows` keep only the tokens whose bit is set in their row of
    bitmask [len(rows), ceil(V/32)] int32 (bit j of word w: token 32 w + j). CPU logits go
    through xgrammar's C++ loop; on other devices it is torch ops on the logits' device."""
    masked = logits.clone()
    vocab, width = logits.shape[-1], bitmask.shape[1] * 32
    if logits.device.type == "cpu" and _has_xgrammar():
        full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)
        full[rows] = bitmask
        _xgrammar().apply_token_bitmask_inplace(masked, full, vocab_size=min(vocab, width), indices=rows, backend="cpu")
        if vocab > width:  # logits wider than the grammar's vocabulary: the rest is forbidden
            masked[rows, width:] = float("-inf")
        return masked
    device = logits.device
    bits = torch.arange(32, device=device, dtype=torch.int32)
    allowed = ((bitmask.to(device).unsqueeze(-1) >> bits) & 1).bool().flatten(1)
    if width < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - width), value=False)
    index = torch.as_tensor(rows, device=device)
    masked[index] = logits[index].masked_fill(~allowed[:, :vocab], float("-inf"))
    return masked


def _has_xgrammar() -> bool:
    try:
        _xgrammar()
        return True
    except ConstraintError:
        return False
