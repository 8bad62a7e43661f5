"""KV block manager: which cache blocks are free and which sequence holds which.

Plain Python bookkeeping; the cache tensors themselves belong to the backend. Ref counts let a
block be shared (forked sequences, prefix reuse) and catch double frees early.
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Pop from the end: recently freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def free_tokens_for(self, block_table: list[int], num_computed: int) -> int:
        """How many more tokens the sequence can take with its own slack plus all free blocks."""
        return len(block_table) * self.block_size - num_computed + self.num_free * self.block_size

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Append blocks so block_table holds num_tokens tokens; False (and no change) if too few are free."""
        needed = self.extra_blocks_needed(block_table, num_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block = self._free.pop()
            self._ref_counts[block] = 1
            block_table.append(block)
        return True

    def release(self, block_table: list[int]) -> None:
        """Drop one reference to each block of the table and empty it."""
        for block in block_table:
            count = self._ref_counts[block]
            if count <= 0:
                raise RuntimeError(f"KV block {block} freed while not in use")
            self._ref_counts[block] = count - 1
            if count == 1:
                self._free.append(block)
        block_table.clear()

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]
