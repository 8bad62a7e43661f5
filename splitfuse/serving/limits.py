"""How much of an engine's queue is a real backlog: the requests its scheduler could not admit now."""

from __future__ import annotations

from collections.abc import Iterable

from splitfuse.core.engine import Engine
from splitfuse.serving.errors import GroupTooLarge, QueueFull


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold num_tokens tokens."""
    return -(-num_tokens // block_size)


def unadmitted(lengths: Iterable[int], seats: int, free_blocks: int, block_size: int) -> int:
    """How many queued prompts (their lengths, in admission order) `seats` free sequence slots and
    `free_blocks` free KV blocks would not admit now."""
    lengths = list(lengths)
    admitted = 0
    for length in lengths:
        needed = blocks_for(length, block_size)
        if admitted >= seats or needed > free_blocks:
            break  # the scheduler admits in order: nothing after the first misfit goes in either
        free_blocks -= needed
        admitted += 1
    return len(lengths) - admitted


def backlog(engine: Engine, new_prompts: list[list[int]] = ()) -> int:
    """Waiting requests (then `new_prompts`, queued after them) beyond what free sequence slots and
    free KV blocks would admit now, in the scheduler's order; a burst into an idle engine is none."""
    scheduler, blocks = engine.scheduler, engine.blocks
    lengths = [len(seq.token_ids) for seq in scheduler.waiting] + [len(ids) for ids in new_prompts]
    return unadmitted(lengths, scheduler.max_seqs - len(scheduler.running), blocks.num_free, blocks.block_size)


def refusal(group_size: int, max_seqs: int, waiting: int, max_waiting: int) -> Exception | None:
    """Why a group of `group_size` requests, which would leave `waiting` requests unadmitted, is turned
    away (None: it is not): larger than ever fits one engine (every slot free plus the waiting room),
    GroupTooLarge; more than max_waiting unadmitted, QueueFull."""
    most = max_seqs + max_waiting
    if group_size > most:
        return GroupTooLarge(f"this request asks for {group_size} completions (prompts x n) but the server "
                             f"queues at most {most} at once; send fewer prompts or a smaller n")
    if waiting > max_waiting:
        return QueueFull(f"{waiting} requests would wait for capacity (max_waiting={max_waiting}); retry later")
    return None
