"""SplitFuse scheduler: step limits, decodes first, chunked prompts, preemption without loss.

Driven without a model by splitfuse.testing.sim: after each schedule() the simulator does what the
engine does after a forward pass (count tokens as computed, append a sampled token, finish).
"""

from __future__ import annotations

import math

from hypothesis import given, settings

from splitfuse.core.request import Status
from splitfuse.testing.sim import Scenario, Simulator, StepView, play, scenarios, step_allowance

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


def decoding_before(view: StepView) -> list:
    """Running sequences with one token left: the decodes the scheduler serves first."""
    return [s for s in view.running_before if view.uncomputed_before[s] == 1]


# ---- properties over random workloads ----------------------------------------------------------

@PROPERTY_SETTINGS
@given(scenarios())
def test_a_step_stays_within_token_budget_and_max_seqs(scenario: Scenario):
    sim = Simulator.for_scenario(scenario)
    for view in play(sim, scenario, step_allowance(scenario)):
        plan = view.plan
        seqs = [item.sequence for item in plan.items]
        assert plan.num_tokens <= scenario.token_budget
        assert len(seqs) <= scenario.max_seqs
        assert len(set(seqs)) == len(seqs), "a sequence appears twice in one step"
        assert all(item.num_tokens >= 1 for item in plan.items)


@PROPERTY_SETTINGS
@given(scenarios())
def test_scheduled_tokens_exist_and_have_kv_reserved(scenario: Scenario):
    sim = Simulator.for_scenario(scenario)
    for view in play(sim, scenario, step_allowance(scenario)):
        for item in view.plan.items:
            seq = item.sequence
            end = seq.num_computed + item.num_tokens
            assert seq.status is Status.RUNNING
            assert end <= len(seq.token_ids), "scheduled tokens that do not exist yet"
            # Logits are sampled exactly when the chunk reaches the last known token.
            assert item.samples == (end == len(seq.token_ids))
            assert len(seq.block_table) * scenario.block_size >= end, "no KV slot for a scheduled token"


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_request_finishes_with_all_its_tokens(scenario: Scenario):
    sim = Simulator.for_scenario(scenario)
    # play() raises Stalled past the step allowance (a livelock); an empty step with work left
    # would be a deadlock, since nothing changes until the next step.
    for view in play(sim, scenario, step_allowance(scenario)):
        assert view.plan, "nothing scheduled although requests are waiting or running"
    assert len(sim.finished) + len(sim.aborted) == len(scenario.requests)
    for seq in sim.finished:
        assert len(seq.token_ids) == seq.max_len
    # Preemption recomputes the KV but keeps the tokens: each request holds exactly what was
    # sampled for it, in order, after its untouched prompt.
    for seq in sim.finished + sim.aborted:
        assert seq.token_ids[: seq.num_prompt_tokens] == seq.prompt_ids
        assert seq.generated_ids == sim.sampled[seq.request_id]


@PROPERTY_SETTINGS
@given(scenarios())
def test_prompt_chunks_never_displace_decodes(scenario: Scenario):
    sim = Simulator.for_scenario(scenario)
    budget = scenario.token_budget
    for view in play(sim, scenario, step_allowance(scenario)):
        plan = view.plan
        decoding = decoding_before(view)
        preempted = set(plan.preempted)
        served = {item.sequence for item in plan.items} | preempted
        decode_items = [i for i in plan.items if i.sequence in decoding and i.sequence not in preempted]
        prompt_items = [i for i in plan.items if i.sequence not in decoding]
        if prompt_items or len(decoding) <= budget:
            assert all(seq in served for seq in decoding), "a decode was skipped"
        # When decodes outnumber the budget they fill it (taking turns) and no prompt runs.
        live_decodes = [s for s in decoding if s not in preempted]
        assert len(decode_items) == min(budget, len(live_decodes))
        if len(live_decodes) > budget:
            assert not prompt_items


@PROPERTY_SETTINGS
@given(scenarios())
def test_admission_is_fifo_and_preemption_takes_the_newest(scenario: Scenario):
    sim = Simulator.for_scenario(scenario)
    sched = sim.scheduler
    for view in play(sim, scenario, step_allowance(scenario)):
        plan, running = view.plan, view.running_before
        # The most recently admitted sequences are preempted, newest first ...
        k = len(plan.preempted)
        assert plan.preempted == running[::-1][:k]
        # ... and queue in front of everyone who was waiting, in their original order.
        queue = running[len(running) - k:] + view.waiting_before
        admitted = [item.sequence for item in plan.items if item.sequence not in running[: len(running) - k]]
        assert admitted == queue[: len(admitted)], "a request was admitted out of turn"
        assert list(sched.waiting) == queue[len(admitted):]
        assert sched.running == running[: len(running) - k] + admitted


@PROPERTY_SETTINGS
@given(scenarios())
def test_a_multi_chunk_prompt_starts_only_when_all_of_it_fits_in_kv(scenario: Scenario):
    sim = Simulator.for_scenario(scenario)
    blocks = sim.blocks
    for view in play(sim, scenario, step_allowance(scenario)):
        for item in view.plan.items:
            seq = item.sequence
            if seq in view.running_before or item.num_tokens == seq.num_uncomputed:
                continue
            # Admission comes last in a step and a partial first chunk uses the whole remaining
            # budget, so the free blocks now are what was free at admission minus this chunk's.
            assert blocks.blocks_for(seq.num_uncomputed) <= len(seq.block_table) + blocks.num_free


