"""NanoFlow's dense batch: every step has a token budget; running decodes go first, prefill chunks fill
the rest. Prefill and decode are treated alike (a request simply has tokens not yet computed), so a
long prompt spans several steps. Admission is by projected KV use; when blocks run out, the newest
running request is preempted and recomputed later."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    """(request, new tokens this step), single-token requests first."""
    num_decode: int = 0
    """How many leading entries have exactly one new token."""
    preempted: list[Request] = field(default_factory=list)
    """Requests that lost their blocks this step."""

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: oldest first
        self._projected_blocks = 0  # sum of blocks_for_tokens(max_total_tokens) over running

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a request (stopped, length or aborted) and free its blocks at once."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self._projected_blocks -= self._projection(request)
        elif request.status == RequestStatus.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        request.status = status

    def _projection(self, request: Request) -> int:
        return self.kv.blocks_for_tokens(request.max_total_tokens)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._projected_blocks -= self._projection(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.token_budget
        planned: dict[Request, int] = {}
        # Running requests: single-token ones (decodes) first, then unfinished prefills; oldest first.
        order = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens != 1, r.arrival))
        for req in order:
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                continue
            while self.kv.allocate(req.request_id, req.num_computed_tokens + n) is None:
                victim = max(self.running, key=lambda r: r.arrival)  # the newest
                budget += planned.pop(victim, 0)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status == RequestStatus.RUNNING:
                planned[req] = n
                budget -= n
        # Waiting requests, FIFO, while seats, budget and projected KV allow.
        limit = self.config.kv_admission_ratio * self.kv.pool.num_blocks
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending_tokens:  # preempted with a token still on the device: next step
                break
            projection = self._projection(req)
            if self.running and self._projected_blocks + projection > limit:
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.kv.allocate(req.request_id, req.num_computed_tokens + n) is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._projected_blocks += projection
            planned[req] = n
            budget -= n
        decodes = [(r, n) for r, n in planned.items() if n == 1]
        chunks = [(r, n) for r, n in planned.items() if n > 1]
        out.scheduled = decodes + chunks
        out.num_decode = len(decodes)
        return out

    def check_invariants(self) -> None:
        """Used by tests: KV accounting and the projection bookkeeping agree."""
        self.kv.check_invariant()
        expected = sum(self._projection(r) for r in self.running)
        if expected != self._projected_blocks:
            raise AssertionError(f"projected blocks {self._projected_blocks} != {expected}")
        for r in self.waiting:
            if self.kv.block_ids(r.request_id):
                raise AssertionError(f"waiting request {r.request_id} holds blocks")
