"""A model-free driver for the Scheduler and BlockManager.

It does what the engine does around a forward pass, minus the model: schedule a step, count the
scheduled tokens as computed, append a token to every sequence whose logits would be sampled and
finish it at its max length. Tests use it to check scheduling properties under load, and
scripts/bench_scheduler.py to time the bookkeeping on its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from splitfuse.config import SamplingParams
from splitfuse.core.kv_blocks import BlockManager
from splitfuse.core.request import Sequence, Status
from splitfuse.core.scheduler import Scheduler, StepPlan


@dataclass(frozen=True)
class RequestSpec:
    prompt_len: int
    max_new_tokens: int
    arrival_step: int = 0  # the step before whose schedule() the request is added
    shared_len: int | None = None  # leading prompt tokens every request shares; None = all of them


@dataclass(frozen=True)
class Abort:
    step: int  # aborted before this step's schedule()
    request: int  # index into the scenario's requests; ignored if that one is done or not yet added


@dataclass(frozen=True)
class Scenario:
    token_budget: int
    max_seqs: int
    block_size: int
    num_blocks: int
    requests: tuple[RequestSpec, ...]
    aborts: tuple[Abort, ...] = ()
    prefix_caching: bool = False


class Stalled(RuntimeError):
    """The simulated engine ran out of its step allowance with requests still unfinished."""


class Simulator:
    """A Scheduler over a BlockManager, stepped with fake sampled tokens."""

    def __init__(self, token_budget: int, max_seqs: int, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = False) -> None:
        self.blocks = BlockManager(num_blocks, block_size, enable_caching=enable_prefix_caching)
        self.scheduler = Scheduler(token_budget, max_seqs, self.blocks)
        self.finished: list[Sequence] = []  # reached max_len, in finishing order
        self.aborted: list[Sequence] = []
        # Every token the simulated sampler produced, per request, in order: what a client has
        # received. A sequence's generated_ids must always equal this, preemptions or not.
        self.sampled: dict[str, list[int]] = {}
        self.num_steps = 0
        self._arrivals = itertools.count()
        # Distinct fake token ids, so a lost or duplicated token cannot go unnoticed.
        self._next_token = itertools.count(1_000_000)

    @classmethod
    def for_scenario(cls, scenario: Scenario) -> "Simulator":
        return cls(scenario.token_budget, scenario.max_seqs, scenario.num_blocks, scenario.block_size,
                   scenario.prefix_caching)

    def add_request(self, prompt_len: int, max_new_tokens: int, request_id: str | None = None,
                    shared_len: int | None = None) -> Sequence:
        """A request whose first shared_len prompt tokens (all by default) are the same for every
        request (0, 1, 2, ...), so they can share cached blocks; the rest are its own."""
        arrival = next(self._arrivals)
        shared = prompt_len if shared_len is None else min(shared_len, prompt_len)
        own = [next(self._next_token) for _ in range(prompt_len - shared)]
        seq = Sequence(
            request_id=request_id if request_id is not None else f"req-{arrival}",
            prompt_ids=list(range(shared)) + own,
            params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
            arrival=arrival,
            max_len=prompt_len + max_new_tokens,
        )
        self.sampled[seq.request_id] = []
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.finish_reason = "abort"
        self.aborted.append(seq)

    def schedule(self) -> StepPlan:
        self.num_steps += 1
        return self.scheduler.schedule()

    def complete(self, plan: StepPlan) -> list[Sequence]:
        """What the engine does after the forward pass (the scheduler's own apply(), with fake
        sampled tokens); returns the sequences that finished."""
        tokens = list(itertools.islice(self._next_token, sum(1 for item in plan.items if item.samples)))
        done = []
        for result in self.scheduler.apply(plan, tokens):
            seq = result.sequence
            self.sampled[seq.request_id].append(result.token)
            if result.finish_reason is not None:
                self.finished.append(seq)
                done.append(seq)
        return done

    def step(self) -> StepPlan:
        plan = self.schedule()
        self.complete(plan)
        return plan

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def run_until_done(self, max_steps: int) -> None:
        for _ in range(max_steps):
            if not self.has_unfinished:
                return
            self.step()
        if self.has_unfinished:
            raise Stalled(f"{self.scheduler.num_unfinished} requests unfinished after {max_steps} steps")


@dataclass
class StepView:
    """One scheduled step as play() shows it: the plan, and the scheduler's state just before."""

    plan: StepPlan
    running_before: list[Sequence]  # in admission order
    waiting_before: list[Sequence]  # in queue order
    uncomputed_before: dict[Sequence, int]  # tokens each of them still had to compute


