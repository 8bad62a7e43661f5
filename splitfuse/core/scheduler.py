"""Dynamic SplitFuse scheduler: each step is at most `token_budget` tokens, decodes first.

Order of service in a step:
1. one token for every decoding sequence (they take turns when more decode than the budget holds);
2. the next chunk of prompts already being computed, in admission order;
3. waiting requests in arrival order (preempted ones first), while budget, `max_seqs` and KV last.
A prompt that needs several chunks is admitted only when its whole remainder fits in free KV, so
long prompts do not start and then thrash. When a decode needs a block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitfuse.core.kv_blocks import BlockManager
from splitfuse.core.request import Sequence, Status


@dataclass
class PlanItem:
    sequence: Sequence
    num_tokens: int
    samples: bool  # the chunk reaches the sequence's last token, so its logits are sampled


@dataclass
class StepPlan:
    step: int
    items: list[PlanItem] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, token_budget: int, max_seqs: int, blocks: BlockManager) -> None:
        self.token_budget = token_budget
        self.max_seqs = max_seqs
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self._step = 0
        self.num_preemptions = 0  # since start, for metrics and tests

    # ---- queue -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status = Status.FINISHED

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan(step=self._step)
        self._step += 1
        while True:
            budget = self._schedule_decodes(plan, self.token_budget)
            budget = self._schedule_prompt_chunks(plan, budget)
            self._admit_waiting(plan, budget)
            if plan.items or not self.running:
                break
            # Every running sequence is mid-prompt and KV is full: let the oldest go on.
            self._preempt(self.running[-1], plan)
        for item in plan.items:
            item.sequence.last_scheduled_step = plan.step
        return plan

    def _schedule_decodes(self, plan: StepPlan, budget: int) -> int:
        decodes = [s for s in self.running if s.num_uncomputed == 1]
        if len(decodes) > budget:
            # Take turns: the sequences that waited longest go first (sort is stable).
            decodes.sort(key=lambda s: s.last_scheduled_step)
        block_size = self.blocks.block_size
        for seq in decodes:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            needs_block = seq.num_computed >= len(seq.block_table) * block_size
            while needs_block and not self.blocks.grow(seq.block_table, seq.num_computed + 1):
                victim = self.running[-1]
                budget += self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                plan.items.append(PlanItem(seq, 1, True))
                budget -= 1
        return budget

    def _schedule_prompt_chunks(self, plan: StepPlan, budget: int) -> int:
        for seq in self.running:
            if budget == 0:
                break
            remaining = seq.num_uncomputed
            if remaining <= 1:
                continue
            fits = self.blocks.free_tokens_for(seq.block_table, seq.num_computed)
            chunk = min(remaining, budget, fits)
            if chunk <= 0:
                continue
            self.blocks.grow(seq.block_table, seq.num_computed + chunk)
            plan.items.append(PlanItem(seq, chunk, chunk == remaining))
            budget -= chunk
        return budget

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            remaining = seq.num_uncomputed
            # The whole remainder must fit, also when only its first chunk runs now.
            if self.blocks.blocks_for(remaining) > self.blocks.num_free:
                break
            chunk = min(remaining, budget)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.blocks.grow(seq.block_table, chunk)
            plan.items.append(PlanItem(seq, chunk, chunk == remaining))
            budget -= chunk

    def recompute(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first, to be recomputed from its tokens
        (for a model whose cached K/V go stale at some length)."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> int:
        """Free seq's blocks and queue it first for recompute; returns tokens it gave back."""
        returned = 0
        for i, item in enumerate(plan.items):
            if item.sequence is seq:
                returned = plan.items.pop(i).num_tokens
                break
        self.recompute(seq)
        plan.preempted.append(seq)
        self.num_preemptions += 1
        return returned
