"""Which slice of a checkpoint tensor a rank loads, by the tensor's split in the weight tables."""

from __future__ import annotations

from splitfuse.models.weight_tables import COLUMN, KV_COLUMN, ROW, STACKED_EXPERTS, VOCAB
from splitfuse.parallel.shard import Shard


def checkpoint_slice(split: str | None, shape: list[int], shard: Shard, num_kv_heads: int,
                     head_dim: int) -> tuple[slice, ...] | None:
    """Index of this rank's part of a tensor of `shape` split `split`; None: the whole tensor.
    num_kv_heads is the checkpoint's (all ranks'), for KV_COLUMN."""
    if split is None or shard.size == 1:
        return None
    if split == VOCAB:
        return (slice(*shard.vocab_range(shape[0])),)
    if split == COLUMN:
        return (slice(*_even(shard, shape[0], "output features")),)
    if split == ROW:
        return slice(None), slice(*_even(shard, shape[1], "input features"))
    if split == KV_COLUMN:
        if num_kv_heads >= shard.size:
            return (slice(*_even(shard, shape[0], "KV features")),)
        head = shard.rank * num_kv_heads // shard.size  # fewer heads than ranks: each rank copies one
        return (slice(head * head_dim, (head + 1) * head_dim),)
    if split == STACKED_EXPERTS:
        raise ValueError(f"tensor_parallel_size={shard.size} cannot split experts stacked in one checkpoint tensor "
                         f"{shape}; save the model with one tensor per expert (transformers' save_pretrained does)")
    raise ValueError(f"unknown tensor-parallel split {split!r}; expected one of {[COLUMN, KV_COLUMN, ROW, VOCAB]}")


def _even(shard: Shard, n: int, what: str) -> tuple[int, int]:
    if n % shard.size:
        raise ValueError(f"tensor_parallel_size={shard.size} must divide the {n} {what} of a sharded weight")
    return shard.split(n)
