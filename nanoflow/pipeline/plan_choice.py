"""Per-step plan choice: run a step under the plan only where it is predicted to beat sequential.

With the device's profile (the `nanoflow tune` ProfileTable: each op's ms at row counts and SM
budgets, and the interference measured between decode attention and the compute ops), a step's
time is predicted for both: sequential = the sum of its ops at the step's row counts; the plan = an
event simulation of the executor's own nano-ops and dependencies on a model of SIM_LAYERS layers
(per-stream FIFO in issue order; each nano-op at its SM budget / partition's SMs; while a memory
op runs the compute stream progresses at 1 - phi and memory ops take iota x, the profile's
factors), extended to the model's depth by its steady-state period. Decode attention scales with
the step's mean decode context against the profiled one, prefill attention with its rows.
Decisions are cached per (token bucket, decode bucket, context bucket), so a step costs a lookup.

Without a profile the fixed rates of `FixedRates` rank steps by the decode-attention share and the
plan's min_attn_share decides (said once). The table is duck-typed (op_time, interference_factors,
ops, alone, num_sms, num_decode, num_tokens, workload): pipeline/ does not import autosearch/.
"""
from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass

from nanoflow.pipeline.executor import PlanExecutor, synthetic_batch
from nanoflow.pipeline.ops import Op, Resource, RowScope
from nanoflow.pipeline.plan_feedback import MeasuredChoice

SIM_LAYERS = 8
"""Layers simulated; the rest of the model is extrapolated from the steady period."""
MIN_PREDICTED_GAIN = 0.01
"""The plan runs when predicted at least this much faster than sequential (1%)."""
DECISION_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
                  1280, 1536, 1792, 2048, 2560, 3072, 4096, 6144, 8192, 16384)
"""Buckets of token and decode counts for caching decisions (the upper bound is simulated)."""


@dataclass(frozen=True)
class FixedRates:
    """Rates for ranking steps when no profile exists (H200-like: KV read at ~4 TB/s, GEMMs at
    ~750 TFLOP/s); only their ratio matters."""
    attn_bytes_per_s: float = 4.0e12
    gemm_flops_per_s: float = 7.5e14


@dataclass(frozen=True)
class StepFeatures:
    num_tokens: int
    num_decode: int
    decode_context_tokens: int

    @property
    def mean_context(self) -> float:
        return self.decode_context_tokens / self.num_decode if self.num_decode else 0.0


def _bucket(n: int) -> int:
    i = bisect.bisect_left(DECISION_SIZES, n)
    return DECISION_SIZES[i] if i < len(DECISION_SIZES) else n


def _context_bucket(ctx: float) -> int:
    """Quarter-octave buckets of the mean decode context (its representative: 2 ** (k / 4))."""
    return round(4 * math.log2(max(ctx, 1.0)))


