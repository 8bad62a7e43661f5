"""Which slices of a checkpoint tensor a rank loads, by the tensor's split in the weight tables, and
how many attention heads a rank keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitfuse.models.weight_tables import (COLUMN, FUSED_QKV, GATE_UP, GROUPED_QKV, KV_COLUMN, ROW,
                                            STACKED_DOWN, STACKED_GATE_UP, VOCAB)
from splitfuse.parallel.shard import Shard

ALL = slice(None)


@dataclass(frozen=True)
class Slices:
    """This rank's pieces of a checkpoint tensor: each an index into it, joined along `dim` in order
    (one piece for a plain split; several where the checkpoint fuses matrices split apart)."""

    pieces: tuple[tuple[slice, ...], ...]
    dim: int = 0

    def read(self, tensor) -> torch.Tensor:
        """The pieces of `tensor` (a safetensors slice, read piece by piece, or a tensor), joined."""
        parts = [tensor[index] for index in self.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def checkpoint_slice(split: str | None, shape: list[int], shard: Shard, num_kv_heads: int,
                     head_dim: int) -> Slices | None:
    """This rank's slices of a tensor of `shape` split `split`; None: the whole tensor.
    num_kv_heads is the checkpoint's (all ranks'), for the splits by KV head."""
    if split is None or shard.size == 1:
        return None
    if split == VOCAB:
        return _rows(slice(*shard.vocab_range(shape[0])))
    if split == COLUMN:
        return _rows(_even(shard, shape[0], "output features"))
    if split == ROW:
        return Slices(((ALL, _even(shard, shape[1], "input features")),))
    if split == KV_COLUMN:
        return _rows(_kv_rows(shard, 0, num_kv_heads, head_dim))
    if split == FUSED_QKV:
        q, kv = shape[0] - 2 * num_kv_heads * head_dim, num_kv_heads * head_dim
        return Slices(((_even(shard, q, "query features"),), (_kv_rows(shard, q, num_kv_heads, head_dim),),
                       (_kv_rows(shard, q + kv, num_kv_heads, head_dim),)))
    if split == GROUPED_QKV:
        return _grouped_qkv(shard, shape[0], num_kv_heads, head_dim)
    if split == GATE_UP:
        return Slices(_halves(shard, shape[0], ()))
    if split == STACKED_GATE_UP:
        return Slices(_halves(shard, shape[1], (ALL,)), dim=1)
    if split == STACKED_DOWN:
        return Slices(((ALL, ALL, _even(shard, shape[2], "expert input features")),))
    raise ValueError(f"unknown tensor-parallel split {split!r}; expected one of "
                     f"{[COLUMN, KV_COLUMN, ROW, VOCAB, FUSED_QKV, GROUPED_QKV, GATE_UP, STACKED_GATE_UP, STACKED_DOWN]}")


def split_heads(shard: Shard, arch: str, num_heads: int, num_kv_heads: int, **divisible: int) -> tuple[int, int]:
    """(query heads, KV heads) this rank keeps: num_heads / size, and the KV heads they read (one,
    copied on several ranks, where the model has fewer KV heads than ranks). ValueError naming each
    size (`divisible`: config field -> value, e.g. intermediate_size) the rank count does not divide."""
    size = shard.size
    problems = [] if num_heads % size == 0 else [f"num_attention_heads ({num_heads})"]
    problems += [f"{field} ({value})" for field, value in divisible.items() if value % size]
    if num_kv_heads % size and size % num_kv_heads:
        problems.append(f"num_key_value_heads ({num_kv_heads}), or be a multiple of it")
    if problems:
        raise ValueError(f"tensor_parallel_size={size} must divide {' and '.join(problems)} of {arch}")
    return num_heads // size, max(1, num_kv_heads // size)


def _rows(rows: slice) -> Slices:
    return Slices(((rows,),))


def _even(shard: Shard, n: int, what: str, start: int = 0) -> slice:
    if n % shard.size:
        raise ValueError(f"tensor_parallel_size={shard.size} must divide the {n} {what} of a sharded weight")
    begin, end = shard.split(n)
    return slice(start + begin, start + end)


def _kv_rows(shard: Shard, start: int, num_kv_heads: int, head_dim: int) -> slice:
    """Rows of this rank's KV heads in a block of num_kv_heads * head_dim rows beginning at `start`."""
    if num_kv_heads >= shard.size:
        return _even(shard, num_kv_heads * head_dim, "KV features", start)
    head = shard.rank * num_kv_heads // shard.size  # fewer heads than ranks: each rank copies one
    return slice(start + head * head_dim, start + (head + 1) * head_dim)


def _halves(shard: Shard, n: int, before: tuple[slice, ...]) -> tuple[tuple[slice, ...], ...]:
    """This rank's part of each half of n rows (gate, then up) on the dimension after `before`."""
    half = n // 2
    return (*before, _even(shard, half, "gate features")), (*before, _even(shard, half, "up features", half))


def _grouped_qkv(shard: Shard, rows: int, num_kv_heads: int, head_dim: int) -> Slices:
    """Rows grouped per KV head as [its G queries, k, v]: whole groups while there are as many KV
    heads as ranks; else the group of this rank's KV head, its share of the queries and the k, v."""
    if num_kv_heads >= shard.size:
        return _rows(_even(shard, rows, "query_key_value rows"))
    group_rows = rows // num_kv_heads
    queries = group_rows // head_dim - 2
    sharing = shard.size // num_kv_heads  # ranks that read one group
    group, index = divmod(shard.rank, sharing)
    start, mine = group * group_rows, queries // sharing * head_dim
    return Slices(((slice(start + index * mine, start + (index + 1) * mine),),
                   (slice(start + queries * head_dim, start + group_rows),)))
