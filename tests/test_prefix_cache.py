"""Prefix caching in the block manager and scheduler: shared prompt blocks are computed once, never
written while shared, evicted least recently used first, and never leak."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings

from splitfuse.core.kv_blocks import BlockManager, hash_block, hash_blocks
from splitfuse.core.request import Status
from splitfuse.testing.sim import Scenario, Simulator, play, scenarios, step_allowance


def assert_cache_consistent(blocks: BlockManager, tables: list[list[int]]) -> None:
    """Each block is held (ref count = how many tables hold it), never-used, or evictable (cached,
    ref count 0); the prefix index maps hashes and blocks one to one."""
    held = Counter(b for table in tables for b in table)
    free, evictable = blocks._free, list(blocks._evictable)
    assert len(free) == len(set(free)), "a KV block is twice in the free list"
    assert not set(held) & set(free), "a KV block is both held and free"
    assert not set(held) & set(evictable), "a KV block is both held and evictable"
    assert not set(free) & set(evictable)
    assert sorted(list(held) + free + evictable) == list(range(blocks.num_blocks)), "a KV block leaked"
    assert all(blocks.ref_count(b) == n for b, n in held.items())
    assert all(blocks.ref_count(b) == 0 for b in free + evictable)
    assert all(b in blocks._hash_of for b in evictable), "an evictable block has no hash"
    assert {blocks._block_of[h] for h in blocks._hash_of.values()} == set(blocks._hash_of)
    assert blocks.num_free == len(free) + len(evictable)


def computed_table(blocks: BlockManager, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
    """A table holding token_ids whose full blocks are written and registered, and their hashes."""
    table: list[int] = []
    assert blocks.grow(table, len(token_ids))
    chain = hash_blocks(token_ids, blocks.block_size, len(token_ids) // blocks.block_size, [])
    for block, block_hash in zip(table, chain):
        blocks.register(block, block_hash)
    return table, chain


# ---- the block manager on its own ----------------------------------------------------------

def test_block_hashes_chain_over_the_prefix_and_the_extra_key():
    a = hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) == a
    assert hash_block(a, [3, 4]) != hash_block(None, [3, 4]), "a block's hash must depend on its prefix"
    assert hash_block(None, [1, 2], b"adapter-1") != a
    assert hash_blocks([1, 2, 3, 4, 5], 2, 2, []) == [a, hash_block(a, [3, 4])]


def test_a_released_cached_block_is_found_again_and_taken_back():
    blocks = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    table, h = computed_table(blocks, [7, 8, 9, 10])
    first = list(table)
    blocks.release(table)
    assert blocks.num_free == 4 and blocks.num_cached == 2  # evictable blocks count as free
    assert blocks.cached_prefix(h) == first
    again: list[int] = []
    blocks.take_cached(again, blocks.cached_prefix(h))
    assert again == first and [blocks.ref_count(b) for b in again] == [1, 1]
    assert blocks.num_free == 2
    assert_cache_consistent(blocks, [again])


def test_shared_blocks_are_freed_only_by_their_last_holder():
    blocks = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    owner, h = computed_table(blocks, [1, 2])
    sharer: list[int] = []
    blocks.take_cached(sharer, blocks.cached_prefix(h))
    assert blocks.ref_count(owner[0]) == 2
    blocks.release(owner)
    assert blocks.ref_count(sharer[0]) == 1 and blocks.num_free == 3
    assert_cache_consistent(blocks, [sharer])
    blocks.release(sharer)
    assert blocks.num_free == 4
    assert_cache_consistent(blocks, [])


def test_never_used_blocks_go_first_then_cached_ones_least_recently_released_first():
    blocks = BlockManager(num_blocks=4, block_size=1, enable_caching=True)
    old, new = [], []
    blocks.grow(old, 1)
    blocks.grow(new, 1)
    blocks.register(old[0], hash_block(None, [1]))
    blocks.register(new[0], hash_block(None, [2]))
    old_block, new_block = old[0], new[0]
    blocks.release(old)  # released first: the first to be evicted
    blocks.release(new)
    taken: list[int] = []
    blocks.grow(taken, 2)
    assert old_block not in taken and new_block not in taken  # two never-used blocks were left
    blocks.grow(taken, 3)
    assert taken[-1] == old_block and not blocks.is_cached(hash_block(None, [1]))
    assert blocks.is_cached(hash_block(None, [2]))
    assert blocks.num_evictions == 1
    assert_cache_consistent(blocks, [taken])


def test_a_released_prefix_is_evicted_from_its_end():
    """Its first blocks are the ones other prompts share most, so they stay cached longest."""
    blocks = BlockManager(num_blocks=3, block_size=1, enable_caching=True)
    table, chain = computed_table(blocks, [5, 6, 7])
    blocks.release(table)
    other: list[int] = []
    blocks.grow(other, 1)
    assert blocks.cached_prefix(chain) == blocks.cached_prefix(chain[:2])  # the last block went


def test_the_same_tokens_computed_twice_keep_one_cached_block():
    blocks = BlockManager(num_blocks=2, block_size=2, enable_caching=True)
    a, b = [], []
    blocks.grow(a, 2)
    blocks.grow(b, 2)
    h = hash_block(None, [1, 2])
    blocks.register(a[0], h)
    blocks.register(b[0], h)  # a duplicate stays private
    assert blocks.cached_prefix([h]) == [a[0]]
    duplicate = b[0]
    blocks.release(b)
    assert blocks._free == [duplicate] and blocks.num_cached == 1  # freed, not cached
    assert_cache_consistent(blocks, [a])


def test_caching_off_registers_and_finds_nothing():
    blocks = BlockManager(num_blocks=2, block_size=2)
    table: list[int] = []
    blocks.grow(table, 2)
    h = hash_block(None, [1, 2])
    blocks.register(table[0], h)
    assert blocks.cached_prefix([h]) == [] and blocks.num_cached == 0


def test_reset_cache_forgets_every_prefix_and_frees_evictable_blocks():
    blocks = BlockManager(num_blocks=2, block_size=1, enable_caching=True)
    table, _ = computed_table(blocks, [1, 2])
    blocks.release(table)
    assert blocks.reset_cache() == 2
    assert blocks.num_cached == 0 and blocks.num_free == 2
    assert_cache_consistent(blocks, [])


# ---- the scheduler with the cache ----------------------------------------------------------

def run(sim: Simulator) -> None:
    sim.run_until_done(max_steps=500)


def test_a_repeated_prompt_computes_only_what_the_cache_lacks():
    sim = Simulator(token_budget=64, max_seqs=4, num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = sim.add_request(prompt_len=10, max_new_tokens=2)
    run(sim)
    assert first.num_cached_tokens == 0
    second = sim.add_request(prompt_len=10, max_new_tokens=2)
    plan = sim.schedule()
    # 10 tokens = 2 full blocks + 2; both full blocks come from the cache
    assert [(item.sequence, item.num_tokens) for item in plan.items] == [(second, 2)]
    assert second.num_cached_tokens == 8 and second.num_computed == 8
    assert second.block_table[:2] == first_blocks_of(sim, 10)
    sim.complete(plan)
    run(sim)
    assert second.num_generated == 2 and second.status is Status.FINISHED


def first_blocks_of(sim: Simulator, prompt_len: int) -> list[int]:
    chain = hash_blocks(list(range(prompt_len)), sim.blocks.block_size, prompt_len // sim.blocks.block_size, [])
    return sim.blocks.cached_prefix(chain)


def test_an_entirely_cached_prompt_still_computes_its_last_token():
    sim = Simulator(token_budget=64, max_seqs=4, num_blocks=16, block_size=4, enable_prefix_caching=True)
    sim.add_request(prompt_len=8, max_new_tokens=1)
    run(sim)
    again = sim.add_request(prompt_len=8, max_new_tokens=1)
    plan = sim.schedule()
    # both blocks are cached, but the last token's logits are needed: its block is recomputed
    assert [item.num_tokens for item in plan.items] == [4]
    assert again.num_cached_tokens == 4
    assert plan.items[0].samples
    sim.complete(plan)
    assert again.status is Status.FINISHED


def test_requests_sharing_a_new_prefix_in_one_step_compute_it_once():
    sim = Simulator(token_budget=64, max_seqs=8, num_blocks=64, block_size=4, enable_prefix_caching=True)
    seqs = [sim.add_request(prompt_len=20, max_new_tokens=2, shared_len=16) for _ in range(3)]
    plan = sim.schedule()
    assert [item.sequence for item in plan.items] == seqs[:1], "the others wait for the shared blocks"
    sim.complete(plan)
    plan = sim.schedule()
    # the shared 16 tokens (4 blocks) are cached now: each follower computes only its own 4
    followers = [(item.sequence, item.num_tokens) for item in plan.items if item.sequence is not seqs[0]]
    assert followers == [(seqs[1], 4), (seqs[2], 4)]
    assert seqs[1].block_table[:4] == seqs[0].block_table[:4] == seqs[2].block_table[:4]
    run(sim)
    assert [s.num_cached_tokens for s in seqs] == [0, 16, 16]


def test_a_sequence_never_writes_into_a_shared_block():
    sim = Simulator(token_budget=5, max_seqs=8, num_blocks=64, block_size=4, enable_prefix_caching=True)
    for _ in range(4):
        sim.add_request(prompt_len=13, max_new_tokens=6, shared_len=9)
    while sim.has_unfinished:
        plan = sim.schedule()
        assert_writes_are_private(sim.blocks, plan)
        sim.complete(plan)


def assert_writes_are_private(blocks: BlockManager, plan) -> None:
    size = blocks.block_size
    for item in plan.items:
        seq = item.sequence
        for position in range(seq.num_computed, seq.num_computed + item.num_tokens):
            block = seq.block_table[position // size]
            assert blocks.ref_count(block) == 1, "a write into a block another sequence holds"
            assert block not in blocks._hash_of, "a write into a cached block"


def test_preempting_a_sharer_keeps_the_blocks_the_other_holds():
    # 5 blocks of 2: two 4-token prompts sharing 2 tokens need 1 + 1 + 1 blocks, then decode grows
    sim = Simulator(token_budget=16, max_seqs=4, num_blocks=5, block_size=2, enable_prefix_caching=True)
    a = sim.add_request(prompt_len=4, max_new_tokens=6, shared_len=2)
    b = sim.add_request(prompt_len=4, max_new_tokens=6, shared_len=2)
    preempted = []
    while sim.has_unfinished:
        plan = sim.schedule()
        preempted += plan.preempted
        tables = [s.block_table for s in sim.scheduler.running]
        assert_cache_consistent(sim.blocks, tables)
        sim.complete(plan)
    assert preempted, "the scenario should force a preemption"
    assert sim.sampled[a.request_id] == a.generated_ids and sim.sampled[b.request_id] == b.generated_ids
    assert_cache_consistent(sim.blocks, [])


def test_eviction_under_pressure_serves_every_request():
    # A cache too small for the working set: prefixes are evicted and recomputed, nothing is lost.
    sim = Simulator(token_budget=8, max_seqs=4, num_blocks=6, block_size=2, enable_prefix_caching=True)
    seqs = [sim.add_request(prompt_len=7, max_new_tokens=3, shared_len=n) for n in (6, 2, 6, 0, 4)]
    run(sim)
    assert all(s.status is Status.FINISHED and s.num_generated == 3 for s in seqs)
    assert sim.blocks.num_evictions > 0
    assert_cache_consistent(sim.blocks, [])


@settings(max_examples=150, deadline=None)
@given(scenarios(prefix_caching=True))
def test_with_prefix_caching_blocks_are_shared_safely_and_never_leak(scenario: Scenario):
    sim = Simulator.for_scenario(scenario)
    sched = sim.scheduler
    size = scenario.block_size
    for view in play(sim, scenario, step_allowance(scenario)):
        assert_cache_consistent(sim.blocks, [seq.block_table for seq in sched.running])
        assert_writes_are_private(sim.blocks, view.plan)
        assert all(seq.block_table == [] for seq in list(sched.waiting) + sim.finished + sim.aborted)
        # A cached block holds exactly the tokens of every sequence that uses it there.
        for seq in sched.running:
            for index, block in enumerate(seq.block_table[: seq.num_computed // size]):
                if block in sim.blocks._hash_of:
                    chain = hash_blocks(seq.token_ids, size, index + 1, [])
                    assert sim.blocks._hash_of[block] == chain[index]
    for seq in sim.finished:
        assert seq.generated_ids == sim.sampled[seq.request_id]
    # Everything done: every block is unused (free or cached with no holder).
    assert sim.blocks.num_free == scenario.num_blocks
    assert_cache_consistent(sim.blocks, [])


def test_a_mismatched_token_count_is_an_error():
    sim = Simulator(token_budget=8, max_seqs=2, num_blocks=8, block_size=2)
    sim.add_request(prompt_len=3, max_new_tokens=2)
    plan = sim.schedule()
    with pytest.raises(ValueError, match="sampled 1 sequences but 0 tokens"):
        sim.scheduler.apply(plan, [])
