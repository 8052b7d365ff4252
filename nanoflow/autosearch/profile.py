"""The profile NanoFlow's auto-search plans from: workload classes, the synthetic dense batch each is
profiled on, and the `ProfileTable` (JSON) of op times per nano-batch size and SM budget and of the
interference of the memory-bound op with each compute-stream op, which the search (layout.py,
milp.py, search.py) reads. The measuring code (timers, profile_engine) is in profiler.py."""
from __future__ import annotations

import bisect
import contextlib
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

PROFILE_FORMAT = 1
MIXED = "mixed"
"""Workload class used when the workload is not known in advance (serving)."""
DEFAULT_MEMORY_BUDGETS = (16, 24, 32, 44, 56, 64)
"""SM budgets tried for the memory-stream op (decode attention); compute ops get the rest."""
QUICK_MEMORY_BUDGETS = (32, 44, 64)


def progress_bar(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", disable: bool = False):
    """tqdm on stderr; refreshed at most every 10 s when stderr is not a terminal (a log file or a
    captured run keeps a few lines per bar, not thousands of carriage-return updates)."""
    import sys

    from tqdm.auto import tqdm
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True,
                mininterval=0.2 if tty else 10.0, file=sys.stderr)


# ---- workload classes ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkloadClass:
    """The shape of the dense batch a plan is tuned for."""
    name: str
    """Cache key part: 'mixed', or 'decNN-ctxC' (decode share of the batch in %, mean decode context)."""
    spec: str
    """The workload it was derived from (a --workload spec, 'mixed', or 'custom')."""
    num_decode: int
    """Decode rows (requests with one new token)."""
    num_prefill_tokens: int
    """Prefill rows (chunks of prompts)."""
    decode_context: int
    """Mean context length (cached tokens + the new one) of a decode request."""
    prefill_chunk: int
    """Tokens per prefill chunk (the last chunk may be shorter)."""
    prefill_context: int = 0
    """Tokens already cached before a prefill chunk."""

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.num_prefill_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorkloadClass":
        return cls(**{k: d[k] for k in ("name", "spec", "num_decode", "num_prefill_tokens", "decode_context",
                                         "prefill_chunk", "prefill_context") if k in d})

    def describe(self) -> str:
        return (f"{self.name}: {self.num_tokens} tokens = {self.num_decode} decode (mean context "
                f"{self.decode_context}) + {self.num_prefill_tokens} prefill (chunks of {self.prefill_chunk})")


def class_name(num_decode: int, num_prefill: int, context: int) -> str:
    total = max(1, num_decode + num_prefill)
    pct = int(round(100 * num_decode / total / 5) * 5)
    bucket = 2 ** round(math.log2(max(1, context)))
    return f"dec{pct:02d}-ctx{bucket}"


