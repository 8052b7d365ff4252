"""Paged KV-cache accounting: a pool of fixed-size blocks with reference counts, and per-request
block lists. The tensors themselves live in the runner; this module only hands out block ids."""
from __future__ import annotations

from collections import deque


class KVCacheError(RuntimeError):
    """The block accounting broke an invariant (a bug, never user input)."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Another owner now also holds these blocks (n > 1 or prefix reuse)."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise KVCacheError(f"sharing free block {b}")
            self._ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise KVCacheError(f"double free of block {b}")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def check_invariant(self) -> None:
        """free + used == total, and a block is free exactly when nobody references it."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise KVCacheError("a block is on the free list twice")
        for b, rc in enumerate(self._ref_counts):
            if rc < 0 or (rc == 0) != (b in free):
                raise KVCacheError(f"block {b}: ref count {rc}, on free list: {b in free}")


class KVCacheManager:
    """Which blocks each request owns; grows them as the request's tokens grow."""

    def __init__(self, num_blocks: int, block_size: int):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self._blocks: dict[str, list[int]] = {}

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def allocate(self, request_id: str, num_total_tokens: int) -> list[int] | None:
        """Ensure the request holds blocks for num_total_tokens; returns the newly added blocks,
        or None (and changes nothing) when the pool is short."""
        held = self._blocks.setdefault(request_id, [])
        need = self.blocks_for_tokens(num_total_tokens) - len(held)
        if need <= 0:
            return []
        if need > self.pool.num_free:
            if not held:
                del self._blocks[request_id]
            return None
        new = self.pool.allocate(need)
        held.extend(new)
        return new

    def free(self, request_id: str) -> None:
        blocks = self._blocks.pop(request_id, None)
        if blocks:
            self.pool.release(blocks)

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks

    def check_invariant(self) -> None:
        self.pool.check_invariant()
        owned = sum(len(b) for b in self._blocks.values())
        if owned != self.pool.num_used:
            raise KVCacheError(f"requests own {owned} blocks but the pool has {self.pool.num_used} in use")