def play(sim: Simulator, scenario: Scenario, max_steps: int) -> Iterator[StepView]:
    """Run a scenario, yielding each step after schedule() and before the step is completed.

    Requests are added and aborts applied before the schedule() of their step. Raises Stalled if
    requests are still unfinished (or not yet arrived) after max_steps steps.
    """
    seqs: list[Sequence | None] = [None] * len(scenario.requests)
    last_arrival = max((spec.arrival_step for spec in scenario.requests), default=0)
    sched = sim.scheduler
    for step in range(max_steps):
        for i, spec in enumerate(scenario.requests):
            if spec.arrival_step == step:
                seqs[i] = sim.add_request(spec.prompt_len, spec.max_new_tokens, request_id=f"r{i}",
                                          shared_len=spec.shared_len)
        for abort in scenario.aborts:
            seq = seqs[abort.request] if abort.step == step else None
            if seq is not None and seq.status is not Status.FINISHED:
                sim.abort(seq)
        if not sim.has_unfinished:
            if step < last_arrival:
                continue  # an idle engine: nothing to schedule until the next arrival
            return
        running, waiting = list(sched.running), list(sched.waiting)
        uncomputed = {s: s.num_uncomputed for s in running + waiting}
        plan = sim.schedule()
        yield StepView(plan, running, waiting, uncomputed)
        sim.complete(plan)
    if sim.has_unfinished or last_arrival >= max_steps:
        raise Stalled(f"{sim.scheduler.num_unfinished} requests unfinished after {max_steps} steps")


def step_allowance(scenario: Scenario) -> int:
    """A generous bound on the steps a scenario may take; running past it means a livelock.

    Every step computes at least one token, so without preemption the work is done within
    `total` steps of the last arrival; recomputation after preemption adds to that, far less than
    twice over in practice. A livelock never finishes, so any finite allowance catches it.
    """
    total = sum(spec.prompt_len + spec.max_new_tokens for spec in scenario.requests)
    last_arrival = max((spec.arrival_step for spec in scenario.requests), default=0)
    return last_arrival + 1 + 3 * total


def scenarios(max_requests: int = 12, max_prompt: int = 48, max_new: int = 16, max_arrival: int = 12,
              prefix_caching: bool = False):
    """Hypothesis strategy for Scenarios with KV tight enough to force preemption; with
    prefix_caching, requests share prompt prefixes of random lengths.

    num_blocks is at least what the longest request needs (the engine rejects anything longer at
    admission) and at most twice that, so a few requests compete for the cache.
    """
    from hypothesis import strategies as st  # a test dependency; the simulator itself needs none

    @st.composite
    def build(draw):
        block_size = draw(st.integers(1, 16))
        requests = draw(st.lists(
            st.builds(RequestSpec, prompt_len=st.integers(1, max_prompt), max_new_tokens=st.integers(1, max_new),
                      arrival_step=st.integers(0, max_arrival),
                      shared_len=st.integers(0, max_prompt) if prefix_caching else st.none()),
            min_size=1, max_size=max_requests,
        ))
        largest = max(-(-(r.prompt_len + r.max_new_tokens) // block_size) for r in requests)
        num_blocks = draw(st.integers(largest, 2 * largest))
        aborts = draw(st.lists(
            st.builds(Abort, step=st.integers(0, 3 * max_arrival), request=st.integers(0, len(requests) - 1)),
            max_size=3,
        ))
        return Scenario(
            token_budget=draw(st.integers(1, 64)), max_seqs=draw(st.integers(1, 16)), block_size=block_size,
            num_blocks=num_blocks, requests=tuple(requests), aborts=tuple(aborts), prefix_caching=prefix_caching,
        )

    return build()
