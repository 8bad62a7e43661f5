"""Dynamic SplitFuse scheduler: each step is at most `token_budget` tokens, decodes first.

Order of service in a step:
1. one token for every decoding sequence (they take turns when more decode than the budget holds);
2. the next chunk of prompts already being computed, in admission order;
3. waiting requests in arrival order (preempted ones first), while budget, `max_seqs` and KV last.
A prompt that needs several chunks is admitted only when its whole remainder fits in free KV, so
long prompts do not start and then thrash. When a decode needs a block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it is recomputed later.

Prefix caching (when the block manager has it on): a request admitted from the queue takes the
longest run of cached full blocks its tokens hash to, and computes from the first token after
them (always at least its last token, so there are logits to sample). A request whose next block
is being computed right now by a running sequence waits a step instead of computing it again.
After each step `apply` registers the blocks that became full, so later requests can share them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitfuse.core.kv_blocks import BlockHash, BlockManager, hash_blocks
from splitfuse.core.request import Sequence, Status


@dataclass(slots=True)
class PlanItem:
    sequence: Sequence
    num_tokens: int
    samples: bool  # the chunk reaches the sequence's last token, so its logits are sampled


@dataclass(slots=True)
class TokenResult:
    """What applying one sampled token did to its sequence."""

    sequence: Sequence
    token: int
    text: str  # newly released text ("" without a detokenizer)
    finish_reason: str | None  # "stop" | "length" | None while it goes on


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
    def __init__(self, token_budget: int, max_seqs: int, blocks: BlockManager,
                 recompute_kv_at_length: int | None = None) -> None:
        self.token_budget = token_budget
        self.max_seqs = max_seqs
        self.blocks = blocks
        # A model whose cached K/V go stale when a sequence reaches this length (Phi-3's longrope
        # switches frequencies there, and HF recomputes) has such a sequence recomputed.
        self.recompute_kv_at_length = recompute_kv_at_length
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self._step = 0
        self.num_preemptions = 0  # since start, for metrics and tests
        # Prompt tokens at first admission, since start: found in the prefix cache / to compute.
        self.num_cached_prompt_tokens = 0
        self.num_computed_prompt_tokens = 0

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
        in_flight: set[BlockHash] | None = None  # built on first need
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            cached, next_hash = self._cached_prefix(seq)
            if next_hash is not None:
                if in_flight is None:
                    in_flight = self._blocks_being_computed()
                if next_hash in in_flight:
                    break  # a running sequence is computing that block now: share it next step
            num_cached = len(cached) * self.blocks.block_size
            remaining = seq.num_uncomputed - num_cached
            # The whole remainder must fit, also when only its first chunk runs now; cached blocks
            # nobody holds count as free, so taking them uses free blocks too.
            needed = self.blocks.blocks_for(len(seq.token_ids)) - len(cached)
            if needed + self.blocks.num_evictable_among(cached) > self.blocks.num_free:
                break
            chunk = min(remaining, budget)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.blocks.take_cached(seq.block_table, cached)
            seq.num_computed = num_cached
            if seq.num_cached_tokens is None:  # first admission: what the prompt got from the cache
                seq.num_cached_tokens = num_cached
                self.num_cached_prompt_tokens += num_cached
                self.num_computed_prompt_tokens += seq.num_prompt_tokens - num_cached
            self.blocks.grow(seq.block_table, num_cached + chunk)
            plan.items.append(PlanItem(seq, chunk, chunk == remaining))
            budget -= chunk
            if in_flight is not None:
                in_flight.update(seq.block_hashes[len(cached):])

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], BlockHash | None]:
        """(cached blocks for seq's leading full blocks, the hash of its first full block after
        them or None); at least the last token is always left to compute."""
        if not self.blocks.enable_caching or seq.params.prompt_logprobs is not None:
            return [], None  # scoring the prompt needs every position computed (it still fills the cache)
        num_blocks = (len(seq.token_ids) - 1) // self.blocks.block_size
        hashes = hash_blocks(seq.token_ids, self.blocks.block_size, num_blocks, seq.block_hashes)[:num_blocks]
        cached = self.blocks.cached_prefix(hashes)
        return cached, hashes[len(cached)] if len(cached) < num_blocks else None

    def _blocks_being_computed(self) -> set[BlockHash]:
        """Hashes of full blocks running sequences have scheduled but not yet written."""
        size = self.blocks.block_size
        return {h for seq in self.running for h in seq.block_hashes[seq.num_computed // size:]}

    # ---- after the forward pass ------------------------------------------------------------
    def apply(self, plan: StepPlan, tokens: list[int]) -> list[TokenResult]:
        """Apply a step's results: the scheduled tokens are computed (their full blocks join the
        prefix cache), each sampling sequence gets its token (tokens in plan order), finished ones
        leave and free their blocks, and stale ones are queued for recompute."""
        num_sampled = sum(1 for item in plan.items if item.samples)
        if num_sampled != len(tokens):
            raise ValueError(f"the step sampled {num_sampled} sequences but {len(tokens)} tokens were given")
        size, caching, stale_at = self.blocks.block_size, self.blocks.enable_caching, self.recompute_kv_at_length
        results = []
        next_token = iter(tokens).__next__
        for item in plan.items:  # one pass: this runs for every sequence of every step
            seq = item.sequence
            seq.num_computed += item.num_tokens
            if caching and seq.num_computed // size > seq.num_registered_blocks:  # a block filled
                self.register_full_blocks(seq)
            if not item.samples:
                continue
            token = next_token()
            text, reason = seq.append_token(token)
            if reason is not None:
                seq.finish_reason = reason
                self.remove(seq)
            elif stale_at is not None and len(seq.token_ids) == stale_at:
                self.recompute(seq)
            results.append(TokenResult(seq, token, text, reason))
        return results

    def recompute(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first, to be recomputed from its tokens
        (for a model whose cached K/V go stale at some length)."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table = []  # a new list: kept block-table rows (batch.BlockTables) start over
        seq.num_computed = 0
        seq.num_registered_blocks = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make seq's fully computed blocks findable by their token hashes (prefix caching)."""
        if not self.blocks.enable_caching or seq.status is not Status.RUNNING:
            return
        num_full = seq.num_computed // self.blocks.block_size
        if num_full == 0:
            return
        hashes = hash_blocks(seq.token_ids, self.blocks.block_size, num_full, seq.block_hashes)
        for index in range(seq.num_registered_blocks, num_full):
            self.blocks.register(seq.block_table[index], hashes[index])
        seq.num_registered_blocks = num_full

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
