"""StepPlan -> ragged batch metadata: the flat tensors every backend op reads.

Tokens of all scheduled sequences are laid end to end (T tokens, S sequences). Everything is
built on the CPU with plain torch and handed to the backend, which moves it to its device once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from splitfuse.core.scheduler import StepPlan


@dataclass
class BatchMeta:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    query_start: torch.Tensor  # [S+1] int32, cu_seqlens of the new tokens
    context_lens: torch.Tensor  # [S] int32, tokens in the cache after this step (new ones included)
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, block * block_size + offset of each new token's K/V
    token_seq: torch.Tensor  # [T] int64, index of the sequence each token belongs to
    sample_index: torch.Tensor  # [S'] int64, token rows whose logits are sampled this step
    # Host-side sizes, so kernels can be launched without reading tensors back.
    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_context_len: int
    block_size: int
    is_decode_only: bool
    # The same lengths as Python lists, for ops that plan per sequence without a device sync.
    query_start_host: list[int] = field(default_factory=list)
    context_lens_host: list[int] = field(default_factory=list)
    # [S] int32, tokens each sequence holds, prompt + generated, computed or not (Phi-3's longrope
    # picks its frequencies by it)
    seq_lens: torch.Tensor | None = None
    # Per-step scratch that ops build once and reuse in every layer (attention plans, buffers).
    # A BatchMeta describes one step: never edit one in place to reuse it for another.
    step_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def to(self, device: torch.device | str) -> "BatchMeta":
        """The same metadata with every tensor on `device` (non-blocking where it can)."""
        moved = {}
        for f in fields(self):
            if f.name == "step_cache":
                continue  # scratch built for another device
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return BatchMeta(**moved)


def build_batch(plan: StepPlan, block_size: int) -> BatchMeta:
    """Flatten a scheduled step into BatchMeta (CPU tensors).

    Per sequence only list slices are taken in Python; slots come from one vectorised gather
    over the padded block tables, and each tensor is made with a single torch.tensor call."""
    input_ids: list[int] = []
    positions: list[int] = []
    token_seq: list[int] = []
    query_start = [0]
    context_lens: list[int] = []
    sample_index: list[int] = []
    tables: list[list[int]] = []
    max_query_len = 0
    for seq_idx, item in enumerate(plan.items):
        seq = item.sequence
        start = seq.num_computed
        end = start + item.num_tokens
        input_ids += seq.token_ids[start:end]
        positions += range(start, end)
        token_seq += [seq_idx] * item.num_tokens
        query_start.append(len(input_ids))
        context_lens.append(end)
        tables.append(seq.block_table)
        max_query_len = max(max_query_len, item.num_tokens)
        if item.samples:
            sample_index.append(len(input_ids) - 1)
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    positions_t = torch.tensor(positions, dtype=torch.int64)
    token_seq_t = torch.tensor(token_seq, dtype=torch.int64)
    blocks = block_tables[token_seq_t, positions_t // block_size].to(torch.int64)
    return BatchMeta(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=positions_t,
        query_start=torch.tensor(query_start, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=blocks * block_size + positions_t % block_size,
        token_seq=token_seq_t,
        sample_index=torch.tensor(sample_index, dtype=torch.int64),
        num_tokens=len(input_ids),
        num_seqs=len(tables),
        max_query_len=max_query_len,
        max_context_len=max(context_lens),
        block_size=block_size,
        is_decode_only=max_query_len == 1,
        query_start_host=query_start,
        context_lens_host=context_lens,
        seq_lens=torch.tensor([len(item.sequence.token_ids) for item in plan.items], dtype=torch.int32),
    )
