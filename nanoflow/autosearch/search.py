"""The two-stage pipeline search (stage logic over milp.solve_structure), the sequential baseline, and
the checks every candidate passes: the executor's validation and an event simulation of its plan."""
from __future__ import annotations

import time
from typing import Callable

from nanoflow.autosearch.layout import COMPUTE, FINER_STRUCTURES, STAGE1_STRUCTURES, Candidate, Mode, _slowed
from nanoflow.autosearch.milp import configs_near, solve_structure
from nanoflow.pipeline.profile_table import ProfileTable
from nanoflow.pipeline.plan import SEQUENTIAL, Plan
from nanoflow.pipeline.plan_choice import simulate_nano_ops


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
    try:
        finish = simulate_nano_ops(nodes, dur, side, mode.phi)
    except ValueError as exc:
        raise ValueError(f"plan {plan.name!r}: {exc}") from None
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