class StepCostModel:
    """Predicted ms of a step from a profile table (module doc)."""

    def __init__(self, table, layer_ops: list[Op], num_layers: int):
        names = [op.name for op in layer_ops]
        missing = [n for n in names if n not in table.alone and _scope(layer_ops, n) == RowScope.ALL]
        if missing:
            raise ValueError(f"the profile does not time op(s) {', '.join(missing)} of this model")
        self.table = table
        self.ops = layer_ops
        self.num_layers = num_layers
        wl = table.workload if isinstance(table.workload, dict) else {}
        self.profile_context = max(1.0, float(wl.get("decode_context") or 1))
        self.profile_prefill = max(0, table.num_tokens - table.num_decode)

    # ---- op times ----
    def op_ms(self, op: Op, rows: int, budget: int | None, f: StepFeatures) -> float:
        if rows <= 0 or op.name not in self.table.alone:
            return 0.0
        if op.scope == RowScope.PREFILL:  # profiled once, on the whole prefill region: linear in rows
            full = self.table.op_time(op.name, max(1, self.profile_prefill), budget)
            return full * rows / max(1, self.profile_prefill)
        ms = self._timed(op, rows, budget)
        if op.scope == RowScope.DECODE:
            ms *= (f.mean_context or self.profile_context) / self.profile_context
        return ms

    def _timed(self, op: Op, rows: int, budget: int | None) -> float:
        """The profile's time at the budget; a budget it did not time: the nearest one it did (or
        the whole device), scaled by the SM ratio: linearly for compute ops, half as much for
        memory-bound ones (a streaming kernel keeps most of its bandwidth on part of the SMs)."""
        table = self.table
        if budget is None or table.has_budget(op.name, budget) or not table.num_sms:
            return table.op_time(op.name, rows, budget)
        timed = [int(k) for k in table.alone.get(op.name, {}) if k != "full"]
        ref = min(timed, key=lambda b: abs(b - budget)) if timed else None
        base = table.op_time(op.name, rows, ref)
        ratio = (ref or table.num_sms) / budget
        if op.resource != Resource.COMPUTE:
            ratio = max(1.0, 1.0 + (ratio - 1.0) / 2) if ratio > 1 else ratio
        return base * ratio

    def sequential_ms(self, f: StepFeatures) -> float:
        rows = {RowScope.ALL: f.num_tokens, RowScope.DECODE: f.num_decode,
                RowScope.PREFILL: f.num_tokens - f.num_decode}
        return self.num_layers * sum(self.op_ms(op, rows[op.scope], None, f) for op in self.ops)

    def attention_share(self, f: StepFeatures) -> float:
        attn = sum(self.op_ms(op, f.num_decode, None, f) for op in self.ops if op.scope == RowScope.DECODE)
        gemm = sum(self.op_ms(op, f.num_tokens, None, f) for op in self.ops
                   if op.resource == Resource.COMPUTE and op.scope == RowScope.ALL)
        return attn / (attn + gemm) if attn + gemm > 0 else 0.0

    # ---- a plan ----
    def _budget(self, ex: PlanExecutor, node) -> int | None:
        if node.sm_budget is not None:
            return node.sm_budget
        split = ex.plan.sm_split
        if split is None:
            return None
        sms = self.table.num_sms or 0
        side = ex.plan.streams[node.stream].sms
        return split if side == "split" else (sms - split if side == "rest" and sms else None)

    def _factors(self, ex: PlanExecutor) -> tuple[float, float]:
        """(iota, phi) of the plan's memory-stream ops next to compute (1, 0 when not measured). A
        green-context split keeps the SMs apart but not HBM: it takes the factors measured with
        compute on the other SMs ('shared') at the split's size."""
        if ex.plan.sm_split is not None:
            return self.table.interference_factors("shared", ex.plan.sm_split) or (1.0, 0.0)
        side_budget, compute_budget = None, False
        for name, o in ex.plan.ops.items():
            if o.sm_budget is None:
                continue
            if _scope(self.ops, name) == RowScope.DECODE:
                side_budget = o.sm_budget
            else:
                compute_budget = True
        factors = self.table.interference_factors("shared" if compute_budget else "free", side_budget)
        return factors or (1.0, 0.0)

    def plan_ms(self, ex: PlanExecutor, f: StepFeatures) -> float:
        ops = [self.ops] * SIM_LAYERS
        prefill = f.num_tokens - f.num_decode
        nodes = ex.build(ops, synthetic_batch(f.num_decode, (prefill,) if prefill else ()))
        iota, phi = self._factors(ex)
        side = {i for i, s in enumerate(ex.plan.streams) if i != 0}
        dur = {}
        for n in nodes:
            t = self.op_ms(n.op, n.hi - n.lo, self._budget(ex, n), f)
            if n.stream in side and n.op.resource == Resource.MEMORY:
                t *= iota
            dur[n] = t
        finish = simulate_nano_ops(nodes, dur, side, phi)
        last: dict[int, float] = {}
        for n, t in finish.items():
            last[n.layer] = max(last.get(n.layer, 0.0), t)
        period = (last[SIM_LAYERS - 2] - last[2]) / (SIM_LAYERS - 4)
        return max(last.values()) + period * (self.num_layers - SIM_LAYERS)


def _scope(ops: list[Op], name: str) -> RowScope:
    return next((op.scope for op in ops if op.name == name), RowScope.ALL)


