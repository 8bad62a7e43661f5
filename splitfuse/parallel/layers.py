"""Vocabulary-parallel embedding and logits: each rank holds ceil(V / ranks) rows of the table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitfuse.parallel.shard import Shard


def vocab_embedding(backend, shard: Shard, input_ids: torch.Tensor, weight: torch.Tensor,
                    vocab_size: int) -> torch.Tensor:
    """Embeddings [T, H] of input_ids from every rank's rows: each rank embeds the ids it holds (zero
    for the others), and the all-reduce sums them."""
    if shard.size == 1:
        return backend.embedding(input_ids, weight)
    start, stop = shard.vocab_range(vocab_size)
    local = input_ids - start
    outside = (local < 0) | (local >= stop - start)
    hidden = backend.embedding(local.masked_fill(outside, 0), weight)
    return shard.all_reduce(hidden.masked_fill(outside.unsqueeze(-1), 0))


def vocab_logits(backend, shard: Shard, hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """Logits [N, V] of hidden [N, H] on rank 0, gathered from every rank's vocabulary rows (and
    bias entries); None on the other ranks."""
    logits = backend.linear(hidden, weight, bias)
    if shard.size == 1:
        return logits
    # gather needs equal parts: the last rank's shorter range is padded, and the padding cut off
    logits = F.pad(logits, (0, shard.vocab_part(vocab_size) - logits.shape[-1]))
    gathered = shard.gather_last_dim(logits)
    return None if gathered is None else gathered[:, :vocab_size]
