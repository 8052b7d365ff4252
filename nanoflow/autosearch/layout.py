"""What the pipeline search schedules (see milp.py for the model): candidates and modes, the layer cut
into segments and units, their rows, data hazards between them and their durations from the profile."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from nanoflow.pipeline.profile_table import ProfileTable, is_side_op
from nanoflow.pipeline.plan import Plan

COMPUTE = "compute"
SIDE_STREAM = {"memory": "memory", "network": "network"}
STAGE1_STRUCTURES = ((2, 2, 2),)
FINER_STRUCTURES = ((4, 4, 2), (2, 4, 2), (4, 4, 4))
"""Tried when the 2-nano-op pipeline leaves the compute stream idle (bubbles), as NanoFlow does."""


# ---- candidates ----------------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    plan: Plan
    predicted_ms: float
    """The MILP's period: ms per layer in steady state."""
    simulated_ms: float
    """Event simulation of the plan (the executor's dependencies, rate-based interference)."""
    stage: int
    """0 sequential, 1 no interference, 2 with SM shares and interference."""
    structure: str
    mode: str
    """'sequential', 'stage1', 'free' or 'shared'."""
    side_budget: int | None = None
    cuts: tuple[int, ...] = ()
    """Boundaries in rows of the profiled batch."""
    schedule: list[dict] = field(default_factory=list)
    """Per nano-op: op, nano, stream, resource, start_ms, end_ms (slot time), layer (0 or -1)."""
    solve_s: float = 0.0
    status: str = ""

    @property
    def score(self) -> float:
        return self.simulated_ms if self.simulated_ms > 0 else self.predicted_ms

    def describe(self) -> str:
        b = "" if self.side_budget is None else f", memory {self.side_budget} SMs"
        return f"{self.name} ({self.mode}{b}, cuts {list(self.cuts)})"


@dataclass(frozen=True)
class Mode:
    kind: str
    """'stage1' (whole device, no interference), 'free' or 'shared'."""
    side_budget: int | None = None
    iota: float = 1.0
    phi: float = 0.0

    def budget(self, table: ProfileTable, meta: dict) -> int | None:
        if meta["resource"] == "network":
            return None  # collectives: the group's NCCL CTA limit, not an SM budget per op
        if is_side_op(meta):
            return None if self.kind == "stage1" else self.side_budget
        if self.kind == "shared" and meta["resource"] == "compute" and self.side_budget is not None:
            return table.num_sms - self.side_budget
        return None

    def label(self) -> str:
        return self.kind + ("" if self.side_budget is None else f"-m{self.side_budget}")


# ---- layout: segments and units ------------------------------------------------------------------
@dataclass
class Segment:
    index: int
    ops: list[dict]
    stream: str
    n: int
    scope: str


def side_stream(meta: dict) -> str:
    return SIDE_STREAM["network" if meta["resource"] == "network" else "memory"]


def segments_for(table: ProfileTable, structure: tuple[int, int, int]) -> list[Segment] | None:
    pre, side, post = structure
    metas = table.ops
    first_side = next((i for i, m in enumerate(metas) if is_side_op(m) and m["resource"] != "network"), None)
    if first_side is None:
        return None
    assigned = []
    for i, m in enumerate(metas):
        if m["resource"] == "network":  # a collective is cut like the GEMM before it, on its own stream
            assigned.append((side_stream(m), pre if i < first_side else post, m["scope"]))
        elif is_side_op(m):
            assigned.append((side_stream(m), side, m["scope"]))
        elif m["scope"] == "prefill":
            assigned.append((COMPUTE, 1, "prefill"))
        else:
            assigned.append((COMPUTE, pre if i < first_side else post, m["scope"]))
    # Ops writing the same buffer on the same rows (input_norm and post_norm both write `normed` and
    # `residual`) get the same cuts: the executor checks that a read sees only its expected producer,
    # and a coarser earlier writer would survive partially under a finer later one. The count of the
    # latest such op in the layer wins (as in the nano-4 hand plan).
    for i in range(len(metas) - 1, -1, -1):
        for j in range(i):
            same_rows = metas[i]["scope"] == metas[j]["scope"] or "all" in (metas[i]["scope"], metas[j]["scope"])
            if same_rows and set(metas[i]["writes"]) & set(metas[j]["writes"]) and assigned[j][0] == assigned[i][0]:
                assigned[j] = (assigned[j][0], assigned[i][1], assigned[j][2])
    segs: list[Segment] = []
    for m, (stream, n, scope) in zip(metas, assigned):
        if segs and (segs[-1].stream, segs[-1].n, segs[-1].scope) == (stream, n, scope):
            segs[-1].ops.append(m)
        else:
            segs.append(Segment(len(segs), [m], stream, n, scope))
    return segs


