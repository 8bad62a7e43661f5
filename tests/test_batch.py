"""Ragged batch metadata built from a step plan."""

from __future__ import annotations

from splitfuse.config import SamplingParams
from splitfuse.core.batch import build_batch
from splitfuse.core.request import Sequence
from splitfuse.core.scheduler import PlanItem, StepPlan


def seq(tokens, computed, table):
    s = Sequence("r", list(tokens), SamplingParams(), arrival=0, max_len=100)
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
