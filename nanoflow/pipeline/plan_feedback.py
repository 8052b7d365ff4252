"""Measured plan choice: the prediction proposes, the step's measured time decides.

PlanChooser predicts per decision bucket (token, decode and context buckets) whether the plan beats
sequential; a prediction from a model can be wrong by more than the plan's gain (the interference
of two streams on one HBM, the host cost of an eager step). Where the plan is predicted to win,
MeasuredChoice runs both on the bucket's steps in turn until each has SAMPLES timings, then keeps
the faster by the median of each one's time per unit of work (the step's work at fixed rates, so
steps of other sizes in one bucket compare). Every RECHECK_EVERY decisions it times the other one
once more, since a bucket's steps drift (contexts grow). Where the plan is predicted to lose,
nothing is measured: the plan's gain must be predicted before it is tried (a veto, not a search).
A new bucket starts from the timings of its nearest judged neighbour in context (contexts grow
through the buckets; sampling each afresh would run a losing plan six times per bucket).

Timings come back later (CUDA events are read once done, without a sync): `StepTimer`.
"""
from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field

import torch

SAMPLES = 3
"""Timed steps of each (plan and sequential) per bucket before the faster is kept."""
WINDOW = 7
"""Most recent timings kept per bucket and arm (the median of these decides)."""
RECHECK_EVERY = 64
"""Decisions in a bucket between two timings of the arm not kept."""
MARGIN = 0.01
"""The plan is kept when its median is at least this much (1%) below sequential's."""
MAX_PENDING = 256
"""Timed steps whose events are not yet read; older ones are dropped past this (never read)."""


@dataclass
class _Arms:
    plan: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    sequential: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    since_check: int = 0
    issued_plan: int = 0
    issued_sequential: int = 0
    """Sampling decisions made: timings come back a step or two later, so alternation counts these."""

    def plan_wins(self) -> bool:
        return statistics.median(self.plan) < statistics.median(self.sequential) * (1.0 - MARGIN)


class MeasuredChoice:
    """Per-bucket timings of the plan and of sequential; decide() vetoes a predicted win that the
    timings do not confirm."""

    def __init__(self):
        self._buckets: dict[tuple, _Arms] = {}

    def decide(self, key: tuple, predicted: bool) -> bool:
        """Whether the step of this bucket runs the plan."""
        if not predicted:
            return False
        arms = self._buckets.get(key)
        if arms is None:
            arms = self._buckets[key] = self._seeded(key)
        if len(arms.plan) < SAMPLES or len(arms.sequential) < SAMPLES:
            plan = arms.issued_plan <= arms.issued_sequential  # alternate, plan first
            if plan:
                arms.issued_plan += 1
            else:
                arms.issued_sequential += 1
            return plan
        wins = arms.plan_wins()
        arms.since_check += 1
        if arms.since_check >= RECHECK_EVERY:
            arms.since_check = 0
            return not wins
        return wins

    def _seeded(self, key: tuple) -> _Arms:
        """A new bucket starts with the timings of the judged bucket nearest in context among those of
        its token and decode buckets (the last key field is the context bucket): contexts grow through
        the buckets, and re-sampling each one would run a losing plan six times per bucket. Its own
        timings replace the seed (WINDOW), the re-checks see to that."""
        near = [(abs(k[-1] - key[-1]), k) for k, a in self._buckets.items()
                if k[:-1] == key[:-1] and len(a.plan) >= SAMPLES and len(a.sequential) >= SAMPLES]
        if not near or not isinstance(key[-1], (int, float)):
            return _Arms()
        src = self._buckets[min(near)[1]]
        arms = _Arms()
        arms.plan.extend(src.plan)
        arms.sequential.extend(src.sequential)
        arms.issued_plan = arms.issued_sequential = SAMPLES
        return arms

    def record(self, key: tuple, ran_plan: bool, ms: float, work: float) -> None:
        """One timed step of the bucket: `ms` of device time for `work` (any unit, the same for both)."""
        arms = self._buckets.get(key)
        if arms is None or work <= 0 or ms <= 0:
            return
        (arms.plan if ran_plan else arms.sequential).append(ms / work)

    def summary(self) -> dict:
        """Buckets measured, and in how many of the judged ones the plan was kept or vetoed."""
        judged = [a for a in self._buckets.values() if len(a.plan) >= SAMPLES and len(a.sequential) >= SAMPLES]
        kept = sum(a.plan_wins() for a in judged)
        return {"buckets": len(self._buckets), "judged": len(judged), "plan_kept": kept,
                "plan_vetoed": len(judged) - kept}


class StepTimer:
    """Device time of steps, read back later: CUDA events on the current stream (query(), no sync),
    or the host clock where the device runs synchronously (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: collections.deque = collections.deque()
        self._host_start = 0.0

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        self._host_start = time.perf_counter()
        return None

    def stop(self, started, payload) -> None:
        """Ends the step begun with start(); its (payload, ms) comes out of done() once measured."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((started, end, payload))
            if len(self._pending) > MAX_PENDING:
                self._pending.popleft()
        else:
            self._pending.append((None, (time.perf_counter() - self._host_start) * 1e3, payload))

    def done(self) -> list[tuple[object, float]]:
        """(payload, ms) of the steps measured since the last call, oldest first."""
        out = []
        while self._pending:
            start, end, payload = self._pending[0]
            if start is None:
                ms = end
            elif end.query():
                ms = start.elapsed_time(end)
            else:
                break
            self._pending.popleft()
            out.append((payload, ms))
        return out
