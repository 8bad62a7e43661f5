"""KV block manager: which cache blocks are free, which sequence holds which, and which full blocks
hold a known token prefix (prefix caching).

Plain Python bookkeeping; the cache tensors themselves belong to the backend. Ref counts let a
block be shared by every sequence whose prompt starts with the same tokens, and catch double
frees early.

Prefix caching: a full block is named by a chained hash of (the previous block's hash, its token
ids, an extra key such as an adapter id), so equal hashes mean equal K/V. Once a block's K/V are
completely written its hash is registered; a later sequence whose tokens hash the same takes the
block instead of recomputing it. A released block whose hash is known is not forgotten: it joins
an LRU pool of evictable blocks, which count as free and are reused, oldest first, only when no
never-used block is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_key: bytes = b"") -> BlockHash:
    """The hash of one full block: sha256 over the parent's hash, the extra key and the tokens.

    A cryptographic hash, not Python's hash(): a collision would silently give a sequence another
    prompt's K/V, so it must never happen in practice."""
    digest = hashlib.sha256(parent or b"\0" * 32)
    digest.update(len(extra_key).to_bytes(4, "little"))
    digest.update(extra_key)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def hash_blocks(token_ids: Sequence[int], block_size: int, num_blocks: int, known: list[BlockHash],
                extra_key: bytes = b"") -> list[BlockHash]:
    """Extend `known` (the chain's first hashes) to the first num_blocks full blocks of token_ids."""
    for index in range(len(known), num_blocks):
        parent = known[index - 1] if index else None
        known.append(hash_block(parent, token_ids[index * block_size:(index + 1) * block_size], extra_key))
    return known


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Never-used (or forgotten) blocks. Pop from the end: recently freed ones are reused first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts = [0] * num_blocks
        # Prefix cache: hash -> block and back, for full blocks whose K/V are written.
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        # Released blocks with a known hash (ref count 0), least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0  # cached blocks reused for other tokens, since start

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a sequence can get now: never-used ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered prefix, in use or evictable."""
        return len(self._hash_of)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def free_tokens_for(self, block_table: list[int], num_computed: int) -> int:
        """How many more tokens the sequence can take with its own slack plus all free blocks."""
        return len(block_table) * self.block_size - num_computed + self.num_free * self.block_size

    # ---- allocation ------------------------------------------------------------------------
    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Append blocks so block_table holds num_tokens tokens; False (and no change) if too few are free."""
        needed = self.extra_blocks_needed(block_table, num_tokens)
        if needed > self.num_free:
            return False
        for _ in range(needed):
            block = self._take_free_block()
            self._ref_counts[block] = 1
            block_table.append(block)
        return True

    def _take_free_block(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)  # the least recently released cached block
        del self._block_of[self._hash_of.pop(block)]
        self.num_evictions += 1
        return block

    def release(self, block_table: list[int]) -> None:
        """Drop one reference to each block of the table and empty it.

        The table's last blocks are released first, so that under memory pressure a cached prefix
        is evicted from its end: its first blocks, shared by the most prompts, stay longest."""
        for block in reversed(block_table):
            count = self._ref_counts[block]
            if count <= 0:
                raise RuntimeError(f"KV block {block} freed while not in use")
            self._ref_counts[block] = count - 1
            if count == 1:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    # ---- prefix cache ----------------------------------------------------------------------
    def cached_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The blocks holding the longest cached run of a chain's leading hashes (not yet taken)."""
        blocks = []
        if self.enable_caching:
            for block_hash in hashes:
                block = self._block_of.get(block_hash)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def num_evictable_among(self, blocks: Sequence[int]) -> int:
        """How many of these cached blocks are unused now (taking them lowers num_free)."""
        return sum(1 for block in blocks if self._ref_counts[block] == 0)

    def take_cached(self, block_table: list[int], blocks: Sequence[int]) -> None:
        """Append cached blocks (from cached_prefix) to an empty-so-far table, one reference each."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
            block_table.append(block)

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Record that a held block's K/V are now completely written with the tokens of block_hash.

        If another block already holds the same tokens (two sequences computed them at once), the
        first stays the cached one and this block stays private (freed normally)."""
        if not self.enable_caching or block in self._hash_of or block_hash in self._block_of:
            return
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash

    def is_cached(self, block_hash: BlockHash) -> bool:
        return block_hash in self._block_of

    def reset_cache(self) -> int:
        """Forget every cached prefix (e.g. after new weights are loaded); returns blocks forgotten."""
        forgotten = len(self._hash_of)
        for block in self._evictable:
            self._free.append(block)
        self._evictable.clear()
        self._block_of.clear()
        self._hash_of.clear()
        return forgotten