def workload_class_for(spec: str, token_budget: int, *, kv_capacity_tokens: int, max_num_seqs: int,
                       max_model_len: int, admission_ratio: float = 1.0, decode_fraction: float | None = None,
                       context: int | None = None, trace_dir: str | None = None) -> WorkloadClass:
    """The steady-state dense batch of a workload: requests running at once are bounded by
    max_num_seqs and by the KV cache (admission by projected peak, prompt + output); per step every
    running request decodes one token, and prefill fills what finishing requests free (a request's
    prompt per output length), up to the token budget. 'mixed' is half decode (context 1024), half
    prefill (chunks of 512). decode_fraction / context override the derived values (the batch is then
    filled to the token budget)."""
    spec = (spec or MIXED).strip()
    if spec == MIXED:
        n_in, n_out = 512, 512
    else:
        from nanoflow.bench.workloads import filter_rows, load_trace, parse_workload
        wl = parse_workload(spec, trace_dir)
        if wl.kind == "constant":
            n_in, n_out = wl.input_len, wl.output_len
        else:
            rows = load_trace(wl.path)
            kept = filter_rows(rows, max_model_len)
            if not kept:
                raise ValueError(f"workload {spec!r}: no trace row fits max_model_len {max_model_len}")
            n_in = max(1, round(statistics.fmean(rows.input_lens[i] for i in kept)))
            n_out = max(1, round(statistics.fmean(rows.output_lens[i] for i in kept)))
    budget = token_budget
    if spec == MIXED and decode_fraction is None:
        decode_fraction = 0.5
    if decode_fraction is not None:
        if not 0.0 <= decode_fraction <= 1.0:
            raise ValueError(f"decode fraction must be in [0, 1], got {decode_fraction}")
        num_decode = min(round(decode_fraction * budget), max_num_seqs)
        num_prefill = budget - num_decode if decode_fraction < 1.0 else 0
        ctx = context or min(1024, max(2, max_model_len // 2))
        chunk = min(512, max(1, num_prefill))
    else:
        running = min(max_num_seqs, int(admission_ratio * kv_capacity_tokens // max(1, n_in + n_out)))
        budget_bound = running >= budget * n_out // (n_in + n_out)
        num_decode = max(1, min(running, budget * n_out // (n_in + n_out)))
        num_prefill = budget - num_decode if budget_bound else \
            max(0, min(budget - num_decode, round(num_decode * n_in / n_out)))
        ctx = context or (n_in + n_out // 2)
        chunk = max(1, min(n_in, num_prefill or n_in))
    ctx = max(2, min(ctx, max_model_len - 1))
    # The synthetic batch must fit the KV cache (contexts spread to 1.5x the mean, block rounding).
    room = int(0.9 * kv_capacity_tokens) - num_prefill * 2
    if num_decode and num_decode * (ctx + 16) > room:
        ctx = max(2, room // num_decode - 16)
        if ctx < 16:
            num_decode = max(1, room // 64)
            ctx = 32
    name = MIXED if spec == MIXED and context is None else class_name(num_decode, num_prefill, ctx)
    return WorkloadClass(name, spec, int(num_decode), int(num_prefill), int(ctx), int(chunk), 0)


def workload_class_for_engine(engine, spec: str, **overrides) -> WorkloadClass:
    kv = engine.kv
    sched = engine.scheduler.config
    return workload_class_for(spec, sched.token_budget, kv_capacity_tokens=kv.pool.num_blocks * kv.block_size,
                              max_num_seqs=sched.max_num_seqs, max_model_len=engine.max_model_len,
                              admission_ratio=sched.kv_admission_ratio, **overrides)


# ---- the synthetic dense batch -------------------------------------------------------------------
@contextlib.contextmanager
def dense_batch(engine, wl: WorkloadClass, seed: int = 0) -> Iterator:
    """A ForwardBatch of `wl` on the engine's device: fake requests with KV blocks allocated from the
    engine's pool (freed on exit), decode requests first (contexts spread over 0.5x..1.5x the mean,
    shuffled), then prefill chunks."""
    import numpy as np

    from nanoflow.engine.request import Request
    from nanoflow.engine.scheduler import SchedulerOutput
    from nanoflow.sampling_params import SamplingParams

    if wl.num_tokens > engine.scheduler.config.token_budget:
        raise ValueError(f"the synthetic batch has {wl.num_tokens} tokens, more than the engine's token "
                         f"budget {engine.scheduler.config.token_budget}")
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    limit = engine.max_model_len - 1
    d = wl.num_decode
    spread = np.linspace(0.5, 1.5, d) if d > 1 else np.ones(max(d, 0))
    contexts = np.clip(np.round(spread * wl.decode_context), 2, limit).astype(int)
    rng.shuffle(contexts)
    longest = int(max(contexts.max(initial=2), wl.prefill_context + wl.prefill_chunk, 2))
    base = rng.integers(10, max(11, vocab - 10), size=longest + 1).tolist()
    params = SamplingParams(max_tokens=1)
    scheduled, ids = [], []
    try:
        for i, ctx in enumerate(contexts.tolist()):
            req = Request(f"__nanoflow_profile_d{i}", base[:ctx], params, 1, i)
            req.num_computed_tokens = ctx - 1
            _allocate(engine, req.request_id, ctx, ids)
            scheduled.append((req, 1))
        left, j = wl.num_prefill_tokens, 0
        while left > 0:
            n = min(wl.prefill_chunk, left)
            req = Request(f"__nanoflow_profile_p{j}", base[:wl.prefill_context + n], params, 1, d + j)
            req.num_computed_tokens = wl.prefill_context
            _allocate(engine, req.request_id, wl.prefill_context + n, ids)
            scheduled.append((req, n))
            left -= n
            j += 1
        batch = engine.runner.build_batch(SchedulerOutput(scheduled=scheduled, num_decode=d))
        yield batch
    finally:
        for rid in ids:
            engine.kv.free(rid)


def _allocate(engine, rid: str, tokens: int, ids: list[str]) -> None:
    if engine.kv.allocate(rid, tokens) is None:
        raise ValueError(f"the KV cache ({engine.kv.pool.num_blocks} blocks of {engine.kv.block_size}) is too "
                         f"small for the profiling batch: lower the context (--context) or the token budget")
    ids.append(rid)


# ---- the table -----------------------------------------------------------------------------------
def budget_key(budget: int | None) -> str:
    return "full" if budget is None else str(int(budget))


@dataclass
class ProfileTable:
    """Op times of one layer for nano-batch sizes and SM budgets, plus measured interference."""
    device: str
    """Device name (torch.cuda.get_device_name, or 'cpu')."""
    num_sms: int | None
    """Streaming multiprocessors of the device (None on CPU)."""
    torch_version: str
    triton_version: str | None
    model: dict
    """ModelConfig fields."""
    dtype: str
    tp: int
    dense_batch: int
    """The engine's token budget (cache key)."""
    workload: dict
    """WorkloadClass of the profiled batch."""
    num_tokens: int
    num_decode: int
    prefill_chunks: list[int]
    """Rows of each prefill chunk (in batch order)."""
    ops: list[dict]
    """The layer's ops in order: name, resource, scope, reads, writes."""
    memory_budgets: list[int]
    """SM budgets profiled for memory-stream ops."""
    compute_budgets: list[int]
    """SM budgets profiled for compute ops (num_sms minus a memory budget)."""
    alone: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """op -> budget ('full' or SMs) -> rows -> ms (the op alone)."""
    interference: list[dict] = field(default_factory=list)
    """Pair runs: side op at side_budget on a high-priority stream, launched first, with comp_reps
    calls of comp_op (at comp_budget) on another stream: times alone and together."""
    timing: str = "cuda-events"
    created: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    format: int = PROFILE_FORMAT

    # ---- JSON ----
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProfileTable":
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"profile format {d.get('format')!r} is not {PROFILE_FORMAT}: profile again")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ProfileTable":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"profile file {p} does not exist")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile file {p} is not valid JSON: {exc}") from exc

    # ---- queries ----
    @property
    def workload_class(self) -> WorkloadClass:
        return WorkloadClass.from_dict(self.workload)

    @property
    def num_prefill(self) -> int:
        return self.num_tokens - self.num_decode

    def op(self, name: str) -> dict:
        return next(o for o in self.ops if o["name"] == name)

    def has_budget(self, op: str, budget: int | None) -> bool:
        return budget_key(budget) in self.alone.get(op, {})

    def op_time(self, op: str, rows: int, budget: int | None = None) -> float:
        """ms of `op` on `rows` rows at an SM budget: piecewise linear between profiled sizes, flat
        below the smallest (small nano-batches are no cheaper than that), proportional above the
        largest. A budget not profiled for the op (e.g. norms) reads the full-device time."""
        if rows <= 0:
            return 0.0
        table = self.alone.get(op)
        if not table:
            raise KeyError(f"op {op!r} was not profiled")
        series = table.get(budget_key(budget)) or table.get("full") or {}
        if not series:  # the op's region (decode / prefill rows) is empty in the profiled batch
            return 0.0
        pts = sorted((int(k), v) for k, v in series.items())
        sizes = [p[0] for p in pts]
        if rows <= sizes[0]:
            return pts[0][1]
        if rows >= sizes[-1]:
            return pts[-1][1] * rows / sizes[-1]
        i = bisect.bisect_left(sizes, rows)
        (s0, t0), (s1, t1) = pts[i - 1], pts[i]
        return t0 + (t1 - t0) * (rows - s0) / (s1 - s0)

    def interference_factors(self, mode: str, side_budget: int | None) -> tuple[float, float] | None:
        """(iota, phi) for a memory op at side_budget next to compute ops in `mode` ('free': compute
        ops on the whole device; 'shared': compute ops on num_sms - side_budget SMs): the memory op
        takes iota x its alone time, and the compute stream loses phi ms of progress per ms the memory
        op runs (time-weighted over compute ops). None when not measured."""
        recs = [r for r in self.interference if r["mode"] == mode and r["side_budget"] == side_budget]
        if not recs:
            return None
        iota = statistics.median(r["side_ms"] / r["side_alone_ms"] for r in recs if r["side_alone_ms"] > 0)
        weights = {r["comp_op"]: self.op_time(r["comp_op"], self._full_rows(self.op(r["comp_op"]))) for r in recs}
        total = sum(weights.values()) or 1.0
        phi = sum(weights[r["comp_op"]] * _phi(r) for r in recs) / total
        return max(1.0, iota), min(max(phi, 0.0), 1.0)

    def summary(self) -> str:
        lines = [f"profile: {self.device} ({self.num_sms or '-'} SMs), torch {self.torch_version}, "
                 f"triton {self.triton_version or '-'}, {self.model.get('architecture')} hidden "
                 f"{self.model.get('hidden_size')} ffn {self.model.get('intermediate_size')}, {self.dtype}, "
                 f"token budget {self.dense_batch}, {self.timing}, {self.seconds:.1f} s",
                 f"batch: {WorkloadClass.from_dict(self.workload).describe()}",
                 f"{'op (whole batch)':<18}{'class':>8}{'rows':>6}{'ms, all SMs':>12}   ms at an SM budget"]
        total = 0.0
        for o in self.ops:
            rows = self._full_rows(o)
            full = self.op_time(o["name"], rows)
            total += full
            side = o["name"] in self.side_ops()
            budgets = self.memory_budgets if side else self.compute_budgets if o["resource"] == "compute" else []
            cells = "  ".join(f"{b}:{self.op_time(o['name'], rows, b):.4f}" for b in budgets
                              if self.has_budget(o["name"], b))
            lines.append(f"{o['name']:<18}{o['resource']:>8}{rows:>6}{full:>12.4f}   {cells}")
        lines.append(f"{'layer, sequential':<32}{total:>12.4f}")
        for mode in ("free", "shared"):
            for b in [None, *self.memory_budgets]:
                f = self.interference_factors(mode, b)
                if f:
                    lines.append(f"interference {mode:<6} memory op on {budget_key(b):>4} SMs: it takes {f[0]:.2f}x "
                                 f"its alone time; compute stream loses {f[1]:.2f} ms per ms of overlap")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def side_ops(self) -> list[str]:
        return [o["name"] for o in self.ops if is_side_op(o)]

    def _full_rows(self, o: dict) -> int:
        return {"decode": self.num_decode, "prefill": self.num_prefill}.get(o["scope"], self.num_tokens)


def _phi(r: dict) -> float:
    """Compute-stream progress lost per ms of overlap with the memory op."""
    window = min(r["side_ms"], r["comp_ms"])
    if window <= 0:
        return 0.0
    return (r["comp_ms"] - r["comp_reps"] * r["comp_alone_ms"]) / window


def is_side_op(o: dict) -> bool:
    """Ops that get their own stream: memory-bound decode-scope ops (decode attention), network ops."""
    return (o["resource"] == "memory" and o["scope"] == "decode") or o["resource"] == "network"


def op_meta(op) -> dict:
    return {"name": op.name, "resource": op.resource.value, "scope": op.scope.value,
            "reads": list(op.reads), "writes": list(op.writes)}


# ---- grids ---------------------------------------------------------------------------------------
def size_grid(total: int, specials: list[int], step: int) -> list[int]:
    """Multiples of `step` up to total, plus the special sizes; sizes closer than 8 rows merged."""
    raw = sorted({s for s in [*range(step, total + 1, step), total, *specials] if 0 < s <= total})
    out: list[int] = []
    for s in raw:
        if out and s - out[-1] < 8:
            if s == total:
                out[-1] = s
            continue
        out.append(s)
    return out


def token_sizes(T: int, D: int, step: int) -> list[int]:
    P = T - D
    specials = [D, P, D // 2, D // 4, (3 * D) // 4, D // 8, P // 2, P // 4, T - D // 2, T - D // 4]
    return size_grid(T, specials, step)


def decode_sizes(D: int, step: int) -> list[int]:
    return size_grid(D, [D // 8, D // 4, (3 * D) // 8, D // 2, (5 * D) // 8, (3 * D) // 4, (7 * D) // 8], step)
