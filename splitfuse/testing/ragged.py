"""Hand-built ragged steps over a paged KV cache, for testing attention ops and kernels.

Blocks are shuffled (non-contiguous, out of order) and every cache slot no sequence wrote holds
NaN, so an op that reads another sequence's slot, or a padding slot, poisons its output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splitfuse.core.batch import BatchMeta


@dataclass
class RaggedStep:
    meta: BatchMeta
    num_blocks: int
    slots: list[list[int]]  # cache slot of every context token, per sequence


def ragged_step(specs: list[tuple[int, int]], block_size: int, seed: int = 0, spare_blocks: int = 3) -> RaggedStep:
    """A step whose sequences have (context_len incl. the new tokens, new tokens) from specs;
    the new tokens are the last of each context, as the engine lays them out."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(ctx / block_size) for ctx, _ in specs]
    num_blocks = sum(blocks_per_seq) + spare_blocks  # spare blocks are never read
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, all_slots, positions, slot_mapping, token_seq, query_start = [], [], [], [], [], [0]
    for s, ((ctx, new), nb) in enumerate(zip(specs, blocks_per_seq)):
        table = [order.pop() for _ in range(nb)]
        seq_slots = [table[p // block_size] * block_size + p % block_size for p in range(ctx)]
        tables.append(table)
        all_slots.append(seq_slots)
        positions += range(ctx - new, ctx)
        slot_mapping += seq_slots[ctx - new:]
        token_seq += [s] * new
        query_start.append(query_start[-1] + new)
    width = max(blocks_per_seq)
    context_lens = [ctx for ctx, _ in specs]
    max_query_len = max(new for _, new in specs)
    meta = BatchMeta(
        input_ids=torch.zeros(len(positions), dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        query_start=torch.tensor(query_start, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64),
        token_seq=torch.tensor(token_seq, dtype=torch.int64),
        sample_index=torch.tensor([end - 1 for end in query_start[1:]], dtype=torch.int64),
        num_tokens=len(positions), num_seqs=len(specs), max_query_len=max_query_len,
        max_context_len=max(context_lens), block_size=block_size, is_decode_only=max_query_len == 1,
        query_start_host=query_start, context_lens_host=context_lens,
    )
    return RaggedStep(meta, num_blocks, all_slots)


def filled_cache(step: RaggedStep, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A [2, num_blocks, block_size, Hkv, D] cache holding random K/V for every context token
    (NaN elsewhere), and each sequence's dense K and V [ctx, Hkv, D] for a reference."""
    gen = torch.Generator().manual_seed(seed + 1)
    block_size = step.meta.block_size
    flat = torch.full((2, step.num_blocks * block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    keys, values = [], []
    for seq_slots in step.slots:
        k = torch.randn(len(seq_slots), num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(len(seq_slots), num_kv_heads, head_dim, generator=gen).to(dtype)
        index = torch.tensor(seq_slots)
        flat[0, index], flat[1, index] = k, v
        keys.append(k)
        values.append(v)
    return flat.view(2, step.num_blocks, block_size, num_kv_heads, head_dim), keys, values
