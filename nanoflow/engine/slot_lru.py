"""A fixed set of numbered slots (host or disk copies of KV blocks) keyed by their owner, least
recently used first. Free slots are handed out in order, so consecutive puts land in consecutive
slots (fewer, larger copies); when none is free, put() takes the least recently used owner's slot."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable


class SlotLRU:
    def __init__(self, num_slots: int):
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() gives 0, 1, 2, ...
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()

    @property
    def num_used(self) -> int:
        return len(self._slot_of)

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    def get(self, key: Hashable) -> int | None:
        """The key's slot (now the most recently used), or None."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
        return slot

    def victim(self) -> Hashable | None:
        """The key the next put() evicts (None while a slot is free)."""
        return None if self._free else next(iter(self._slot_of))

    def put(self, key: Hashable) -> tuple[int, Hashable | None]:
        """A slot for a new key, and the key it was taken from (LRU eviction) or None."""
        if key in self._slot_of:
            raise KeyError(f"{key!r} already holds slot {self._slot_of[key]}")
        if self._free:
            slot, evicted = self._free.pop(), None
        else:
            evicted, slot = self._slot_of.popitem(last=False)
        self._slot_of[key] = slot
        return slot, evicted

    def forget(self, key: Hashable) -> None:
        """Frees the key's slot (KeyError when it holds none)."""
        self._free.append(self._slot_of.pop(key))

    def items(self) -> Iterable[tuple[Hashable, int]]:
        """(key, slot) pairs, least recently used first (a copy: safe to forget while iterating)."""
        return list(self._slot_of.items())
