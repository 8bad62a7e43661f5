"""KV block manager: blocks are never held twice, never leak, and are all free when work is done."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitfuse.core.kv_blocks import BlockManager
from splitfuse.core.request import Status
from splitfuse.testing.sim import Scenario, Simulator, play, scenarios, step_allowance


def assert_blocks_consistent(blocks: BlockManager, tables: list[list[int]]) -> None:
    """Every block is either in exactly one table (ref count 1) or in the free list (ref count 0)."""
    held = [b for table in tables for b in table]
    free = blocks._free  # internal, but the free list itself is what must not overlap the tables
    assert len(held) == len(set(held)), "a KV block is in two block tables (or twice in one)"
    assert len(free) == len(set(free)), "a KV block is twice in the free list"
    assert not set(held) & set(free), "a KV block is both held and free"
    assert sorted(held + free) == list(range(blocks.num_blocks)), "a KV block leaked"
    assert all(blocks.ref_count(b) == 1 for b in held)
    assert all(blocks.ref_count(b) == 0 for b in free)
    assert blocks.num_free + blocks.num_used == blocks.num_blocks


# ---- the block manager on its own ----------------------------------------------------------

# An operation on one of four tables: grow it to hold n tokens, or release it (n is None).
operations = st.lists(st.tuples(st.integers(0, 3), st.one_of(st.none(), st.integers(0, 80))), max_size=40)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 24), block_size=st.integers(1, 16), ops=operations)
def test_grow_and_release_keep_every_block_in_exactly_one_place(num_blocks, block_size, ops):
    blocks = BlockManager(num_blocks, block_size)
    tables: list[list[int]] = [[] for _ in range(4)]
    for which, num_tokens in ops:
        table = tables[which]
        if num_tokens is None:
            blocks.release(table)
            assert table == []
        else:
            before, free_before = list(table), blocks.num_free
            needed = blocks.extra_blocks_needed(table, num_tokens)
            if blocks.grow(table, num_tokens):
                # Existing blocks keep their place (their K/V is in them); new ones are appended.
                assert table[: len(before)] == before
                assert len(table) * block_size >= num_tokens
                assert blocks.num_free == free_before - needed
            else:
                # A failed grow changes nothing, so the scheduler can preempt and try again.
                assert needed > free_before
                assert table == before and blocks.num_free == free_before
        assert_blocks_consistent(blocks, tables)
    for table in tables:
        blocks.release(table)
    assert blocks.num_free == num_blocks


def test_blocks_for_rounds_up_to_whole_blocks():
    blocks = BlockManager(num_blocks=8, block_size=4)
    assert [blocks.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_free_tokens_counts_slack_in_the_last_block_and_free_blocks():
    blocks = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert blocks.grow(table, 5)  # two blocks for 5 tokens: 3 slots of slack in the second
    assert blocks.free_tokens_for(table, num_computed=5) == 3 + 2 * 4


def test_recently_freed_blocks_are_reused_first():
    blocks = BlockManager(num_blocks=8, block_size=2)
    first: list[int] = []
    blocks.grow(first, 4)
    freed = list(first)
    blocks.release(first)
    again: list[int] = []
    blocks.grow(again, 4)
    assert sorted(again) == sorted(freed)


def test_releasing_a_block_twice_is_an_error():
    blocks = BlockManager(num_blocks=2, block_size=4)
    table: list[int] = []
    blocks.grow(table, 4)
    stale = list(table)  # a copy someone kept after the table was released
    blocks.release(table)
    with pytest.raises(RuntimeError, match="freed while not in use"):
        blocks.release(stale)


def test_rejects_an_empty_cache():
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        BlockManager(num_blocks=0, block_size=16)


# ---- the block manager driven by the scheduler -------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_scheduling_never_shares_or_leaks_a_block(scenario: Scenario):
    sim = Simulator.for_scenario(scenario)
    sched = sim.scheduler
    for view in play(sim, scenario, step_allowance(scenario)):
        assert_blocks_consistent(sim.blocks, [seq.block_table for seq in sched.running])
        # Waiting sequences (preempted ones too) hold nothing, so they cannot block others' KV.
        assert all(seq.block_table == [] for seq in sched.waiting)
        assert all(seq.block_table == [] for seq in view.plan.preempted)
        # Nobody keeps blocks once it is done.
        assert all(seq.block_table == [] for seq in sim.finished + sim.aborted)
    # After every request finished or was aborted, the whole cache is free again.
    assert sim.blocks.num_free == scenario.num_blocks
    assert_blocks_consistent(sim.blocks, [])
    assert all(seq.status is Status.FINISHED for seq in sim.finished + sim.aborted)
