"""How much of an engine's queue is a real backlog: the requests its scheduler could not admit now."""

from __future__ import annotations

from splitfuse.core.engine import Engine


def backlog(engine: Engine, new_prompts: list[list[int]] = ()) -> int:
    """Waiting requests (then `new_prompts`, queued after them) beyond what free sequence slots and
    free KV blocks would admit now, in the scheduler's order; a burst into an idle engine is none."""
    scheduler, blocks = engine.scheduler, engine.blocks
    seats = scheduler.max_seqs - len(scheduler.running)
    free = blocks.num_free
    lengths = [len(seq.token_ids) for seq in scheduler.waiting] + [len(ids) for ids in new_prompts]
    admitted = 0
    for length in lengths:
        needed = blocks.blocks_for(length)
        if admitted == seats or needed > free:
            break  # the scheduler admits in order: nothing after the first misfit goes in either
        free -= needed
        admitted += 1
    return len(lengths) - admitted


def most_queued(engine: Engine, max_waiting: int) -> int:
    """The largest group that could ever be queued: every slot free, plus the waiting room."""
    return engine.scheduler.max_seqs + max_waiting
