"""Ragged batch metadata built from a step plan."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitfuse.config import SamplingParams
from splitfuse.core.batch import BlockTables, build_batch
from splitfuse.core.request import Sequence, Status
from splitfuse.core.scheduler import PlanItem, StepPlan


def seq(tokens, computed, table, params=None):
    s = Sequence("r", list(tokens), params or SamplingParams(), arrival=0, max_len=100)
    s.num_computed = computed
    s.block_table = list(table)
    return s


def test_mixed_decode_and_prompt_chunk():
    block_size = 4
    decode = seq(range(10, 16), 5, [7, 2])  # 6 tokens, 5 cached: one decode token at position 5
    chunk = seq(range(20, 29), 2, [3, 9, 5])  # 9-token prompt, positions 2..6 run now (not the end)
    plan = StepPlan(step=0, items=[PlanItem(decode, 1, True), PlanItem(chunk, 5, False)])
    meta = build_batch(plan, block_size)
    assert meta.input_ids.tolist() == [15, 22, 23, 24, 25, 26]
    assert meta.positions.tolist() == [5, 2, 3, 4, 5, 6]
    assert meta.query_start.tolist() == [0, 1, 6]
    assert meta.context_lens.tolist() == [6, 7]
    assert meta.token_seq.tolist() == [0, 1, 1, 1, 1, 1]
    # position p lives in block_table[p // 4] at offset p % 4
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0, 9 * 4 + 1, 9 * 4 + 2]
    assert meta.block_tables.tolist() == [[7, 2, 0], [3, 9, 5]]
    assert meta.sample_index.tolist() == [0]  # only the decode samples; the chunk is mid-prompt
    assert (meta.num_tokens, meta.num_seqs, meta.max_query_len, meta.max_context_len) == (6, 2, 5, 7)
    assert not meta.is_decode_only


def reference_batch(plan, block_size):
    """BatchMeta's fields written out token by token, the obvious way."""
    ids, positions, token_seq, slots, query_start, context_lens, samples = [], [], [], [], [0], [], []
    for index, item in enumerate(plan.items):
        s = item.sequence
        for pos in range(s.num_computed, s.num_computed + item.num_tokens):
            ids.append(s.token_ids[pos])
            positions.append(pos)
            token_seq.append(index)
            slots.append(s.block_table[pos // block_size] * block_size + pos % block_size)
        query_start.append(len(ids))
        context_lens.append(s.num_computed + item.num_tokens)
        if item.samples:
            samples.append(len(ids) - 1)
    width = max(len(item.sequence.block_table) for item in plan.items)
    tables = [item.sequence.block_table + [0] * (width - len(item.sequence.block_table)) for item in plan.items]
    return {
        "input_ids": ids, "positions": positions, "query_start": query_start, "context_lens": context_lens,
        "block_tables": tables, "slot_mapping": slots, "token_seq": token_seq, "sample_index": samples,
        "seq_lens": [len(item.sequence.token_ids) for item in plan.items],
        "num_tokens": len(ids), "num_seqs": len(plan.items), "max_query_len": max(query_start[i + 1] - query_start[i]
                                                                                  for i in range(len(plan.items))),
        "max_context_len": max(context_lens), "query_start_host": query_start, "context_lens_host": context_lens,
    }


def assert_matches_reference(meta, plan, block_size):
    expected = reference_batch(plan, block_size)
    dtypes = {"input_ids": torch.int64, "positions": torch.int64, "query_start": torch.int32,
              "context_lens": torch.int32, "block_tables": torch.int32, "slot_mapping": torch.int64,
              "token_seq": torch.int64, "sample_index": torch.int64, "seq_lens": torch.int32}
    for name, value in expected.items():
        got = getattr(meta, name)
        if name in dtypes:
            assert got.dtype == dtypes[name], name
            got = got.tolist()
        assert got == value, name
    assert meta.block_size == block_size
    assert meta.is_decode_only == (expected["max_query_len"] == 1)


@st.composite
def ragged_plans(draw):
    """A plan over 1-8 sequences: decodes, prompt chunks, cached prefixes (num_computed > 0 at a
    prompt's first chunk), some tables longer than the step needs."""
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    items = []
    next_block = draw(st.integers(0, 50))
    for _ in range(draw(st.integers(1, 8))):
        length = draw(st.integers(1, 70))
        computed = draw(st.integers(0, length - 1))
        num_tokens = draw(st.integers(1, length - computed))
        num_blocks = -(-(computed + num_tokens) // block_size) + draw(st.integers(0, 2))
        table = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks + draw(st.integers(0, 3))
        s = seq(draw(st.lists(st.integers(0, 4095), min_size=length, max_size=length)), computed, table,
                SamplingParams(temperature=0.0))  # greedy: no random seed drawn inside the strategy
        items.append(PlanItem(s, num_tokens, computed + num_tokens == length))
    return StepPlan(step=0, items=items), block_size


@settings(max_examples=60, deadline=None)
@given(ragged_plans())
def test_builder_equals_reference_on_random_ragged_batches(case):
    plan, block_size = case
    assert_matches_reference(build_batch(plan, block_size), plan, block_size)


@settings(max_examples=30, deadline=None)
@given(ragged_plans(), st.data())
def test_kept_block_tables_follow_growth_recompute_and_finish(case, data):
    """With one BlockTables over many steps, every step still equals the reference: tables that
    grow, tables replaced by a new list (recompute after preemption), sequences that leave."""
    plan, block_size = case
    tables = BlockTables()
    items = plan.items
    for step in range(6):
        assert_matches_reference(build_batch(StepPlan(step, items), block_size, tables), plan_of(items), block_size)
        kept = []
        for item in items:
            s = item.sequence
            s.num_computed += item.num_tokens
            if s.num_computed == len(s.token_ids):
                s.token_ids.append(7)
            fate = data.draw(st.sampled_from(["decode", "decode", "recompute", "finish", "skip"]))
            if fate == "finish":
                s.status = Status.FINISHED
                continue
            if fate == "recompute":
                s.block_table = [b + 1000 for b in reversed(s.block_table)]  # new list, other blocks
                s.num_computed = data.draw(st.integers(0, len(s.token_ids) - 1))
            while len(s.block_table) * block_size < len(s.token_ids):
                s.block_table.append(2000 + step * 100 + len(s.block_table))
            item = PlanItem(s, len(s.token_ids) - s.num_computed, True)
            if fate != "skip" or not kept:  # a skipped sequence takes its turn later
                kept.append(item)
        if not kept:
            break
        items = kept


def plan_of(items):
    return StepPlan(step=0, items=list(items))


def test_kept_block_tables_over_a_run_of_decodes():
    """The same sequences decoding step after step: tables gain blocks, one is released and given
    a new list (recompute), one is replaced by a new list; every step equals the reference."""
    block_size = 2
    seqs = [seq(range(100 * i, 100 * i + 3 + i), 2 + i, [10 * i + b for b in range(2 + i // 2)]) for i in range(3)]
    tables = BlockTables()
    for step in range(8):
        plan = StepPlan(step, [PlanItem(s, 1, True) for s in seqs])
        assert_matches_reference(build_batch(plan, block_size, tables), plan, block_size)
        for s in seqs:
            s.num_computed += 1
            s.token_ids.append(step)
            if len(s.block_table) * block_size < len(s.token_ids):
                s.block_table.append(50 + 10 * step + len(s.block_table))
        if step == 3:  # as the scheduler recomputes: the old list emptied in place, a new one filled
            seqs[0].block_table.clear()
            seqs[0].block_table = [90 + b for b in range(-(-len(seqs[0].token_ids) // block_size))]
        if step == 5:
            seqs[1].block_table = [b + 500 for b in seqs[1].block_table]
