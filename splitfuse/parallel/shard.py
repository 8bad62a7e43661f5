"""A rank's place in the tensor-parallel group and the collectives the model layers call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size` ranks; with size 1 every collective is the identity."""

    rank: int = 0
    size: int = 1

    def split(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's even part of n (n divisible by size)."""
        part = n // self.size
        return self.rank * part, (self.rank + 1) * part

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """[start, stop) of this rank's vocabulary rows: ceil(V / size) each, the last one shorter."""
        part = self.vocab_part(vocab_size)
        return min(vocab_size, self.rank * part), min(vocab_size, (self.rank + 1) * part)

    def vocab_part(self, vocab_size: int) -> int:
        return -(-vocab_size // self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over every rank, in place (row-parallel layers' partial outputs)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x [N, P] joined along the last dimension on rank 0 [N, size * P]; None on others."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None


SINGLE = Shard()
