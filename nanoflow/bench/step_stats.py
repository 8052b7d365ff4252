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


# ---- step classes: steps grouped by the decode share of their tokens ---------------------------------
STEP_CLASSES = ("decode-only", "mixed", "prefill-heavy")
PREFILL_HEAVY_BELOW = 0.5
"""A step whose decode rows are under this share of its tokens is prefill-heavy; from it up to (not
including) all rows it is mixed; all rows decode: decode-only."""
CLASS_RULES = {"decode-only": "decode share = 1", "mixed": f"{PREFILL_HEAVY_BELOW:g} <= decode share < 1",
               "prefill-heavy": f"decode share < {PREFILL_HEAVY_BELOW:g}"}


def step_class(num_tokens: int, num_decode: int) -> str:
    """decode-only / mixed / prefill-heavy by num_decode / num_tokens (see PREFILL_HEAVY_BELOW)."""
    if num_tokens <= 0 or not 0 <= num_decode <= num_tokens:
        raise ValueError(f"a step has 0 <= num_decode <= num_tokens and num_tokens > 0, got {num_decode} / {num_tokens}")
    if num_decode == num_tokens:
        return "decode-only"
    return "mixed" if num_decode >= PREFILL_HEAVY_BELOW * num_tokens else "prefill-heavy"


def class_figures(records, step_ms: list[float]) -> dict[str, dict]:
    """Per step class: steps, tokens, ms of the steps (device time on a GPU), tokens/s over those ms,
    steps run under the plan and steps run as CUDA graphs. `records` are the runner's StepRecords
    (num_tokens, num_decode, plan, graph) in step order, `step_ms` each step's time, same order."""
    if len(records) != len(step_ms):
        raise ValueError(f"{len(records)} step records but {len(step_ms)} step times")
    out = {c: {"steps": 0, "tokens": 0, "ms": 0.0, "plan_steps": 0, "graph_steps": 0} for c in STEP_CLASSES}
    for rec, ms in zip(records, step_ms):
        c = out[step_class(rec.num_tokens, rec.num_decode)]
        c["steps"] += 1
        c["tokens"] += rec.num_tokens
        c["ms"] += ms
        c["plan_steps"] += int(bool(rec.plan))
        c["graph_steps"] += int(bool(rec.graph))
    total = {"steps": sum(c["steps"] for c in out.values()), "tokens": sum(c["tokens"] for c in out.values()),
             "ms": sum(c["ms"] for c in out.values()), "plan_steps": sum(c["plan_steps"] for c in out.values()),
             "graph_steps": sum(c["graph_steps"] for c in out.values())}
    out["all steps"] = total
    for c in out.values():
        c["tokens_per_s"] = c["tokens"] / (c["ms"] / 1e3) if c["ms"] > 0 else None
    return out


def class_ratios(main: dict[str, dict], compare: dict[str, dict]) -> dict[str, float | None]:
    """tokens/s of `main` / tokens/s of `compare` per step class (None where either has no steps)."""
    out = {}
    for name, m in main.items():
        c = compare.get(name, {})
        a, b = m.get("tokens_per_s"), c.get("tokens_per_s")
        out[name] = a / b if a and b else None
    return out


def format_classes(runs: list[tuple[str, dict]], ratios: dict[str, float | None] | None,
                   end_to_end: float | None, timing: str) -> list[str]:
    """The per-class table: steps, share of the run's step time and tokens/s of each run, and the
    ratio main / compare per class and end to end."""
    header = ["step class", "rule"]
    for label, _ in runs:
        header += [f"{label} steps", f"{label} time %", f"{label} tok/s"]
    if ratios is not None:
        header.append("ratio")
    rows = []
    for name in (*STEP_CLASSES, "all steps"):
        row = [name, CLASS_RULES.get(name, f"sum of step {timing}")]
        for _, figs in runs:
            c = figs[name]
            total_ms = figs["all steps"]["ms"] or 1.0
            row += [str(c["steps"]), f"{100.0 * c['ms'] / total_ms:.1f}",
                    "n/a" if c["tokens_per_s"] is None else f"{c['tokens_per_s']:,.0f}"]
        if ratios is not None:
            row.append("n/a" if ratios.get(name) is None else f"{ratios[name]:.3f}x")
        rows.append(row)
    if ratios is not None and end_to_end is not None:
        rows.append(["end to end", "total tok/s, wall time"] + [""] * (3 * len(runs)) + [f"{end_to_end:.3f}x"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [f"per step class (tokens / {timing} of the steps; decode share = decode rows / step tokens):",
            line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