# ---- behaviour a user sees -----------------------------------------------------------------

def test_a_long_prompt_is_split_into_budget_sized_chunks():
    sim = Simulator(token_budget=8, max_seqs=4, num_blocks=16, block_size=4)
    seq = sim.add_request(prompt_len=20, max_new_tokens=3)
    steps = [[(item.num_tokens, item.samples) for item in sim.step().items] for _ in range(4)]
    # Only the chunk that ends the prompt is sampled; then one token per step.
    assert steps == [[(8, False)], [(8, False)], [(4, True)], [(1, True)]]
    assert seq.num_generated == 2


def test_decodes_go_first_and_prompt_chunks_fill_the_rest_of_the_budget():
    sim = Simulator(token_budget=8, max_seqs=4, num_blocks=32, block_size=4)
    a = sim.add_request(prompt_len=1, max_new_tokens=10)
    b = sim.add_request(prompt_len=1, max_new_tokens=10)
    sim.step()  # both prompts in one step; both now decode
    long = sim.add_request(prompt_len=20, max_new_tokens=2)
    steps = [[(item.sequence, item.num_tokens) for item in sim.step().items] for _ in range(4)]
    assert steps == [
        [(a, 1), (b, 1), (long, 6)],
        [(a, 1), (b, 1), (long, 6)],
        [(a, 1), (b, 1), (long, 6)],
        [(a, 1), (b, 1), (long, 2)],  # the last chunk; `long` is sampled and decodes from here on
    ]
    assert long.num_generated == 1


def test_more_decodes_than_the_budget_take_turns():
    # With a fixed budget decodes never outnumber it (every new decode was scheduled in the step
    # before), so admit five one-token prompts at once and then lower the budget to two.
    sim = Simulator(token_budget=8, max_seqs=8, num_blocks=32, block_size=4)
    seqs = [sim.add_request(prompt_len=1, max_new_tokens=20) for _ in range(5)]
    sim.step()
    sim.scheduler.token_budget = 2
    bound = math.ceil(len(seqs) / 2)
    last_served = {s: 0 for s in seqs}
    for step in range(1, 13):
        plan = sim.step()
        assert plan.num_tokens == 2
        for item in plan.items:
            last_served[item.sequence] = step
        # Nobody waits more than ceil(5 / 2) = 3 steps for its next token.
        assert all(step - served < bound for served in last_served.values())
    # So in 12 steps each got at least 12 / 3 decode tokens besides the one its prompt produced.
    assert all(s.num_generated >= 1 + 12 // bound for s in seqs)
    assert sum(s.num_generated for s in seqs) == 5 + 12 * 2


def test_preemption_recomputes_the_newest_request_and_loses_no_tokens():
    # 4 blocks of 2 tokens; each request grows to 6 tokens, so two cannot both finish in KV.
    sim = Simulator(token_budget=8, max_seqs=4, num_blocks=4, block_size=2)
    old = sim.add_request(prompt_len=2, max_new_tokens=4)
    new = sim.add_request(prompt_len=2, max_new_tokens=4)
    sim.step()
    late = sim.add_request(prompt_len=1, max_new_tokens=1)  # no KV left for it
    sim.step()
    sim.step()
    assert new.num_generated == 3 and sim.blocks.num_free == 0

    plan = sim.step()  # `old` needs a fifth block: `new`, admitted last, gives its blocks back
    assert plan.preempted == [new]
    assert [item.sequence for item in plan.items] == [old]
    assert new.status is Status.WAITING and new.block_table == [] and new.num_computed == 0
    assert list(sim.scheduler.waiting) == [new, late]  # back at the front, ahead of `late`
    assert new.num_generated == 3  # its tokens stay; only their KV is recomputed

    sim.run_until_done(max_steps=10)
    assert [s.request_id for s in sim.finished] == [old.request_id, new.request_id, late.request_id]
    assert len(new.token_ids) == new.max_len == 6
    assert new.generated_ids == sim.sampled[new.request_id]
    assert sim.blocks.num_free == 4


def test_a_multi_chunk_prompt_waits_until_its_whole_remainder_fits():
    sim = Simulator(token_budget=4, max_seqs=4, num_blocks=6, block_size=2)
    busy = sim.add_request(prompt_len=4, max_new_tokens=3)  # 3 blocks by the time it finishes
    sim.step()
    big = sim.add_request(prompt_len=10, max_new_tokens=1)  # 5 blocks; only 4 are free
    for _ in range(2):  # busy's last two tokens
        plan = sim.step()
        assert [item.sequence for item in plan.items] == [busy], "started a prompt that could thrash"
    assert busy.is_finished and big.status is Status.WAITING
    chunks = [sim.step().items[0].num_tokens for _ in range(3)]
    assert chunks == [4, 4, 2] and big.is_finished


def test_admission_stops_at_max_seqs():
    sim = Simulator(token_budget=64, max_seqs=2, num_blocks=64, block_size=4)
    seqs = [sim.add_request(prompt_len=3, max_new_tokens=2) for _ in range(3)]
    plan = sim.step()
    assert [item.sequence for item in plan.items] == seqs[:2]
    assert list(sim.scheduler.waiting) == seqs[2:]
