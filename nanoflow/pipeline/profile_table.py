"""The ProfileTable (JSON) `nanoflow tune` measures: op times of one layer per nano-batch size and SM
budget, and the interference of the memory-bound op with each compute-stream op. Plan choice
(pipeline/plan_choice.py) and the search (autosearch/) read it; autosearch/profiler.py measures it."""
from __future__ import annotations

import bisect
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanoflow.pipeline.workload_class import WorkloadClass

PROFILE_FORMAT = 1


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

