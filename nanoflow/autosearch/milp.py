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

This module holds the MILP and turns its solution into a Plan; layout.py the segments, units and
durations it schedules; search.py the two stages, the checks and the simulation.
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from nanoflow.autosearch.layout import (COMPUTE, Candidate, Mode, Segment, Unit, _edges, boundary_points,
                                        op_duration, segments_for, unit_duration, unit_rows)
from nanoflow.pipeline.profile_table import ProfileTable
from nanoflow.pipeline.plan import Cut, OpPlan, OrderEntry, Plan, Stream


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
