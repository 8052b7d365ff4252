"""Per-step figures of a timed run, from the engine's step log ((start_s, end_s, num_tokens) per step)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

STEADY_MIDDLE_FRACTION = 0.8
"""The steady-state figure counts the steps in this middle fraction of the timed run's span."""


@dataclass(frozen=True)
class StepStats:
    """Figures from the engine's step log ((start_s, end_s, num_tokens) per step) of one timed run."""

    num_steps: int
    """Steps in the run."""
    span_s: float
    """First step's start to last step's end."""
    busy_s: float
    """Sum of the steps' own durations."""
    gap_s: float
    """Sum of the time between one step's end and the next one's start (scheduling, output handling):
    the GPU idles then unless the engine overlaps host work with device work."""
    gap_fraction: float
    """gap_s / span_s."""
    mean_tokens_per_step: float
    """Dense-batch tokens per step, averaged."""
    steady_steps: int
    """Steps whose midpoint lies in the middle STEADY_MIDDLE_FRACTION of the span."""
    steady_s: float
    """First steady step's start to last steady step's end."""
    steady_tokens: int
    """Dense-batch tokens (prompt + decode) of the steady steps."""
    steady_tokens_per_s: float | None
    """steady_tokens / steady_s: the steady-state total tokens/s (None when no step is steady)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def step_statistics(steps: list[tuple[float, float, int]],
                    middle: float = STEADY_MIDDLE_FRACTION) -> StepStats | None:
    """Summarises a step log; None for an empty one. `middle` is the steady fraction of the span."""
    if not 0.0 < middle <= 1.0:
        raise ValueError(f"middle must be in (0, 1], got {middle}")
    if not steps:
        return None
    steps = sorted(steps)
    start, end = steps[0][0], max(s[1] for s in steps)
    span = end - start
    gaps = sum(max(0.0, nxt[0] - cur[1]) for cur, nxt in zip(steps, steps[1:]))
    margin = span * (1.0 - middle) / 2.0
    lo, hi = start + margin, end - margin
    steady = [s for s in steps if lo <= (s[0] + s[1]) / 2.0 <= hi]
    steady_s = (max(s[1] for s in steady) - steady[0][0]) if steady else 0.0
    steady_tokens = sum(int(s[2]) for s in steady)
    return StepStats(
        num_steps=len(steps), span_s=span, busy_s=sum(s[1] - s[0] for s in steps), gap_s=gaps,
        gap_fraction=gaps / span if span > 0 else 0.0,
        mean_tokens_per_step=sum(int(s[2]) for s in steps) / len(steps),
        steady_steps=len(steady), steady_s=steady_s, steady_tokens=steady_tokens,
        steady_tokens_per_s=steady_tokens / steady_s if steady_s > 0 else None)
