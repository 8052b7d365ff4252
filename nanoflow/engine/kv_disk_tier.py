"""Disk tier of the KV cache, behind the host tier (kv_host_tier.py): when the host tier evicts its
least recently used slot and that slot holds a cached full block, the block's bytes are written to a
slot of one preallocated file; a prefix lookup that misses the device and the host but finds the
block there reads it back into a host slot, from where it is loaded to the device as a host hit is
(so its prefill is skipped). Evicting a disk slot forgets the block.

The file: one per engine, `num_slots` fixed-size slots in the host tier's layout (one block across
all layers, raw integer bytes, so bf16 / fp32 / fp8 blocks round-trip exactly), preallocated with
posix_fallocate at start-up (a disk without the space fails then, with the directory named, not in
the middle of a run) and mapped shared (torch.from_file). The slots form their own LRU (SlotLRU),
keyed by the prefix tree's node of the block: the node is this engine's block hash made exact (the
tree path from the root spells the whole token prefix, see prefix_cache.py), and it records its disk
slot in `node.disk_slot` for the lookup. The file is a cache that lives and dies with the engine:
it is deleted at shutdown (and at garbage collection / interpreter exit), with its directory when
that was the default temporary one.

Writes and reads are synchronous memcpys between a host slot and the mapping, on the engine thread,
between steps (when KVCacheManager admits a request or queues a save). Why that is acceptable:
- a block is never read while its write is incomplete: a write is complete when its memcpy returns,
  and the shared mapping is coherent, so every later read sees it (the kernel writes the dirty pages
  back in the background; durability is not needed);
- the work is bounded per step: at most `blocks_per_step` blocks written and as many read
  (DISK_BYTES_PER_STEP each way); past that a host eviction forgets its block (as with no disk tier)
  and a lookup stops before the next disk block (the rest of the prefix is computed);
- the GPU never waits for the disk: only the engine thread does, for memory-speed copies into the
  page cache, or for a real disk read on a page-cache miss (which replaces recomputing the block).
The host slots themselves are filled and drained by asynchronous copies; KVCacheManager orders the
host's accesses against them (a spill skips a slot whose save has not completed; a read waits for the
last copy of the slot it overwrites).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import torch

from nanoflow.engine.kv_host_tier import HostKVTier
from nanoflow.engine.prefix_cache import Node, PrefixHit
from nanoflow.engine.slot_lru import SlotLRU

DISK_BYTES_PER_STEP = 256 << 20
"""Bytes the disk tier writes, and as many it reads, in one engine step at most (256 MiB: 128 blocks
of Llama-3-8B with 16 tokens each)."""


def _preallocate(fd: int, nbytes: int) -> None:
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, nbytes)  # reserves the blocks: ENOSPC now, not SIGBUS mid-run
    else:
        os.ftruncate(fd, nbytes)


def _remove(path: str, directory: str | None) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class DiskKVFile:
    """One preallocated file of fixed-size slots, mapped shared as a [num_slots, *slot_shape] tensor."""

    def __init__(self, slot_shape: tuple[int, ...], dtype: torch.dtype, num_slots: int, directory: str | None):
        """directory: where the file goes (created if missing); None: a new temporary directory under
        the system's temp dir, removed with the file."""
        if num_slots <= 0:
            raise ValueError(f"the disk tier needs at least one slot, got {num_slots}")
        owns = directory is None
        if owns:
            directory = tempfile.mkdtemp(prefix="nanoflow-kv-disk-")
        else:
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                raise ValueError(f"kv_disk_dir {directory!r} cannot be created: {e.strerror or e}") from e
        numel = num_slots * torch.Size(slot_shape).numel()
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        free = shutil.disk_usage(directory).free
        if free < nbytes:
            if owns:
                shutil.rmtree(directory, ignore_errors=True)
            raise ValueError(f"kv_disk_dir {directory!r} has {free / 2**30:.3f} GiB free; the disk tier needs "
                             f"{nbytes / 2**30:.3f} GiB (lower --kv-disk-gb or pick another --kv-disk-dir)")
        path = None
        try:
            fd, path = tempfile.mkstemp(prefix="nanoflow-kv-", suffix=".bin", dir=directory)
            try:
                _preallocate(fd, nbytes)
            finally:
                os.close(fd)
            data = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        except (OSError, RuntimeError) as e:  # not writable, no space, mmap refused
            if path is not None:
                _remove(path, None)
            if owns:
                shutil.rmtree(directory, ignore_errors=True)
            raise ValueError(f"kv_disk_dir {directory!r}: cannot make a {nbytes / 2**30:.3f} GiB KV file "
                             f"there: {getattr(e, 'strerror', None) or e}") from e
        self.path = path
        self.directory = directory
        self.owns_directory = owns
        self.num_slots = num_slots
        self.nbytes = nbytes
        self.data: torch.Tensor | None = data.view(num_slots, *slot_shape)
        self._finalizer = weakref.finalize(self, _remove, path, directory if owns else None)

    def close(self) -> None:
        """Unmaps and deletes the file (and the directory when it was the default temporary one)."""
        self.data = None
        self._finalizer()


