"""Incremental detokenisation with stop strings, for streaming text one token at a time.

Decoding token by token is wrong in two ways: a token may hold only part of a UTF-8
character, and decoders such as SentencePiece's drop the leading space of the first token
they see. So, as vLLM does, each step decodes a short window that starts a few tokens back
(`prefix_offset`) and releases only what lies past the already-released part (`read_offset`).
"""

from __future__ import annotations

import operator
import re
import weakref
from collections.abc import Iterable, Sequence

# Prompt tokens kept as left context, so the first generated token decodes as it would mid-text.
CONTEXT_TOKENS = 5
# Text is held while it ends mid-character; past this many held tokens the held part is released
# up to its last clean split, which bounds each step's window (and cost) on invalid byte streams.
MAX_HELD_TOKENS = 16
_REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class _TokenizerInfo:
    """What the detokenizer needs to know about a tokenizer, computed once per tokenizer."""

    def __init__(self, tokenizer):
        self.size = len(tokenizer)
        # Ids that decode(skip_special_tokens=True) drops: the added tokens marked special.
        added = getattr(tokenizer, "added_tokens_decoder", None)
        if added is not None:
            self.skipped = frozenset(i for i, tok in added.items() if getattr(tok, "special", False))
        else:
            self.skipped = frozenset(getattr(tokenizer, "all_special_ids", ()))
        # SentencePiece byte tokens (<0xE6>) decode as a group: one invalid byte spoils the group.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_fallback = decoder is not None and b'"ByteFallback"' in decoder.__getstate__()
        # No clean-up: it rewrites text across token boundaries (" ." -> "."), which breaks diffs.
        # Fast tokenizers: the Rust decode itself, no Python frame on the two decodes of every token
        # (transformers' wrapper adds only the clean-up pass and costs several times the decode; the
        # Rust skip_special_tokens defaults to True, and add() drops special ids before anyway).
        if backend is not None:
            self.decode = backend.decode
        else:
            self.decode = lambda ids: tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _info(tokenizer) -> _TokenizerInfo:
    try:
        info = _INFO.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        return _TokenizerInfo(tokenizer)
    if info is None or info.size != len(tokenizer):  # added tokens invalidate it
        info = _INFO[tokenizer] = _TokenizerInfo(tokenizer)
    return info


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text pieces, stopping at the first stop string.

    The pieces (plus flush()) join to tokenizer.decode(generated_ids, skip_special_tokens=True),
    except that a leading space the decoder would strip at the start of text is kept, as it
    follows the prompt.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Iterable[str] | str = ()):
        if isinstance(stop, str):
            stop = [stop]
        self.stop: tuple[str, ...] = tuple(stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        self._tokenizer = tokenizer
        self._info = _info(tokenizer)
        self._decode = self._info.decode  # ids -> text, bound once: called twice per token
        self._max_stop = max(map(len, self.stop), default=0)
        self._stop_starts = frozenset(s[0] for s in self.stop)
        self.stop_hit: str | None = None
        self._finished = False
        self._pieces: list[str] = []  # released text
        self._held = ""  # decoded text not yet released: it may be the start of a stop string

        # The window of ids: [prefix_offset, read_offset) is context whose text is accounted
        # for, [read_offset, end) is decoded but not released (it ends mid-character).
        # Special tokens never enter it: decode skips them anyway.
        ids = []
        for i in reversed(prompt_ids):  # the last few non-special prompt tokens
            if len(ids) == CONTEXT_TOKENS:
                break
            if (i := operator.index(i)) not in self._info.skipped:
                ids.append(i)
        ids.reverse()
        # A prompt ending mid-character would glue its bytes onto the first generated tokens;
        # drop that tail so the output decodes as the generated ids alone do.
        while ids and not self._complete(ids, self._decode(ids), ""):
            ids.pop()
        self._ids = ids
        self._prefix_offset = 0
        self._read_offset = len(ids)
        self._prefix_text = self._decode(ids)

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._pieces)

    @property
    def finished(self) -> bool:
        """True once a stop string was hit or flush() was called."""
        return self._finished

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text it releases (often "", never a partial character)."""
        if self.stop_hit is not None:
            return ""  # batched or multi-token steps may run past a stop; those tokens are dropped
        if self._finished:
            raise RuntimeError("add() after flush(): this detokenizer has finished")
        token_id = operator.index(token_id)
        if token_id < 0:
            raise ValueError(f"token ids must be non-negative, got {token_id}")
        if token_id in self._info.skipped:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix_offset :])
        if self._complete(self._ids, text, self._prefix_text):
            return self._release(self._advance(text, len(self._ids)))
        if len(self._ids) - self._read_offset < MAX_HELD_TOKENS:
            return ""
        return self._release(self._force_advance(text))

    def flush(self) -> str:
        """End the stream (length limit, EOS): release everything still held back."""
        if self._finished:
            return ""
        piece = ""
        if len(self._ids) > self._read_offset:
            text = self._decode(self._ids[self._prefix_offset :])
            piece = self._release(self._advance(text, len(self._ids)))
        if self.stop_hit is None and self._held:
            piece += self._held
            self._pieces.append(self._held)
            self._held = ""
        self._finished = True
        return piece

    def _complete(self, ids: list[int], text: str, prefix_text: str) -> bool:
        """Whether `text`, the decode of a window ending with `ids[-1]`, is final past `prefix_text`."""
        if len(text) <= len(prefix_text):
            return False  # nothing new yet; keep the context that decides a leading space
        if text.endswith(_REPLACEMENT):
            return False  # most likely a character whose remaining bytes are still to come
        if self._info.byte_fallback:
            return not _BYTE_TOKEN.fullmatch(self._tokenizer.convert_ids_to_tokens(ids[-1]) or "")
        return True

    def _advance(self, text: str, end: int) -> str:
        """Take the text of ids[prefix_offset:end] past the context; slide the window to `end`."""
        new = text[len(self._prefix_text) :]
        # The released tokens become the context; after a forced release, only the last few.
        self._prefix_offset, self._read_offset = self._read_offset, end
        if end - self._prefix_offset > CONTEXT_TOKENS:
            self._prefix_offset = self._context_start(end)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        # Forget ids left of the window, so memory stays O(window) however long the stream.
        del self._ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return new

    def _context_start(self, end: int) -> int:
        """Start of a short context ending at `end`, on a character boundary where one is seen.

        Starting mid-character would turn a byte-fallback group into "\ufffd" as a whole.
        """
        first = end - CONTEXT_TOKENS
        for start in range(first, end):
            if not self._decode(self._ids[start:end]).startswith(_REPLACEMENT):
                return start
        return first

    def _force_advance(self, text: str) -> str:
        """Too much held back: release up to the last point where decoding splits cleanly.

        If decode(head) + decode(tail) == decode(head + tail), the tail does not continue a
        partial character at the end of head, so head's text is final (its trailing "\ufffd"
        are invalid bytes, not a character still arriving).
        """
        start = self._prefix_offset
        for cut in range(len(self._ids) - 1, self._read_offset, -1):
            head = self._decode(self._ids[start:cut])
            if len(head) <= len(self._prefix_text):
                continue
            if self._info.byte_fallback:
                # A byte group decodes as a whole (all "\ufffd" if any byte is bad), so splits
                # cannot be compared; cut at a whole character, hoping the run stays valid.
                clean = not head.endswith(_REPLACEMENT)
            else:
                tail = self._decode(self._ids[cut:])
                clean = bool(tail) and head + tail == text
            if clean:
                return self._advance(head, cut)
        return self._advance(text, len(self._ids))  # no clean split: invalid bytes, release as is

    def _release(self, new: str) -> str:
        """Apply stop strings to newly decoded text; return the part that is safe to emit."""
        if not new:
            return ""
        if not self.stop:  # nothing to hold back or cut
            self._pieces.append(new)
            return new
        buf = self._held + new
        # Earliest stop occurrence wins; held text never contains a whole stop string.
        hits = [(i, n, s) for n, s in enumerate(self.stop) if (i := buf.find(s)) >= 0]
        if hits:
            idx, _, self.stop_hit = min(hits)
            out, self._held = buf[:idx], ""
            self._finished = True
        else:
            keep = self._stop_prefix_len(buf)
            out, self._held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        if out:
            self._pieces.append(out)
        return out

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        starts = self._stop_starts
        for k in range(min(len(buf), self._max_stop - 1), 0, -1):
            # only a suffix starting with some stop's first character can be a prefix of one
            if buf[-k] in starts and any(s.startswith(buf[-k:]) for s in self.stop):
                return k
        return 0
