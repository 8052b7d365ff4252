"""NanoFlow's dense batch: every step has a token budget; running decodes go first, prefill chunks fill
the rest. Prefill and decode are treated alike (a request simply has tokens not yet computed), so a
long prompt spans several steps. Admission is by projected KV use; when blocks run out, the newest
running request is preempted and recomputed later.

With prefix caching, an admitted request starts from its longest cached prefix (its chunked prefill
continues from there), and a waiting request whose next block a running request is computing right
now waits a step for it rather than computing it twice (BatchLLM-style sharing inside one batch)."""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from nanoflow.engine.kv_cache import KVCacheManager
from nanoflow.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    token_budget: int
    """Most tokens (decode + prefill) in one dense batch."""
    max_num_seqs: int
    """Most running requests."""
    kv_admission_ratio: float = 1.0
    """Admit while projected KV blocks of running requests stay under this fraction of the pool."""
    max_deferred: int = 64
    """Most waiting requests passed over in one step because their next block is being computed
    (prefix caching); admission stops there until the next step."""
    kv_admission: str = "reserve"
    """'reserve': admit while every running request could be at its largest (prompt + max_tokens) at
    once. 'peak': also admit while the peak of projected KV use over future steps fits, with each
    decoding request growing one token per step and freeing its blocks when it reaches max_tokens
    (requests that finish early only free sooner)."""


@dataclass
class SchedulerStats:
    """Counters since the engine started."""
    tokens_computed: int = 0
    """Tokens scheduled (prefill and decode; recomputation after preemption included)."""
    prefill_tokens_computed: int = 0
    """Of those, tokens at prompt positions: the prefill work prefix caching saves."""
    num_preemptions: int = 0
    """Requests preempted."""


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    """(request, new tokens this step), single-token requests first."""
    num_decode: int = 0
    """How many leading entries have exactly one new token."""
    preempted: list[Request] = field(default_factory=list)
    """Requests that lost their blocks this step."""
    finished: list[Request] = field(default_factory=list)
    """Requests retired (stopped, length, aborted, failed) since the previous schedule(): the runner
    frees their input-batch rows."""

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


def _arrival(request: Request) -> int:
    return request.arrival


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # by arrival, oldest first (the newest is the preemption victim)
        self._projections: dict[str, int] = {}  # request id -> blocks it may still allocate, running only
        self._projected_blocks = 0  # their sum
        self._to_commit: dict[Request, None] = {}  # running requests with computed, uncommitted blocks
        self._finished: list[Request] = []  # retired since the last schedule(): SchedulerOutput.finished
        self.stats = SchedulerStats()

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def set_kv_admission(self, rule: str) -> None:
        """Switches the admission rule between runs (benchmarks compare them on one engine)."""
        if rule not in ("reserve", "peak"):
            raise ValueError(f"kv_admission must be 'reserve' or 'peak', got {rule!r}")
        if self.has_unfinished():
            raise ValueError("cannot switch the KV admission rule while requests are waiting or running")
        self.config = replace(self.config, kv_admission=rule)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a request (stopped, length or aborted) and free its blocks at once."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self._projected_blocks -= self._projections.pop(request.request_id)
        elif request.status == RequestStatus.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self.kv.release(request)
        request.status = status
        self._finished.append(request)
        if not self.has_unfinished():
            self.kv.flush()  # idle next: start the last host copies now

    def _projection(self, request: Request, num_shared_blocks: int = 0) -> int:
        """Blocks the request may allocate by its end: all it needs minus the cached ones it shares
        (cached blocks are counted once, by the request that computed them)."""
        return self.kv.blocks_for_tokens(request.max_total_tokens) - num_shared_blocks

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._projected_blocks -= self._projections.pop(request.request_id)
        self.kv.release(request, wait_for_tokens=False)  # what it computed stays cached: its recompute may hit
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished=self._finished)
        self._finished = []
        budget = self.config.token_budget
        planned: dict[Request, int] = {}
        self.kv.poll()
        if self._to_commit:  # blocks completed by earlier steps become reusable
            commit = self.kv.commit
            self._to_commit = {r: None for r in self._to_commit
                               if r.status == RequestStatus.RUNNING and not commit(r)}
        # Running requests: single-token ones (decodes) first, then unfinished prefills; oldest first
        # (self.running is kept in arrival order, so one pass instead of a sort).
        running = self.running
        decodes, others = [], []
        for r in running:
            (decodes if r.num_tokens - r.num_computed_tokens == 1 else others).append(r)
        allocate = self.kv.allocate
        for req in decodes + others if others else decodes:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = req.num_tokens - req.num_computed_tokens
            if n > budget:
                n = budget
            if n <= 0:
                continue
            while allocate(req.request_id, req.num_computed_tokens + n) is None:
                victim = running[-1]  # the newest
                budget += planned.pop(victim, 0)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                planned[req] = n
                budget -= n
        self._admit(planned, budget)
        self.kv.flush()  # host copies of blocks released in this step
        caching, bs = self.kv.enable_prefix_caching, self.kv.block_size
        tokens = prefill = 0
        decode_entries, chunks = [], []
        to_commit = self._to_commit
        for req, n in planned.items():
            tokens += n
            start = req.num_computed_tokens
            if n == 1:
                decode_entries.append((req, 1))
            else:
                chunks.append((req, n))
            if start < len(req.prompt_token_ids):
                prefill += min(start + n, len(req.prompt_token_ids)) - start
            if caching and (start + n) // bs > start // bs:  # completes a block: commit it next step
                to_commit[req] = None
        self.stats.tokens_computed += tokens
        self.stats.prefill_tokens_computed += prefill
        out.scheduled = decode_entries + chunks if chunks else decode_entries
        out.num_decode = len(decode_entries)
        return out

    def _admit(self, planned: dict[Request, int], budget: int) -> None:
        """Waiting requests, FIFO, while seats, budget and projected KV allow (passing over those
        that wait for a block being computed)."""
        limit = self.config.kv_admission_ratio * self.kv.pool.num_blocks
        i = deferred = 0
        peak: _PeakProjection | None = None  # built on the first request the reservation rule turns away
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[i]
            if req.num_pending_tokens:  # preempted with a token still on the device: next step
                break
            hit = self.kv.lookup(req)
            if hit.wait:
                deferred += 1
                if deferred > self.config.max_deferred:
                    break
                i += 1
                continue
            shared = sum(1 for node in hit.nodes if node.block is not None)
            projection = self._projection(req, shared)
            cached = hit.num_tokens(self.kv.block_size)
            n = min(req.num_tokens - cached, budget)
            if self.running and self._projected_blocks + projection > limit:
                if self.config.kv_admission != "peak":
                    break
                if peak is None:
                    peak = _PeakProjection(self.running, planned, self.kv.block_size)
                if not peak.fits(req, cached + n, limit):
                    break
            if not self.kv.admit(req, hit, cached + n):
                break
            del self.waiting[i]
            req.num_computed_tokens = cached
            req.status = RequestStatus.RUNNING
            if self.running and req.arrival < self.running[-1].arrival:  # re-admitted after a preemption
                bisect.insort(self.running, req, key=_arrival)
            else:
                self.running.append(req)
            self._projections[req.request_id] = projection
            self._projected_blocks += projection
            planned[req] = n
            budget -= n
            if peak is not None:
                peak.add(req, cached + n)

    def check_invariants(self) -> None:
        """Used by tests: KV accounting and the projection bookkeeping agree."""
        self.kv.check_invariant()
        if any(a.arrival > b.arrival for a, b in zip(self.running, self.running[1:])):
            raise AssertionError("running requests are not in arrival order")
        if set(self._projections) != {r.request_id for r in self.running}:
            raise AssertionError("projections are not those of the running requests")
        expected = sum(self._projections.values())
        if expected != self._projected_blocks:
            raise AssertionError(f"projected blocks {self._projected_blocks} != {expected}")
        for r in self.waiting:
            if self.kv.block_ids(r.request_id):
                raise AssertionError(f"waiting request {r.request_id} holds blocks")


