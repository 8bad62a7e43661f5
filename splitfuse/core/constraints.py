"""Constrained decoding: per sequence a grammar matcher (xgrammar) that says which tokens may come
next; the engine masks those sequences' logits before sampling and advances the matchers after.

A matcher follows its sequence's generated tokens, not the steps: it replays whatever it has not
seen yet, so preemption (recompute keeps the tokens) and a copied sequence both stay in step.
"""

from __future__ import annotations

import json
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

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiler = None  # built at the first constrained request: xgrammar is optional
        self._grammars: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Sequence -> _Matcher
        self._lock = threading.Lock()  # admission (front end thread) and steps may compile at once
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

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
        rows of this step's logits) on a worker thread, while the forward pass runs."""
        self._wait()
        rows = [(row, seq) for row, seq in enumerate(sampled) if seq.params.structured_outputs is not None]
        if not rows:
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

    def _fill(self, rows: list) -> tuple[list[int], torch.Tensor, list[int]]:
        """Bitmask [len(rows), ceil(V/32)] int32 of the rows' allowed tokens, and the rows whose
        only allowed tokens are stop tokens."""
        xgr = _xgrammar()
        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        must_end = []
        for index, (row, seq) in enumerate(rows):
            state = self._matcher(seq)
            state.sync(seq.generated_ids)
            state.matcher.fill_next_token_bitmask(bitmask, index)
            if not _allows_other_than(bitmask[index], seq.stop_token_ids):
                must_end.append(row)
        return [row for row, _ in rows], bitmask, must_end


def _allows_other_than(words: torch.Tensor, stop_ids) -> bool:
    words = words.clone()
    for token in stop_ids:
        if token // 32 < words.shape[0]:
            keep = ~(1 << (token % 32)) & 0xFFFFFFFF  # as a signed int32
            words[token // 32] &= keep - (1 << 32) if keep >= 1 << 31 else keep
    return bool(words.any())


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of logits [S', V] whose `rows` keep only the tokens whose bit is set in their row of
    bitmask [len(rows), ceil(V/32)] int32 (bit j of word w: token 32 w + j); torch ops on the
    logits' device."""
    device, vocab = logits.device, logits.shape[-1]
    words = bitmask.to(device)
    bits = torch.arange(32, device=device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)
    if allowed.shape[1] < vocab:  # logits wider than the grammar's vocabulary: the rest is forbidden
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    index = torch.as_tensor(rows, device=device)
    masked = logits.clone()
    masked[index] = logits[index].masked_fill(~allowed[:, :vocab], float("-inf"))
    return masked