def simulate_nano_ops(nodes, dur: dict, side: set[int], phi: float) -> dict:
    """Finish time of every nano-op: per-stream FIFO in issue order, each waiting for its deps; while
    an op of a `side` stream runs, the other streams progress at 1 - phi (durations `dur` include any
    slow-down of the side ops themselves). Shared by plan choice and the autosearch's simulation."""
    queues: dict[int, list] = {}
    for n in nodes:
        queues.setdefault(n.stream, []).append(n)
    heads = {s: 0 for s in queues}
    running: dict[int, list] = {}
    finish: dict = {}
    now = 0.0
    while len(finish) < len(nodes):
        for s, q in queues.items():
            if s not in running and heads[s] < len(q) and all(d in finish for d in q[heads[s]].deps):
                running[s] = [q[heads[s]], dur[q[heads[s]]]]
        if not running:
            raise ValueError("plan simulation deadlock")
        side_busy = any(s in side for s in running)
        rates = {s: (1.0 - phi if s not in side and side_busy else 1.0) for s in running}
        dt = min(rem / max(rates[s], 1e-9) for s, (_, rem) in running.items())
        now += dt
        for s in list(running):
            running[s][1] -= dt * rates[s]
            if running[s][1] <= 1e-12:
                finish[running[s][0]] = now
                heads[s] += 1
                del running[s]
    return finish


def decision_key(batch) -> tuple:
    """The bucket a step's decision is cached (and timed) under: token, decode and context buckets."""
    return (_bucket(batch.num_tokens), _bucket(batch.num_decode) if batch.num_decode else 0,
            _context_bucket(batch.decode_context_tokens / batch.num_decode) if batch.num_decode else 0)


class PlanChooser:
    """Whether a step runs under the plan (else sequentially): from the profile when there is one,
    else from the fixed rates and the plan's min_attn_share."""

    def __init__(self, executor: PlanExecutor, cost: StepCostModel | None, fixed_share=None,
                 measured: MeasuredChoice | None = None):
        self.executor = executor
        self.cost = cost
        self.fixed_share = fixed_share
        """Callable(batch) -> decode-attention share at FixedRates (the runner's), without a profile."""
        self.measured = measured
        """Timings that confirm or veto the predicted wins (plan_feedback.py); None: prediction only."""
        self.last_key: tuple | None = None
        """The decision bucket of the last runs_plan() (the key its timing is recorded under)."""
        self._decisions: dict[tuple, bool] = {}
        self.predictions: dict[tuple, tuple[float, float]] = {}
        """(sequential ms, plan ms) per decision bucket (reports)."""
        self._warned = False

    @property
    def uses_profile(self) -> bool:
        return self.cost is not None

    def runs_plan(self, batch) -> bool:
        key = decision_key(batch)
        self.last_key = key
        predicted = self._predicted(batch, key)
        return self.measured.decide(key, predicted) if self.measured is not None else predicted

    def _predicted(self, batch, key: tuple) -> bool:
        if self.cost is None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"plan {self.executor.name!r}: no profile of this device (`nanoflow tune`); steps "
                              f"choose the plan by fixed rates (4 TB/s, 750 TFLOP/s) and min_attn_share "
                              f"{self.executor.plan.min_attn_share}", stacklevel=4)
            return self.executor.plan.applies(self.fixed_share(batch))
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(key)
            self._decisions[key] = decision
        return decision

    def _decide(self, key: tuple) -> bool:
        t, d, c = key
        d = min(d, t)
        f = StepFeatures(t, d, int(d * 2 ** (c / 4)) if d else 0)
        seq = self.cost.sequential_ms(f)
        try:
            plan = self.cost.plan_ms(self.executor, f)
        except (ValueError, KeyError) as exc:  # a shape the model cannot simulate: keep sequential
            warnings.warn(f"plan {self.executor.name!r}: no prediction for {f} ({exc}); sequential", stacklevel=4)
            return False
        self.predictions[key] = (seq, plan)
        return plan < seq * (1.0 - MIN_PREDICTED_GAIN)