class _PeakProjection:
    """Peak KV blocks of the running requests over future steps (the 'peak' admission rule).

    After this step a decoding request holds `c` tokens and `r = max_total - c` more steps of growth:
    at step t <= r it holds at most ceil((c + t) / block_size) blocks, after r none. A request still in
    prefill counts at its largest for the whole horizon (its chunks may take any number of steps).
    The use is largest just as a request reaches its end, so the peak is the maximum over t = r_k of
    sum over requests with r >= r_k of (c + r_k) / block_size + 1."""

    def __init__(self, running: list, planned: dict, block_size: int):
        self.block_size = block_size
        self.fixed = 0  # blocks of requests in prefill, held to the end
        self.tokens: list[int] = []
        self.steps: list[int] = []
        for r in running:
            self.add(r, r.num_computed_tokens + planned.get(r, 0))

    def add(self, request, tokens_after_step: int) -> None:
        total = request.max_total_tokens
        if tokens_after_step < request.num_tokens:
            self.fixed += -(-total // self.block_size)
        else:
            self.tokens.append(tokens_after_step)
            self.steps.append(max(0, total - tokens_after_step))

    def fits(self, request, tokens_after_step: int, limit: float) -> bool:
        self.add(request, tokens_after_step)
        peak = self._peak()
        self._undo(request, tokens_after_step)
        return peak <= limit

    def _undo(self, request, tokens_after_step: int) -> None:
        if tokens_after_step < request.num_tokens:
            self.fixed -= -(-request.max_total_tokens // self.block_size)
        else:
            self.tokens.pop()
            self.steps.pop()

    def _peak(self) -> float:
        if not self.tokens:
            return float(self.fixed)
        steps = np.asarray(self.steps, dtype=np.float64)
        order = np.argsort(steps, kind="stable")
        steps = steps[order]
        tokens = np.asarray(self.tokens, dtype=np.float64)[order]
        alive = np.arange(len(steps), 0, -1, dtype=np.float64)  # requests with r >= r_k (ties: the first counts all)
        suffix = np.cumsum(tokens[::-1])[::-1]
        return self.fixed + float(((suffix + steps * alive) / self.block_size + alive).max())
