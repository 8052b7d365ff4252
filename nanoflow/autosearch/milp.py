"""NanoFlow's pipeline search over a ProfileTable (pure functions, CPU only).

Model. A *structure* gives each op of the layer a number of nano-ops: ops before the memory-stream op
(decode attention) get `pre`, the memory-stream op `side`, compute ops after it `post`, and prefill
attention 1 (it is cut at request bounds). Tensor-parallel all-reduces (network ops) are cut like
the ops around them and run on a `network` stream, so they overlap other nano-batches' GEMMs. All ops share one list of boundaries (N - 1 cut points,
N = the largest count; an op with n nano-ops uses every N/n-th), so which nano-ops touch the same rows
is known from the structure alone. Consecutive ops with the same stream and count form a *segment*;
segment k-th nano-ops are the MILP's *units* (issued back to back).

MILP (scipy.optimize.milp / HiGHS), one layer in steady state as a cyclic schedule of period P:
- x_c: one-hot choice of the boundaries among a grid (multiples of 128 rows and fractions of the
  decode / prefill regions); unit durations are sum_c x_c d_u(c), from the profile;
- per unit: tau_u in [0, P] its start within its layer's issue slot, w_u in {0, 1} whether it is
  issued with the next layer ("@-1"), z_u = P w_u (linearised); its start in layer time is tau + z;
- precedence from data hazards (read/write on overlapping rows, as the executor derives them),
  within the layer and from layer l to l+1 (+P), active only for the configs where rows overlap;
- per stream, no two units overlap modulo P (big-M disjunctions y_uv, and tau_u + d_u <= tau_v + P);
- minimise P (+ a tiny push towards early starts).
Stage 1 uses times alone on the whole device (no interference). Stage 2 re-solves each structure per
memory SM budget b: 'free' (compute ops unrestricted) or 'shared' (compute ops on num_sms - b SMs),
memory units taking iota x their alone time and the compute stream paying phi x the memory time
(measured pairwise). Every plan is then replayed by an event simulation of the executor's own
dependencies (simulate_plan) with rate-based interference; candidates are ranked by that estimate.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from nanoflow.autosearch.profile import ProfileTable, is_side_op
from nanoflow.pipeline.plan import SEQUENTIAL, Cut, OpPlan, OrderEntry, Plan, Stream

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


# ---- the MILP ------------------------------------------------------------------------------------
class _LP:
    """Sparse constraint builder for scipy.optimize.milp."""

    def __init__(self):
        self.names: list[str] = []
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[dict[int, float]] = []
        self.rlb: list[float] = []
        self.rub: list[float] = []

    def var(self, name: str, lb=0.0, ub=np.inf, integer=False) -> int:
        self.names.append(name)
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(1 if integer else 0)
        return len(self.names) - 1

    def add(self, coeffs: dict[int, float], lb=-np.inf, ub=np.inf) -> None:
        row: dict[int, float] = {}
        for k, v in coeffs.items():
            if v:
                row[k] = row.get(k, 0.0) + v
        self.rows.append(row)
        self.rlb.append(lb)
        self.rub.append(ub)

    def solve(self, objective: dict[int, float], time_limit: float):
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_matrix

        n = len(self.names)
        c = np.zeros(n)
        for k, v in objective.items():
            c[k] = v
        data, ri, ci = [], [], []
        for r, row in enumerate(self.rows):
            for k, v in row.items():
                data.append(v)
                ri.append(r)
                ci.append(k)
        A = csr_matrix((data, (ri, ci)), shape=(len(self.rows), n))
        return milp(c, integrality=np.array(self.integer), bounds=Bounds(self.lb, self.ub),
                    constraints=LinearConstraint(A, self.rlb, self.rub),
                    options={"time_limit": time_limit, "mip_rel_gap": 1e-4, "disp": False})


def configs_for(table: ProfileTable, N: int, step: int = 128) -> list[tuple[int, ...]]:
    T, D = table.num_tokens, table.num_decode
    if N == 1:
        return [()]
    pts = boundary_points(T, D, step, limit=None if N == 2 else 10)
    return [c for c in itertools.combinations(pts, N - 1)]


def configs_near(table: ProfileTable, center: tuple[int, ...], radius: int = 1, step: int = 128) -> list[tuple[int, ...]]:
    """Configs whose every boundary is within `radius` grid points of `center`'s (stage 2 refines the
    nano-batch sizes stage 1 found instead of searching all of them again)."""
    N = len(center) + 1
    if N <= 2:
        return configs_for(table, N, step)
    pts = boundary_points(table.num_tokens, table.num_decode, step, limit=10)
    idx = [min(range(len(pts)), key=lambda i: abs(pts[i] - b)) for b in center]
    choices = [pts[max(0, i - radius):i + radius + 1] for i in idx]
    return sorted({c for c in itertools.product(*choices) if all(a < b for a, b in zip(c, c[1:]))})


def solve_structure(table: ProfileTable, structure: tuple[int, int, int], mode: Mode, *,
                    time_limit: float = 10.0, configs: list[tuple[int, ...]] | None = None,
                    step: int = 128) -> Candidate | None:
    """Solves the cyclic schedule of one structure in one mode; None when the layer has nothing to
    overlap (no memory-stream op, or no decode rows)."""
    t0 = time.perf_counter()
    segs = segments_for(table, structure)
    T, D = table.num_tokens, table.num_decode
    if segs is None or D == 0:
        return None
    N = max(s.n for s in segs)
    if any(N % s.n for s in segs):
        raise ValueError(f"structure {structure}: nano-op counts must divide {N}")
    configs = configs if configs is not None else configs_for(table, N, step)
    if not configs:
        return None
    units = [Unit(s, k) for s in segs for k in range(s.n)]
    U, C = len(units), len(configs)
    dur = np.array([[unit_duration(table, u, unit_rows(u, c, T, D, N), mode) for c in configs] for u in units])
    # Edge activity depends only on which region each boundary falls in: compute once per pattern.
    pattern_edges: dict[tuple[bool, ...], tuple[set, set]] = {}
    within_on: dict[tuple[int, int], list[int]] = {}
    cross_on: dict[tuple[int, int], list[int]] = {}
    for ci, c in enumerate(configs):
        pat = tuple(b < D for b in c)
        if pat not in pattern_edges:
            pattern_edges[pat] = _edges(units, c, T, D, N)
        w_e, x_e = pattern_edges[pat]
        for e in w_e:
            within_on.setdefault(e, []).append(ci)
        for e in x_e:
            cross_on.setdefault(e, []).append(ci)
    dmax = float(dur.max()) if dur.size else 0.0
    pmax = float(dur.max(axis=1).sum()) * 1.0001 + 1e-6
    big = 2.0 * pmax + dmax + 1e-6

    lp = _LP()
    x = [lp.var(f"x{ci}", 0, 1, True) for ci in range(C)]
    P = lp.var("P", 0.0, pmax)
    tau = [lp.var(f"tau_{u.name}", 0.0, pmax) for u in units]
    w = [lp.var(f"w_{u.name}", 0, 1, True) for u in units]
    z = [lp.var(f"z_{u.name}", 0.0, pmax) for u in units]
    lp.add({k: 1.0 for k in x}, 1.0, 1.0)

    def d_expr(i: int, sign: float = 1.0, active: list[int] | None = None) -> dict[int, float]:
        if active is None:
            return {x[ci]: sign * dur[i, ci] for ci in range(C)}
        on = set(active)
        return {x[ci]: sign * (dur[i, ci] if ci in on else -big) for ci in range(C)}

    for i in range(U):
        lp.add({tau[i]: 1.0, P: -1.0}, ub=0.0)
        lp.add({z[i]: 1.0, P: -1.0}, ub=0.0)
        lp.add({z[i]: 1.0, w[i]: -pmax}, ub=0.0)
        lp.add({z[i]: 1.0, P: -1.0, w[i]: -pmax}, lb=-pmax)
    for (i, j), active in within_on.items():
        act = None if len(active) == C else active
        lp.add({tau[j]: 1.0, z[j]: 1.0, tau[i]: -1.0, z[i]: -1.0, **d_expr(i, -1.0, act)}, lb=0.0)
        row = {w[j]: 1.0, w[i]: -1.0}
        if act is not None:
            on = set(act)
            row.update({x[ci]: 1.0 for ci in range(C) if ci not in on})
        lp.add(row, lb=0.0)
    for (i, j), active in cross_on.items():
        act = None if len(active) == C else active
        row = {tau[j]: 1.0, z[j]: 1.0, P: 1.0, **d_expr(i, -1.0, act)}
        row[tau[i]] = row.get(tau[i], 0.0) - 1.0
        row[z[i]] = row.get(z[i], 0.0) - 1.0
        lp.add(row, lb=0.0)
    streams = sorted({u.stream for u in units})
    for s in streams:
        idx = [i for i, u in enumerate(units) if u.stream == s]
        for a, b in itertools.combinations(idx, 2):
            y = lp.var(f"y_{a}_{b}", 0, 1, True)
            lp.add({tau[a]: 1.0, tau[b]: -1.0, **d_expr(a), y: big}, ub=big)
            lp.add({tau[b]: 1.0, tau[a]: -1.0, **d_expr(b), y: -big}, ub=0.0)
        for a in idx:
            for b in idx:
                row = {tau[a]: 1.0, P: -1.0, **d_expr(a)}
                row[tau[b]] = row.get(tau[b], 0.0) - 1.0
                lp.add(row, ub=0.0)
        load: dict[int, float] = {P: -1.0}
        for a in idx:
            for k, v in d_expr(a).items():
                load[k] = load.get(k, 0.0) + v
        if s == COMPUTE and mode.phi > 0:
            for a, u in enumerate(units):
                if u.stream != COMPUTE:
                    for k, v in d_expr(a, mode.phi).items():
                        load[k] = load.get(k, 0.0) + v
        lp.add(load, ub=0.0)
    # Tie-breakers far below the period's resolution: early starts, and as few units as possible
    # deferred to the next layer's slot (the cyclic optimum does not fix where a slot begins).
    eps = 1e-5 / max(1, U)
    objective = {P: 1.0, **{t: eps for t in tau}, **{k: 2e-6 * pmax for k in w}}
    res = lp.solve(objective, time_limit)
    if res.x is None:
        return None
    sol = res.x
    ci = int(np.argmax([sol[k] for k in x]))
    config = configs[ci]
    period = float(sol[P])
    taus = [float(sol[t]) for t in tau]
    ws = [int(round(sol[k])) for k in w]
    durs = [float(dur[i, ci]) for i in range(U)]
    w_e, x_e = pattern_edges[tuple(b < D for b in config)]
    order = _issue_order(units, taus, ws, w_e, x_e)
    plan_name = f"auto-{'.'.join(map(str, structure))}-{mode.label()}"
    plan = build_plan(plan_name, table, segs, config, N, mode, [(units[i], ws[i]) for i in order])
    schedule = _schedule(table, units, config, N, taus, ws, mode)
    status = "optimal" if res.status == 0 else f"time limit (gap {getattr(res, 'mip_gap', float('nan')):.3f})"
    return Candidate(plan_name, plan, period, 0.0, 1 if mode.kind == "stage1" else 2,
                     ".".join(map(str, structure)), mode.kind, mode.side_budget, tuple(config), schedule,
                     time.perf_counter() - t0, status)


def _issue_order(units: list[Unit], taus, ws, within: set, cross: set) -> list[int]:
    """Units of one issue slot in start order (memory-stream units first on ties, so the memory op
    is launched before the compute work it overlaps), repaired into a topological order of the
    slot's dependencies: within a layer (same slot offset) and from layer l-1 ('@-1') to layer l."""
    preds: dict[int, set[int]] = {i: set() for i in range(len(units))}
    for i, j in within:
        if ws[i] == ws[j]:
            preds[j].add(i)
    for i, j in cross:
        if ws[i] == 1 and ws[j] == 0:
            preds[j].add(i)
    key = lambda i: (round(taus[i], 9), units[i].stream == COMPUTE, -ws[i], units[i].seg.index, units[i].k)  # noqa: E731
    done: list[int] = []
    left = set(range(len(units)))
    while left:
        ready = [i for i in left if not (preds[i] & left)]
        if not ready:  # a cycle cannot happen with consistent w; fall back to the key order
            ready = list(left)
        nxt = min(ready, key=key)
        done.append(nxt)
        left.remove(nxt)
    return done


