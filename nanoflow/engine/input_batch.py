"""The persistent input batch: what the model reads each step, kept between steps and updated in place.

The idea of vLLM V1's InputBatch: a running request owns a *slot*, a row of a persistent block table
(one on the host, the truth, and its copy on the device). A step writes only what changed (the rows
of new requests, the blocks appended since the last step, rows freed by finished or preempted
requests), then gathers the batch's rows on the device. The per-step values (token ids, positions,
KV slots, context lengths, query start locations, logits rows) are written into one pinned staging
buffer and reach the device in one copy. Host work per step is O(requests + new blocks), not
O(context length): a decode request crossing no block boundary costs a few list reads.

Staging buffers alternate between two, each guarded by an event of its last copy, so building step
i+1 while step i's copy is still queued never overwrites what that copy reads."""
from __future__ import annotations

import numpy as np
import torch

from nanoflow.forward_batch import ForwardBatch


class InputBatch:
    """Slots of the requests the runner has seen, their block-table rows, and the staging buffers.

    prepare() takes the scheduler's output: its `finished` and `preempted` requests give their
    slots back, requests without a slot get one. A request's blocks come from the KV manager
    (`kv.block_ids`, a list that only grows while the request holds it); a different list object
    (the request was re-admitted) rewrites the row."""

    MIN_SLOTS = 64
    MIN_WIDTH = 16

    def __init__(self, kv, device: torch.device, max_blocks: int | None = None):
        self.kv = kv
        self.block_size = kv.block_size
        self.device = device
        self.max_blocks = max_blocks or kv.pool.num_blocks
        """Most blocks a request can hold: the table's width never grows past it."""
        self._slot_of: dict[object, int] = {}
        self._free: list[int] = []
        self._lists: list[list[int] | None] = []
        """Per slot: the KV manager's block list the row mirrors."""
        self._written: list[int] = []
        """Per slot: entries of the row written (the rest are 0)."""
        self._sample_row = np.zeros(0, dtype=np.int64)
        """Per slot: its row in the previous step's sampled tokens (-1: it did not sample)."""
        self._prev_sampled = np.zeros(0, dtype=np.int64)
        self.host_tables = np.zeros((0, 0), dtype=np.int32)
        self.device_tables = torch.zeros((0, 0), dtype=torch.int32, device=device)
        self._changes: list[tuple[int, int, int]] = []
        """(slot, first column, end column) of host-table entries the device copy lacks."""
        self._stages: list[torch.Tensor | None] = [None, None]
        self._stage_events: list[object] = [None, None]
        self._turn = 0
        self.stats = {"rows_written": 0, "entries_written": 0, "slots_assigned": 0, "prunes": 0}
        """Counters: full rows written, block-table entries written, slots handed out, slot prunes."""
        self._grow(self.MIN_SLOTS, self.MIN_WIDTH)

    # ---- slots and rows -------------------------------------------------------------------------------
    @property
    def num_slots_used(self) -> int:
        return len(self._slot_of)

    def release(self, requests) -> None:
        """Gives the slots of these requests back (finished, aborted or preempted)."""
        for r in requests:
            slot = self._slot_of.pop(r, None)
            if slot is not None:
                self._lists[slot] = None
                self._free.append(slot)

    def _grow(self, slots: int, width: int) -> None:
        old_slots, old_width = self.host_tables.shape
        slots, width = max(slots, old_slots), min(max(width, old_width), self.max_blocks)
        if (slots, width) == (old_slots, old_width):
            return
        host = np.zeros((slots, width), dtype=np.int32)
        host[:old_slots, :old_width] = self.host_tables
        self.host_tables = host
        if self.device.type == "cuda":
            dev = torch.zeros((slots, width), dtype=torch.int32, device=self.device)
            dev[:old_slots, :old_width] = self.device_tables
            self.device_tables = dev
        else:  # the host table is the device table
            self.device_tables = torch.from_numpy(host)
        if slots > old_slots:
            self._lists.extend([None] * (slots - old_slots))
            self._free.extend(range(slots - 1, old_slots - 1, -1))
            self._written.extend([0] * (slots - old_slots))
            self._sample_row = np.concatenate([self._sample_row, np.full(slots - old_slots, -1, dtype=np.int64)])

    def _assign(self, request, live: set) -> int:
        if not self._free:
            if len(self._slot_of) >= 4 * max(len(live), self.MIN_SLOTS):
                # Requests never reported finished (callers building synthetic batches): drop the slots
                # of those not in this step; a request seen again only has its row rewritten.
                self.release([r for r in self._slot_of if r not in live])
                self.stats["prunes"] += 1
            if not self._free:
                self._grow(2 * len(self._lists), 0)
        slot = self._free.pop()
        self._slot_of[request] = slot
        self._sample_row[slot] = -1
        self.stats["slots_assigned"] += 1
        return slot

    def _write_row(self, slot: int, blocks: list[int]) -> None:
        """Mirrors `blocks` into the slot's row (the old owner's tail zeroed)."""
        old = self._written[slot]
        n = len(blocks)
        if n > self.host_tables.shape[1]:
            self._grow(0, max(n, 2 * self.host_tables.shape[1]))
        row = self.host_tables[slot]
        row[:n] = blocks
        if old > n:
            row[n:old] = 0
        self._changes.append((slot, 0, max(n, old)))
        self._written[slot] = n
        self._lists[slot] = blocks
        self.stats["rows_written"] += 1
        self.stats["entries_written"] += max(n, old)

    def _append_blocks(self, slot: int, blocks: list[int]) -> None:
        old, n = self._written[slot], len(blocks)
        if n > self.host_tables.shape[1]:
            self._grow(0, max(n, 2 * self.host_tables.shape[1]))
        self.host_tables[slot, old:n] = blocks[old:]
        self._changes.append((slot, old, n))
        self._written[slot] = n
        self.stats["entries_written"] += n - old

    # ---- one step -------------------------------------------------------------------------------------
    def prepare(self, sched, prev_tokens: torch.Tensor | None = None) -> ForwardBatch:
        """The step's ForwardBatch. A request whose last token is still on the device (a PENDING_TOKEN
        placeholder, async scheduling) takes it from prev_tokens, the tokens the previous prepare()d
        step samples, in its logits row order."""
        self.release(getattr(sched, "finished", ()))
        self.release(sched.preempted)
        scheduled = sched.scheduled
        num_reqs = len(scheduled)
        slot_of, lists, written = self._slot_of, self._lists, self._written
        block_ids = self.kv.block_ids
        live = None
        slots: list[int] = []
        starts: list[int] = []
        ids: list[int] = []
        samples: list[int] = []
        pending: list[int] = []
        chunk_counts: list[int] = []
        for i, (r, n) in enumerate(scheduled):
            slot = slot_of.get(r)
            if slot is None:
                if live is None:
                    live = {q for q, _ in scheduled}
                slot = self._assign(r, live)
            blocks = block_ids(r.request_id)
            if blocks is not lists[slot]:
                self._write_row(slot, blocks)
            elif len(blocks) > written[slot]:
                self._append_blocks(slot, blocks)
            s = r.num_computed_tokens
            slots.append(slot)
            starts.append(s)
            prompt, out = r.prompt_token_ids, r.output_token_ids
            p = len(prompt)
            if n == 1:
                ids.append(prompt[s] if s < p else out[s - p])
            else:
                ids += r.token_slice(s, s + n)
                chunk_counts.append(n)
            if s + n == p + len(out):
                samples.append(i)
                if r.num_pending_tokens:
                    pending.append(i)
        if chunk_counts and len(chunk_counts) != num_reqs - sched.num_decode:
            raise ValueError("scheduled requests must list the single-token ones first (num_decode of them)")
        return self._upload(sched.num_decode, slots, starts, ids, samples, pending, chunk_counts, prev_tokens)

    def _upload(self, num_decode, slots, starts, ids, samples, pending, chunk_counts, prev_tokens) -> ForwardBatch:
        bs = self.block_size
        num_reqs, num_tokens, num_samples = len(slots), len(ids), len(samples)
        slots_a = np.asarray(slots, dtype=np.int64)
        starts_a = np.asarray(starts, dtype=np.int64)
        counts = np.ones(num_reqs, dtype=np.int64)
        if chunk_counts:
            counts[num_reqs - len(chunk_counts):] = chunk_counts
        qsl = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        seq_lens = starts_a + counts
        if chunk_counts:
            row_req = np.repeat(np.arange(num_reqs), counts)
            positions = starts_a[row_req] + (np.arange(num_tokens) - qsl[row_req])
            row_slot = slots_a[row_req]
        else:  # decode only: one row per request
            positions, row_slot = starts_a, slots_a
        slot_mapping = self.host_tables[row_slot, positions // bs].astype(np.int64) * bs + positions % bs
        samples_a = np.asarray(samples, dtype=np.int64)
        logits_indices = qsl[1:][samples_a] - 1
        pend_src = np.zeros(0, dtype=np.int64)
        if pending:
            pend_a = np.asarray(pending, dtype=np.int64)
            pend_src = self._sample_row[slots_a[pend_a]]
            if prev_tokens is None or (pend_src < 0).any():
                raise ValueError("a request's last token is still on the device, but the previous step did "
                                 "not sample it (pass that step's sampled tokens as prev_tokens)")
            pend_rows = qsl[pend_a + 1] - 1
        # This step's sampled rows, for the next step's pending tokens.
        self._sample_row[self._prev_sampled] = -1
        self._prev_sampled = slots_a[samples_a]
        self._sample_row[self._prev_sampled] = np.arange(num_samples)
        written = self._written
        width = max(1, max([written[s] for s in slots])) if num_reqs else 1
        changes, self._changes = self._changes, []
        on_cuda = self.device.type == "cuda"
        ch_slot = ch_col = None
        if on_cuda and changes:
            lens = [b - a for _, a, b in changes]
            ch_slot = np.repeat(np.asarray([c[0] for c in changes], dtype=np.int64), lens)
            starts_c = np.repeat(np.asarray([c[1] for c in changes], dtype=np.int64), lens)
            offsets = np.arange(len(ch_slot)) - np.repeat(np.cumsum(lens) - lens, lens)
            ch_col = starts_c + offsets
        parts = [ids, positions, slot_mapping, logits_indices, slots_a, seq_lens, qsl]
        if pending:
            parts += [pend_rows, pend_src]
        if ch_slot is not None:
            parts += [ch_slot, ch_col, self.host_tables[ch_slot, ch_col]]
        sizes = [len(p) for p in parts]
        dev = self._stage_and_copy(parts, sum(sizes))
        views, o = [], 0
        for n in sizes:
            views.append(dev[o:o + n])
            o += n
        input_ids, positions_t, slot_t, logits_t, slots_t, seq_lens_t, qsl_t = views[:7]
        rest = views[7:]
        if pending:
            rows_t, src_t = rest[:2]
            rest = rest[2:]
            input_ids[rows_t] = prev_tokens[src_t]
        if rest:
            self.device_tables[rest[0], rest[1]] = rest[2].to(torch.int32)
        block_tables = self.device_tables[:, :width].index_select(0, slots_t)
        return ForwardBatch(
            input_ids=input_ids, positions=positions_t, slot_mapping=slot_t, block_tables=block_tables,
            seq_lens=seq_lens_t.to(torch.int32), query_start_loc=qsl_t.to(torch.int32),
            query_start_loc_cpu=qsl.tolist(), num_decode=num_decode, logits_indices=logits_t,
            decode_context_tokens=int(seq_lens[:num_decode].sum()))

    def _stage_and_copy(self, parts: list, total: int) -> torch.Tensor:
        """Writes the parts one after another into a staging buffer; returns them on the device
        (one copy; on CPU a private clone, so a later step's staging never changes this batch)."""
        turn = self._turn
        self._turn ^= 1
        event = self._stage_events[turn]
        if event is not None:
            event.synchronize()  # that buffer's last copy has left it (normally long done)
        stage = self._stages[turn]
        if stage is None or stage.shape[0] < total:
            size = max(total, 2 * (stage.shape[0] if stage is not None else 1024))
            stage = torch.empty(size, dtype=torch.long, pin_memory=self.device.type == "cuda")
            self._stages[turn] = stage
        host = stage.numpy()
        o = 0
        for p in parts:
            host[o:o + len(p)] = p
            o += len(p)
        if self.device.type != "cuda":
            self._stage_events[turn] = None
            return stage[:total].clone()
        dev = stage[:total].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._stage_events[turn] = event
        return dev
