"""StepPlan -> ragged batch metadata: the flat tensors every backend op reads.

Tokens of all scheduled sequences are laid end to end (T tokens, S sequences). Everything is
built on the CPU with plain torch and handed to the backend, which moves it to its device once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from operator import attrgetter, is_

import numpy as np
import torch

from splitfuse.core.request import Sequence, Status
from splitfuse.core.scheduler import StepPlan


@dataclass
class BatchMeta:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    query_start: torch.Tensor  # [S+1] int32, cu_seqlens of the new tokens
    context_lens: torch.Tensor  # [S] int32, tokens in the cache after this step (new ones included)
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, block * block_size + offset of each new token's K/V
    token_seq: torch.Tensor  # [T] int64, index of the sequence each token belongs to
    sample_index: torch.Tensor  # [S'] int64, token rows whose logits are sampled this step
    # Host-side sizes, so kernels can be launched without reading tensors back.
    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_context_len: int
    block_size: int
    is_decode_only: bool
    # The same lengths as Python lists, for ops that plan per sequence without a device sync.
    query_start_host: list[int] = field(default_factory=list)
    context_lens_host: list[int] = field(default_factory=list)
    # [S] int32, tokens each sequence holds, prompt + generated, computed or not (Phi-3's longrope
    # picks its frequencies by it)
    seq_lens: torch.Tensor | None = None
    # Per-step scratch that ops build once and reuse in every layer (attention plans, buffers).
    # A BatchMeta describes one step: never edit one in place to reuse it for another.
    step_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def to(self, device: torch.device | str) -> "BatchMeta":
        """The same metadata with every tensor on `device` (non-blocking where it can)."""
        moved = {}
        for f in fields(self):
            if f.name == "step_cache":
                continue  # scratch built for another device
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return BatchMeta(**moved)


class BlockTables:
    """Padded block tables kept from step to step, so a running sequence's row only takes the
    blocks appended since it was last built instead of being rebuilt from its list every step.

    A row is tied to the list object `seq.block_table`: blocks may be appended to it, but a table
    that is emptied or changed otherwise must be a new list (the scheduler gives a sequence it
    recomputes a new one), which starts its row over."""

    def __init__(self) -> None:
        self._rows = np.zeros((0, 0), dtype=np.int32)  # [rows, width], zero past each table's end
        self._free_rows: list[int] = []
        # sequence -> [row, the list its row mirrors, how many of its blocks the row holds]
        self._row_of: dict[Sequence, list] = {}
        self._last: tuple | None = None  # (sequences, their tables, lengths, rows) of the last call

    def rows_for(self, sequences: list[Sequence]) -> tuple[np.ndarray, int]:
        """(row of each sequence in `rows`, the longest table's length), rows brought up to date."""
        if len(self._row_of) > len(sequences):
            self._drop_finished()
        block_tables = list(map(_block_table, sequences))
        lengths = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(sequences))
        last = self._last
        if last is not None and sequences == last[0] and all(map(is_, block_tables, last[1])):
            # The same sequences with the same tables as last step (a run of decodes): only the
            # tables that gained a block need copying.
            for i in np.flatnonzero(lengths != last[2]).tolist():
                self._update(sequences[i], block_tables[i], int(lengths[i]), self._row_of[sequences[i]])
            rows = last[3]
        else:
            row_of, row_list = self._row_of, []
            for seq, table, num_blocks in zip(sequences, block_tables, lengths.tolist()):
                entry = row_of.get(seq)
                if entry is None or entry[1] is not table or entry[2] != num_blocks:
                    entry = self._update(seq, table, num_blocks, entry)
                row_list.append(entry[0])
            rows = np.array(row_list, dtype=np.int64)
        self._last = (sequences, block_tables, lengths, rows)
        return rows, int(lengths.max())

    def _update(self, seq: Sequence, table: list[int], num_blocks: int, entry: list | None) -> list:
        """Bring seq's row up to date: copy in the blocks appended since, or all of a new table."""
        if entry is None:
            entry = self._row_of[seq] = [self._take_row(), table, 0]
        elif entry[1] is not table or entry[2] > num_blocks:  # a new table: start the row over
            self._rows[entry[0]] = 0
            entry[1], entry[2] = table, 0
        if num_blocks > self._rows.shape[1]:
            self._widen(num_blocks)
        self._rows[entry[0], entry[2]:num_blocks] = table[entry[2]:]
        entry[2] = num_blocks
        return entry

    def gather(self, rows: np.ndarray, max_blocks: int) -> np.ndarray:
        """[len(rows), max_blocks] int32: the tables of those rows, padded with 0."""
        return self._rows[rows, :max_blocks]

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self._rows.shape[0]
            grown = np.zeros((max(16, 2 * old), self._rows.shape[1]), dtype=np.int32)
            grown[:old] = self._rows
            self._rows = grown
            self._free_rows = list(range(grown.shape[0] - 1, old - 1, -1))
        return self._free_rows.pop()

    def _widen(self, num_blocks: int) -> None:
        wider = np.zeros((self._rows.shape[0], max(num_blocks, 2 * self._rows.shape[1])), dtype=np.int32)
        wider[:, :self._rows.shape[1]] = self._rows
        self._rows = wider

    def _drop_finished(self) -> None:
        finished = [s for s in self._row_of if s.status is Status.FINISHED]
        for seq in finished:
            row = self._row_of.pop(seq)[0]
            self._rows[row] = 0
            self._free_rows.append(row)
        if finished:
            self._last = None  # its rows may have been freed