def boundary_points(T: int, D: int, step: int = 128, limit: int | None = None) -> list[int]:
    """Cut candidates in rows: multiples of `step` and fractions of the decode and prefill regions
    (never exactly at 0, D or T). `limit` thins the list, keeping the decode fractions."""
    P = T - D
    pts = set()
    if D > 1:
        pts |= {round(D * k / 8) for k in range(1, 8)} | set(range(step, D, step))
    if P > 1:
        pts |= {D + round(P * k / 4) for k in range(1, 4)} | set(range(D + step, T, step))
    pts = sorted(p for p in pts if 0 < p < T and p != D)
    out: list[int] = []
    for p in pts:
        if out and p - out[-1] < 8:
            continue
        if abs(p - D) < 4:
            continue
        out.append(p)
    if limit is not None and len(out) > limit:
        keep = {round(D * k / 4) for k in (1, 2, 3)} if D > 1 else set()
        core = [p for p in out if p in keep]
        rest = [p for p in out if p not in keep]
        stride = max(1, math.ceil(len(rest) / max(1, limit - len(core))))
        out = sorted(set(core) | set(rest[stride // 2::stride]))
    return out


def _canon(b: int, T: int, D: int) -> float:
    """Position of a boundary in region coordinates: decode rows [0, 1), prefill rows [1, 2)."""
    if b <= 0:
        return 0.0
    if b >= T:
        return 2.0
    if D > 0 and b < D:
        return b / D
    return 1.0 + (b - D) / max(1, T - D)


@dataclass
class Unit:
    seg: Segment
    k: int

    @property
    def stream(self) -> str:
        return self.seg.stream

    @property
    def name(self) -> str:
        first = self.seg.ops[0]["name"] if len(self.seg.ops) == 1 else f"{self.seg.ops[0]['name']}..{self.seg.ops[-1]['name']}"
        return f"{first}.{self.k}"


def _unit_span(unit: Unit, bounds: list, N: int, scope_ranges: dict):
    step = N // unit.seg.n
    lo, hi = bounds[unit.k * step], bounds[(unit.k + 1) * step]
    if unit.seg.scope in scope_ranges:
        slo, shi = scope_ranges[unit.seg.scope]
        if unit.seg.n == 1 or unit.seg.scope == "prefill":
            return slo, shi
        return max(lo, slo), min(hi, shi)
    return lo, hi


def unit_rows(unit: Unit, config: tuple[int, ...], T: int, D: int, N: int) -> tuple[int, int]:
    bounds = [0, *config, T]
    lo, hi = _unit_span(unit, bounds, N, {"decode": (0, D), "prefill": (D, T)})
    return lo, max(lo, hi)


def unit_canon(unit: Unit, config: tuple[int, ...], T: int, D: int, N: int) -> tuple[float, float]:
    bounds = [0.0, *[_canon(b, T, D) for b in config], 2.0]
    lo, hi = _unit_span(unit, bounds, N, {"decode": (0.0, 1.0), "prefill": (1.0, 2.0)})
    return lo, max(lo, hi)


def _hazard(a: dict, b: dict) -> bool:
    """a earlier, b later: read-after-write, write-after-read or write-after-write on some buffer."""
    aw, ar, bw, br = set(a["writes"]), set(a["reads"]), set(b["writes"]), set(b["reads"])
    return bool(aw & br or aw & bw or ar & bw)


def _edges(units: list[Unit], config, T, D, N) -> tuple[set, set]:
    """(within-layer edges, layer l -> l+1 edges) between units, as index pairs."""
    spans = [unit_canon(u, config, T, D, N) for u in units]
    nonempty = [hi > lo for lo, hi in spans]
    overlap = lambda i, j: spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]  # noqa: E731
    seg_hazard: dict[tuple[int, int], bool] = {}

    def hazard(si: int, sj: int) -> bool:
        key = (si, sj)
        if key not in seg_hazard:
            a_ops, b_ops = units_by_seg[si], units_by_seg[sj]
            seg_hazard[key] = any(_hazard(a, b) for a in a_ops for b in b_ops)
        return seg_hazard[key]

    units_by_seg = {u.seg.index: u.seg.ops for u in units}
    within, cross = set(), set()
    for i, u in enumerate(units):
        for j, v in enumerate(units):
            if not (nonempty[i] and nonempty[j]) or not overlap(i, j):
                continue
            if u.seg.index < v.seg.index and hazard(u.seg.index, v.seg.index):
                within.add((i, j))
            if hazard(u.seg.index, v.seg.index):  # the hazard relation is symmetric
                cross.add((i, j))
    # nano-ops of one segment keep their order (same stream; breaks symmetry)
    for i, u in enumerate(units):
        if not nonempty[i]:
            continue
        nxt = [j for j, v in enumerate(units) if v.seg is u.seg and v.k > u.k and nonempty[j]]
        if nxt:
            within.add((i, min(nxt, key=lambda j: units[j].k)))
    return within, cross


# ---- durations -----------------------------------------------------------------------------------
def op_duration(table: ProfileTable, meta: dict, rows: int, mode: Mode) -> float:
    t = table.op_time(meta["name"], rows, mode.budget(table, meta))
    return t * mode.iota if _slowed(meta) and mode.kind != "stage1" else t


def _slowed(meta: dict) -> bool:
    """Ops that take iota x their alone time next to compute: the memory-stream ops (whose
    interference was measured); collectives keep their alone time."""
    return is_side_op(meta) and meta["resource"] == "memory"


def unit_duration(table: ProfileTable, unit: Unit, rows: tuple[int, int], mode: Mode) -> float:
    n = rows[1] - rows[0]
    return sum(op_duration(table, m, n, mode) for m in unit.seg.ops) if n > 0 else 0.0
