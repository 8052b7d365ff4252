"""Host-memory tier of the KV cache: copies of KV blocks in (pinned) host memory, so a block evicted
from the device, or one of a finished request, is copied back instead of recomputed.

The copies are a memory-class operation. They run on their own CUDA stream, ordered against the
compute stream by events only (the host never waits):
- a save (device -> host) waits for an event recorded on the compute stream when it is issued, so it
  reads the block after every step already launched has written it; the device block stays held
  until the save's own event has completed (`done`), so nothing overwrites it mid-copy;
- a load (host -> device) also waits for the compute stream (its target block may have been freed by
  a request of the step in flight), and the compute stream waits for the load's event before the
  next step, which reads the block.
Saves and loads share the one copy stream, so a load of a slot always sees the save that filled it.
The pipeline executor does not schedule these copies as ops of a plan yet: they overlap the steps
from their own stream (the brief allowed this; see the report of issue 15).

On CPU the same code runs with plain tensors and the copies are synchronous.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_BLOCKS_PER_COPY = 32
"""Blocks gathered into one device temporary per copy (bounds its memory: 32 blocks of Llama-3-8B
with 16 tokens each are 64 MiB)."""

_RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The same memory as an integer tensor: gathers and scatters exist for every integer dtype
    (float8 lacks some index kernels), and bytes are bytes."""
    return t.view(_RAW_DTYPES[t.element_size()])


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(offset in the list, first slot, length) of each run of consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == s:
            off, first, n = runs[-1]
            runs[-1] = (off, first, n + 1)
        else:
            runs.append((i, s, 1))
    return runs


_PAGE = 4096


def _pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """A host tensor page-locked with cudaHostRegister on page-aligned memory (exact size: torch's
    pinned allocator may round a large request up to a power of two). Falls back to pin_memory=True."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + _PAGE, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % _PAGE
    t = raw[offset:offset + nbytes].view(dtype).view(shape)  # keeps `raw`'s storage alive
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0))
    except Exception:  # no cudart binding in this torch build: torch's own pinned allocator
        err = -1
    if err == 0:
        return t, True
    return torch.empty(shape, dtype=dtype, pin_memory=True), False


@dataclass
class CopyHandle:
    """A save in flight: its event (None when the copy already finished, as on CPU)."""
    event: "torch.cuda.Event | None"

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class HostKVTier:
    """Pinned host slots, each the KV of one block across all layers; copies in both directions."""

    def __init__(self, kv: torch.Tensor, num_slots: int):
        """kv: the device KV cache, [layers, 2, num_blocks, block_size, kv_heads, head_dim]."""
        if kv.dim() != 6 or kv.shape[1] != 2:
            raise ValueError(f"kv must be [layers, 2, blocks, block_size, heads, head_dim], got {tuple(kv.shape)}")
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.device = kv.device
        self.num_slots = num_slots
        self._blocks = _raw(kv).permute(2, 0, 1, 3, 4, 5)  # [num_blocks, layers, 2, bs, heads, dim]
        shape = (num_slots, *self._blocks.shape[1:])
        self._registered = False
        if self.device.type == "cuda":
            self.buffer, self._registered = _pinned_empty(shape, self._blocks.dtype)
            self.pinned_by = "cudaHostRegister" if self._registered else "pin_memory"
            self.stream: torch.cuda.Stream | None = torch.cuda.Stream(self.device)
        else:
            self.buffer = torch.empty(shape, dtype=self._blocks.dtype)
            self.stream = None
            self.pinned_by = None

    @staticmethod
    def slots_for_bytes(kv: torch.Tensor, num_bytes: float) -> int:
        per_block = kv[:, :, 0].numel() * kv.element_size()
        return int(num_bytes // per_block)

    @property
    def synchronous(self) -> bool:
        return self.stream is None

    @property
    def block_bytes(self) -> int:
        return self.buffer[0].numel() * self.buffer.element_size()

    def _index(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long)
        if self.device.type == "cuda":  # pinned, so the copy does not wait for the copy stream
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _after_compute(self) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(event)

    def save(self, blocks: list[int], slots: list[int]) -> CopyHandle:
        """Copies device blocks into host slots; the blocks must stay untouched until the handle is done."""
        if len(blocks) != len(slots):
            raise ValueError("save: one slot per block")
        if self.stream is None:
            self.buffer[torch.tensor(slots, dtype=torch.long)] = self._blocks[torch.tensor(blocks, dtype=torch.long)]
            return CopyHandle(None)
        with torch.cuda.stream(self.stream):
            self._after_compute()
            for lo in range(0, len(blocks), MAX_BLOCKS_PER_COPY):
                chunk = slots[lo:lo + MAX_BLOCKS_PER_COPY]
                data = self._blocks[self._index(blocks[lo:lo + MAX_BLOCKS_PER_COPY])]  # one gather kernel
                for off, first, n in _runs(chunk):
                    self.buffer[first:first + n].copy_(data[off:off + n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return CopyHandle(event)

    def load(self, slots: list[int], blocks: list[int]) -> CopyHandle:
        """Copies host slots into device blocks; the compute stream waits for it before its next step.
        The host must not overwrite the slots until the handle is done."""
        if len(blocks) != len(slots):
            raise ValueError("load: one block per slot")
        if self.stream is None:
            self._blocks[torch.tensor(blocks, dtype=torch.long)] = self.buffer[torch.tensor(slots, dtype=torch.long)]
            return CopyHandle(None)
        with torch.cuda.stream(self.stream):
            self._after_compute()
            for lo in range(0, len(blocks), MAX_BLOCKS_PER_COPY):
                chunk = slots[lo:lo + MAX_BLOCKS_PER_COPY]
                staging = torch.empty((len(chunk), *self.buffer.shape[1:]), dtype=self.buffer.dtype,
                                      device=self.device)
                for off, first, n in _runs(chunk):
                    staging[off:off + n].copy_(self.buffer[first:first + n], non_blocking=True)
                self._blocks[self._index(blocks[lo:lo + MAX_BLOCKS_PER_COPY])] = staging  # one scatter
            event = torch.cuda.Event()
            event.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(event)
        return CopyHandle(event)

    def close(self) -> None:
        """Unregisters the page-locked buffer (the engine calls this when it is torn down)."""
        if self._registered:
            self._registered = False
            self.stream.synchronize()  # no copy may touch the pages once they are unlocked
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the runtime may be gone already
            pass