# Per-item fields read in C through map(), faster than attribute access in a Python loop.
_sequence = attrgetter("sequence")
_num_tokens = attrgetter("num_tokens")
_samples = attrgetter("samples")
_num_computed = attrgetter("num_computed")
_token_ids = attrgetter("token_ids")
_block_table = attrgetter("block_table")


def build_batch(plan: StepPlan, block_size: int, tables: BlockTables | None = None) -> BatchMeta:
    """Flatten a scheduled step into BatchMeta (CPU tensors).

    Python only collects a few numbers and token slices per sequence; positions, slots and offsets
    come from numpy over the ragged lengths. `tables` (kept by the engine across steps) lets block
    tables grow incrementally; without it every table is copied in."""
    items = plan.items
    if not items:
        raise ValueError("plan has no items: build_batch needs at least one scheduled sequence")
    seqs = list(map(_sequence, items))
    counts = list(map(_num_tokens, items))
    starts = list(map(_num_computed, seqs))
    token_lists = list(map(_token_ids, seqs))
    if max(counts) == 1:  # decode-only: one token each, no slices to make
        input_ids = list(map(list.__getitem__, token_lists, starts))
    else:
        input_ids = []
        for tokens, start, count in zip(token_lists, starts, counts):
            input_ids += tokens[start:start + count]
    num_seqs, num_tokens = len(items), len(input_ids)
    start_a = np.array(starts, dtype=np.int64)
    count_a = np.array(counts, dtype=np.int64)
    query_start = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(count_a, out=query_start[1:])
    context_lens = start_a + count_a
    token_seq = np.repeat(np.arange(num_seqs, dtype=np.int64), count_a)
    # a token's position: its index in the batch, less where its sequence's tokens begin, plus its start
    positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(start_a - query_start[:-1], count_a)
    tables = tables if tables is not None else BlockTables()
    rows, max_blocks = tables.rows_for(seqs)
    block_tables = tables.gather(rows, max_blocks)
    slot_mapping = block_tables[token_seq, positions // block_size].astype(np.int64) * block_size \
        + positions % block_size
    max_query_len = max(counts)
    samples = np.fromiter(map(_samples, items), dtype=bool, count=num_seqs)
    query_start_host = query_start.tolist()
    context_lens_host = context_lens.tolist()
    return BatchMeta(
        input_ids=torch.from_numpy(np.array(input_ids, dtype=np.int64)),
        positions=torch.from_numpy(positions),
        query_start=torch.from_numpy(query_start.astype(np.int32)),
        context_lens=torch.from_numpy(context_lens.astype(np.int32)),
        block_tables=torch.from_numpy(block_tables),
        slot_mapping=torch.from_numpy(slot_mapping),
        token_seq=torch.from_numpy(token_seq),
        sample_index=torch.from_numpy(query_start[1:][samples] - 1),
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        max_query_len=max_query_len,
        max_context_len=max(context_lens_host),
        block_size=block_size,
        is_decode_only=max_query_len == 1,
        query_start_host=query_start_host,
        context_lens_host=context_lens_host,
        seq_lens=torch.from_numpy(np.fromiter(map(len, token_lists), dtype=np.int32, count=num_seqs)),
    )