def _cut_of(b: int, T: int, D: int) -> Cut:
    if b < D:
        return Cut("decode", at=round(b / D, 6))
    return Cut("prefill", at=round((b - D) / (T - D), 6))


def build_plan(name: str, table: ProfileTable, segs: list[Segment], config: tuple[int, ...], N: int,
               mode: Mode, ordered_units: list[tuple[Unit, int]]) -> Plan:
    T, D = table.num_tokens, table.num_decode
    used = sorted({s.stream for s in segs} - {COMPUTE})
    streams = (Stream(COMPUTE, 0), *[Stream(s, -1) for s in used])
    ops: dict[str, OpPlan] = {}
    for s in segs:
        idx = [k * (N // s.n) for k in range(1, s.n)] if s.scope != "prefill" else []
        cuts = tuple(_cut_of(config[i - 1], T, D) for i in idx)
        for m in s.ops:
            ops[m["name"]] = OpPlan(cuts, s.stream, mode.budget(table, m))
    order = []
    for unit, wu in ordered_units:
        for m in unit.seg.ops:
            order.append(OrderEntry(m["name"], unit.k, -1 if wu else 0))
    return Plan(name, streams, ops, tuple(order))


def _schedule(table, units, config, N, taus, ws, mode) -> list[dict]:
    T, D = table.num_tokens, table.num_decode
    out = []
    for i, u in enumerate(units):
        lo, hi = unit_rows(u, config, T, D, N)
        t = taus[i]
        for m in u.seg.ops:
            d = op_duration(table, m, hi - lo, mode) if hi > lo else 0.0
            out.append({"op": m["name"], "nano": u.k, "stream": u.stream, "resource": m["resource"],
                        "lo": lo, "hi": hi, "start_ms": t, "end_ms": t + d, "layer": -ws[i]})
            t += d
    return out


# ---- sequential, checks, simulation --------------------------------------------------------------
def sequential_ms(table: ProfileTable) -> float:
    return sum(table.op_time(m["name"], table._full_rows(m)) for m in table.ops)


def sequential_candidate(table: ProfileTable) -> Candidate:
    t, sched = 0.0, []
    for m in table.ops:
        d = table.op_time(m["name"], table._full_rows(m))
        sched.append({"op": m["name"], "nano": 0, "stream": COMPUTE, "resource": m["resource"], "lo": 0,
                      "hi": table.num_tokens, "start_ms": t, "end_ms": t + d, "layer": 0})
        t += d
    return Candidate("sequential", SEQUENTIAL, t, t, 0, "1", "sequential", None, (), sched, 0.0, "exact")


def fake_layer_ops(table: ProfileTable) -> list:
    from nanoflow.pipeline.ops import Op, Resource, RowScope
    noop = lambda state, lo, hi: None  # noqa: E731
    return [Op(m["name"], Resource(m["resource"]), noop, RowScope(m["scope"]), tuple(m["reads"]),
               tuple(m["writes"])) for m in table.ops]


def profiled_batch(table: ProfileTable):
    from nanoflow.pipeline.executor import synthetic_batch
    return synthetic_batch(table.num_decode, tuple(table.prefill_chunks))


def check_plan(plan: Plan, table: ProfileTable, layer_ops: list | None = None) -> None:
    """Raises ValueError if the executor rejects the plan (validation, data flow on its small batch
    and on the profiled batch's shape)."""
    import torch

    from nanoflow.pipeline.executor import PlanExecutor
    ops = layer_ops or fake_layer_ops(table)
    ex = PlanExecutor(plan, ops, torch.device("cpu"))
    for name, op in plan.ops.items():
        if op.sm_budget is not None and table.num_sms and op.sm_budget > table.num_sms:
            raise ValueError(f"plan {plan.name!r}: op {name!r} sm_budget {op.sm_budget} > {table.num_sms} SMs")
    ex.build([ops, ops, ops], profiled_batch(table))


def simulate_plan(plan: Plan, table: ProfileTable, mode: Mode | None = None, num_layers: int = 12,
                  layer_ops: list | None = None) -> float:
    """ms per layer in steady state when the executor issues `plan`: per-stream FIFO in issue order,
    each nano-op waiting for the nano-ops the executor makes it depend on; durations from the profile
    at each op's SM budget; while a memory-stream op runs, the compute stream progresses at 1 - phi
    and memory ops take iota x their time (mode's factors; none for stage 1 / sequential)."""
    import torch

    from nanoflow.pipeline.executor import PlanExecutor
    mode = mode or Mode("stage1")
    ops = layer_ops or fake_layer_ops(table)
    ex = PlanExecutor(plan, ops, torch.device("cpu"))
    nodes = ex.build([ops] * num_layers, profiled_batch(table))
    metas = {m["name"]: m for m in table.ops}
    side = {i for i, s in enumerate(plan.streams) if s.name != COMPUTE}
    dur = {}
    for n in nodes:
        t = table.op_time(n.op.name, n.hi - n.lo, n.sm_budget)
        if _slowed(metas[n.op.name]) and mode.kind != "stage1":
            t *= mode.iota
        dur[n] = t
    queues: dict[int, list] = {}
    for n in nodes:
        queues.setdefault(n.stream, []).append(n)
    heads = {s: 0 for s in queues}
    running: dict[int, list] = {}  # stream -> [node, remaining]
    finish: dict = {}
    now = 0.0
    total = len(nodes)
    while len(finish) < total:
        for s, q in queues.items():
            if s in running or heads[s] >= len(q):
                continue
            node = q[heads[s]]
            if all(d in finish for d in node.deps):
                running[s] = [node, dur[node]]
        if not running:
            raise ValueError(f"plan {plan.name!r}: simulation deadlock")
        side_busy = any(s in side for s in running)
        rates = {s: (1.0 - mode.phi if s not in side and side_busy else 1.0) for s in running}
        dt = min(rem / max(rates[s], 1e-9) for s, (node, rem) in running.items())
        now += dt
        for s in list(running):
            running[s][1] -= dt * rates[s]
            if running[s][1] <= 1e-12:
                finish[running[s][0]] = now
                heads[s] += 1
                del running[s]
    last = {}
    for n, t in finish.items():
        last[n.layer] = max(last.get(n.layer, 0.0), t)
    a, b = 2, num_layers - 3
    return (last[b] - last[a]) / (b - a)


# ---- the search ----------------------------------------------------------------------------------
def _loads(table: ProfileTable, cand: Candidate) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in cand.schedule:
        out[e["stream"]] = out.get(e["stream"], 0.0) + e["end_ms"] - e["start_ms"]
    return out


def stage2_modes(table: ProfileTable) -> list[Mode]:
    modes = []
    for kind, budgets in (("free", [None, *table.memory_budgets]), ("shared", list(table.memory_budgets))):
        for b in budgets:
            f = table.interference_factors(kind, b)
            if f is not None:
                modes.append(Mode(kind, b, f[0], f[1]))
    return modes


def search(table: ProfileTable, *, time_limit: float = 10.0, structures=None, idle_threshold: float = 0.02,
           step: int = 128, max_stage2: int = 2, max_seconds: float = 120.0,
           log: Callable[[str], None] | None = None, progress: bool = False) -> list[Candidate]:
    """All candidates, best first (by simulated ms per layer), sequential included.

    Stage 1 (no interference, whole device): 2 nano-ops per op first; when the best such pipeline
    leaves bubbles (its period exceeds the busiest stream's load by more than idle_threshold), the
    finer structures (4 nano-ops on the attention side, then everywhere) are tried too. Stage 2
    re-solves every stage-1 structure for each memory SM budget x {free, shared} whose interference
    was measured. Plans the executor rejects are dropped (logged). Past max_seconds the remaining
    MILPs are skipped (the best structure's settings come first)."""
    say = log or (lambda s: None)
    t_start = time.perf_counter()
    seq = sequential_candidate(table)
    seq.simulated_ms = simulate_plan(SEQUENTIAL, table)
    cands: list[Candidate] = [seq]
    if not table.side_ops() or table.num_decode == 0:
        say("[search] nothing to overlap (no decode rows / memory-stream op): sequential")
        return cands
    if table.timing == "host-clock":
        say("[search] note: host-clock profile (CPU): streams do not run concurrently here, so the "
            "overlap plans are built and checked but cannot beat sequential when run")
    layer_ops = fake_layer_ops(table)
    tried = list(structures or STAGE1_STRUCTURES)
    stage1: list[Candidate] = []

    def run(structure, mode, configs=None) -> Candidate | None:
        cand = solve_structure(table, structure, mode, time_limit=time_limit, step=step, configs=configs)
        if cand is None:
            return None
        try:
            check_plan(cand.plan, table, layer_ops)
            cand.simulated_ms = simulate_plan(cand.plan, table, mode, layer_ops=layer_ops)
        except ValueError as exc:
            say(f"[search] dropped {cand.name}: {exc}")
            return None
        return cand

    for s in tried:
        c = run(s, Mode("stage1"))
        if c:
            stage1.append(c)
    if structures is None and stage1:
        best = min(stage1, key=lambda c: c.predicted_ms)
        bubble = best.predicted_ms / max(_loads(table, best).values()) - 1.0
        say(f"[search] stage 1, {best.structure}: {best.predicted_ms:.4f} ms/layer "
            f"(sequential {seq.predicted_ms:.4f}), bubbles {100 * bubble:.1f}%")
        if bubble > idle_threshold:
            for s in FINER_STRUCTURES:
                if time.perf_counter() - t_start > max_seconds / 3:
                    say("[search] time budget: finer structures skipped")
                    break
                c = run(s, Mode("stage1"))
                if c:
                    stage1.append(c)
                    tried.append(s)
                    say(f"[search] stage 1, {c.structure}: {c.predicted_ms:.4f} ms/layer")
    modes = stage2_modes(table)
    stage2: list[Candidate] = []
    if modes:
        from nanoflow.autosearch.profile import progress_bar
        # Stage 2 for the best stage-1 structures (within 3% of the best; at most max_stage2 of them).
        ranked = sorted(stage1, key=lambda c: c.predicted_ms)
        keep = [tuple(int(v) for v in c.structure.split(".")) for c in ranked
                if c.predicted_ms <= 1.03 * ranked[0].predicted_ms][:max_stage2] if ranked else []
        centers = {tuple(int(v) for v in c.structure.split(".")): c.cuts for c in stage1}
        # Mid-range memory budgets of both kinds first, so a time budget drops the extremes.
        ordered = sorted(modes, key=lambda m: (abs((m.side_budget or 44) - 44), m.kind))
        jobs = [(s, m) for s in keep for m in ordered]
        skipped = 0
        for s, m in progress_bar(jobs, desc="stage 2 MILPs", unit="milp", disable=not progress):
            if time.perf_counter() - t_start > max_seconds:
                skipped += 1
                continue
            c = run(s, m, configs_near(table, centers[s], 1, step))
            if c:
                stage2.append(c)
        say(f"[search] stage 2: {len(stage2)} plans from {len(jobs) - skipped} MILPs "
            f"({len(modes)} SM-share / interference settings)"
            + (f"; {skipped} skipped (time budget {max_seconds:.0f} s)" if skipped else ""))
    else:
        say("[search] stage 2 skipped: no interference measured (stage-1 plans run unrestricted)")
    cands += stage2 if stage2 else stage1
    unique: dict[str, Candidate] = {}
    for c in sorted(cands, key=lambda c: c.score):
        sig = str({k: v for k, v in c.plan.to_dict().items() if k != "name"})
        unique.setdefault(sig, c)
    return sorted(unique.values(), key=lambda c: c.score)


def pick_for_validation(cands: list[Candidate], top_k: int) -> list[Candidate]:
    """The top_k best non-sequential candidates, plus the best of each mode not yet among them when
    it is within 10% of the best (the model's interference is approximate)."""
    auto = [c for c in cands if c.mode != "sequential"]
    chosen = auto[:top_k]
    if auto:
        best = auto[0].score
        for kind in ("shared", "free", "stage1"):
            if any(c.mode == kind for c in chosen):
                continue
            alt = next((c for c in auto if c.mode == kind), None)
            if alt is not None and alt.score <= 1.1 * best:
                chosen.append(alt)
    return chosen