class DiskKVTier:
    """The disk slots, their file, and the per-step budget; reads and writes go through host slots."""

    def __init__(self, host: HostKVTier, num_slots: int, directory: str | None = None,
                 bytes_per_step: int = DISK_BYTES_PER_STEP):
        self.host = host
        self.slots = SlotLRU(num_slots)
        self.file = DiskKVFile(tuple(host.buffer.shape[1:]), host.buffer.dtype, num_slots, directory)
        self.num_slots = num_slots
        self.blocks_per_step = max(1, bytes_per_step // host.block_bytes)
        self.writes_left = self.reads_left = self.blocks_per_step
        self.blocks_written = 0
        self.blocks_read = 0

    @staticmethod
    def slots_for_bytes(host: HostKVTier, num_bytes: float) -> int:
        return int(num_bytes // host.block_bytes)

    @property
    def num_used(self) -> int:
        return len(self.slots)

    def new_step(self) -> None:
        self.writes_left = self.reads_left = self.blocks_per_step

    def spill(self, node: Node, host_slot: int, keep: set[Node] | frozenset = frozenset()) -> Node | None:
        """The host tier evicts `node` from `host_slot` (whose bytes are complete): writes them to a
        disk slot, unless the node is on disk already (it is touched), the step's write budget is
        spent, or the slot to reuse holds a node in `keep` (blocks about to be read). Returns the node
        whose disk slot was taken (the caller prunes it from the tree), or None."""
        if node.disk_slot is not None:
            self.slots.get(node)
            return None
        if self.writes_left <= 0 or self.slots.victim() in keep:
            return None
        slot, evicted = self.slots.put(node)
        if evicted is not None:
            evicted.disk_slot = None
        self.file.data[slot].copy_(self.host.buffer[host_slot])
        node.disk_slot = slot
        self.writes_left -= 1
        self.blocks_written += 1
        return evicted

    def read(self, node: Node, host_slot: int) -> None:
        """Copies the node's disk slot into a host slot (which no copy may be using)."""
        self.slots.get(node)  # most recently used
        self.host.buffer[host_slot].copy_(self.file.data[node.disk_slot])
        self.reads_left -= 1
        self.blocks_read += 1

    def within_budget(self, hit: PrefixHit) -> PrefixHit:
        """The hit cut before its first disk block past this step's read budget."""
        left = self.reads_left
        for i, node in enumerate(hit.nodes):
            if node.block is None and node.host_slot is None:
                if left == 0:
                    kept = hit.nodes[:i]
                    on_host = sum(1 for n in kept if n.block is None and n.host_slot is not None)
                    return PrefixHit(kept, num_host=on_host, num_disk=self.reads_left)
                left -= 1
        return hit

    def clear(self) -> None:
        """Forgets every block (reset of the prefix cache)."""
        for node, _ in self.slots.items():
            node.disk_slot = None
            self.slots.forget(node)

    def check(self, nodes: list[Node]) -> str | None:
        """What is wrong between the tree's nodes and the disk slots, or None."""
        on_disk = {id(n): n.disk_slot for n in nodes if n.disk_slot is not None}
        listed = {id(n): s for n, s in self.slots.items()}
        if on_disk != listed:
            return f"{len(on_disk)} nodes on disk, {len(listed)} disk slots listed, or their slots differ"
        if len(set(listed.values())) != len(listed) or len(listed) > self.num_slots:
            return "two nodes share a disk slot"
        return None

    def close(self) -> None:
        self.file.close()
