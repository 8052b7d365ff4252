"""Pipeline plans: how one decoder layer's ops are cut into nano-batches, on which stream each nano-op
runs, its SM budget, and the order nano-ops are issued. Serialised as JSON.

Dependencies are not written in a plan: the executor derives them from data hazards (which rows of
which workspace buffer each nano-op reads and writes), so any plan computes the same function as the
sequential one, and dependencies always point to earlier-issued nano-ops (acyclic by construction).

JSON shape:
{
  "name": "overlap-2",
  "streams": [{"name": "compute"}, {"name": "memory", "priority": -1}],
  "ops": {"decode_attn": {"cuts": [{"of": "decode", "at": 0.5}], "stream": "memory", "sm_budget": 44}},
  "order": ["input_norm.0", "qkv_gemm.0", "o_gemm.1@-1", ...]
}
A cut {"of": "tokens"|"decode"|"prefill", "at": f} splits at fraction f of the dense batch's rows, of
its decode rows, or of its prefill rows; "rows": n instead of "at" is an absolute row count from the
start of that region (plans tuned for one dense batch size). `order` lists every nano-op once as
"op.k"; a suffix "@-1" issues it with the next layer (nano-op k of layer l-1 goes in layer l's slot):
that is how nano-batches of consecutive layers interleave. Ops absent from `ops` are one nano-op on the
first stream; an absent `order` issues op by op.

SM partitions: "sm_split": N with streams {"sms": "split"} / {"sms": "rest"} puts those streams'
kernels on N SMs / the other SMs (one green-context split), so ordinary full-occupancy kernels
overlap on disjoint SMs. "min_attn_share": f runs the plan only on steps where decode attention is
at least that share of the step (estimated); the others run sequentially.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

CUT_REGIONS = ("tokens", "decode", "prefill")
SM_GROUPS = ("all", "split", "rest")


@dataclass(frozen=True)
class Cut:
    of: str
    """Region the cut is measured in: 'tokens' (all rows), 'decode' rows or 'prefill' rows."""
    at: float | None = None
    """Fraction of the region in (0, 1)."""
    rows: int | None = None
    """Or an absolute row count from the region's start."""

    def resolve(self, num_tokens: int, num_decode: int) -> int:
        start, size = {"tokens": (0, num_tokens), "decode": (0, num_decode),
                       "prefill": (num_decode, num_tokens - num_decode)}[self.of]
        offset = round(self.at * size) if self.at is not None else min(self.rows, size)
        return start + offset


@dataclass(frozen=True)
class OpPlan:
    cuts: tuple[Cut, ...] = ()
    """Cut points: len(cuts) + 1 nano-ops."""
    stream: str = ""
    """Stream name ('' = the first stream)."""
    sm_budget: int | None = None
    """SMs (programs) the op's kernels may use; None = unlimited."""

    @property
    def num_nano(self) -> int:
        return len(self.cuts) + 1


@dataclass(frozen=True)
class OrderEntry:
    op: str
    nano: int
    layer_offset: int = 0  # 0 or -1


@dataclass(frozen=True)
class Stream:
    name: str
    priority: int = 0
    """CUDA stream priority: lower is higher priority (-1 = high on current GPUs)."""
    sms: str = "all"
    """SMs its kernels may use: 'all', or a side of the plan's SM split (CUDA green contexts):
    'split' (the plan's sm_split SMs) or 'rest' (the others). Without green contexts (CPU, old
    driver) it is an ordinary stream: the result is the same, only the overlap differs."""


@dataclass(frozen=True)
class Plan:
    name: str
    streams: tuple[Stream, ...]
    ops: dict[str, OpPlan] = field(default_factory=dict)
    order: tuple[OrderEntry, ...] | None = None
    sm_split: int | None = None
    """SMs of the 'split' group when a stream runs on 'split' or 'rest' (the driver rounds it up to
    its granularity, 8 SMs on Hopper)."""
    min_attn_share: float = 0.0
    """Run the plan only on steps whose decode attention is estimated at least this share of the
    step's attention + GEMM time; other steps run sequentially. Overlap pays only where decode
    attention is a large part of the step."""

    def applies(self, attn_share: float) -> bool:
        """Whether a step whose decode attention is this share of it runs under the plan."""
        return attn_share >= self.min_attn_share

    def uses_sm_split(self) -> bool:
        return any(s.sms != "all" for s in self.streams)

    def with_sm_split(self, sms: int) -> "Plan":
        """The plan with its first stream on the SMs left by a green-context split and its other
        streams on `sms` SMs; per-op SM budgets dropped (ordinary kernels fill their partition)."""
        if len(self.streams) < 2:
            raise ValueError(f"plan {self.name!r}: an SM split needs at least two streams")
        streams = tuple(dataclasses.replace(s, sms="rest" if i == 0 else "split")
                        for i, s in enumerate(self.streams))
        ops = {n: dataclasses.replace(o, sm_budget=None) for n, o in self.ops.items()}
        return dataclasses.replace(self, name=f"{self.name}-split{sms}", streams=streams, ops=ops, sm_split=sms)

    def op_plan(self, op_name: str) -> OpPlan:
        return self.ops.get(op_name, OpPlan(stream=self.streams[0].name))

    def issue_order(self, op_names: list[str]) -> list[OrderEntry]:
        if self.order is not None:
            return list(self.order)
        return [OrderEntry(name, k) for name in op_names for k in range(self.op_plan(name).num_nano)]

    def validate(self, op_names: list[str], num_sms: int | None = None) -> None:
        """Raises ValueError naming what is wrong."""
        stream_names = [s.name for s in self.streams]
        if not stream_names or len(set(stream_names)) != len(stream_names):
            raise ValueError(f"plan {self.name!r}: streams must be non-empty and uniquely named")
        for s in self.streams:
            if s.sms not in SM_GROUPS:
                raise ValueError(f"plan {self.name!r}: stream {s.name!r} sms must be one of {SM_GROUPS}, "
                                 f"got {s.sms!r}")
        if self.uses_sm_split() != (self.sm_split is not None):
            raise ValueError(f"plan {self.name!r}: streams on 'split' / 'rest' SMs and sm_split go together "
                             f"(sm_split={self.sm_split})")
        if self.sm_split is not None and (self.sm_split < 1 or (num_sms and self.sm_split >= num_sms)):
            raise ValueError(f"plan {self.name!r}: sm_split {self.sm_split} must leave SMs on both sides "
                             f"(1..{num_sms - 1 if num_sms else 'device SMs - 1'})")
        if not 0.0 <= self.min_attn_share < 1.0:
            raise ValueError(f"plan {self.name!r}: min_attn_share {self.min_attn_share} must be in [0, 1)")
        for name, op in self.ops.items():
            if name not in op_names:
                raise ValueError(f"plan {self.name!r}: unknown op {name!r} (ops: {', '.join(op_names)})")
            if op.stream and op.stream not in stream_names:
                raise ValueError(f"plan {self.name!r}: op {name!r} uses unknown stream {op.stream!r}")
            if op.sm_budget is not None and (op.sm_budget < 1 or (num_sms and op.sm_budget > num_sms)):
                raise ValueError(f"plan {self.name!r}: op {name!r} sm_budget {op.sm_budget} is outside "
                                 f"1..{num_sms or 'device SMs'}")
            _check_cuts(self.name, name, op.cuts)
        if self.order is not None:
            expected = {(n, k) for n in op_names for k in range(self.op_plan(n).num_nano)}
            seen = [(e.op, e.nano) for e in self.order]
            if len(seen) != len(set(seen)) or set(seen) != expected:
                missing, extra = expected - set(seen), set(seen) - expected
                raise ValueError(f"plan {self.name!r}: order must list every nano-op exactly once "
                                 f"(missing {sorted(missing)[:4]}, unknown {sorted(extra)[:4]}, "
                                 f"duplicates: {len(seen) != len(set(seen))})")
            for e in self.order:
                if e.layer_offset not in (0, -1):
                    raise ValueError(f"plan {self.name!r}: layer offset of {e.op}.{e.nano} must be 0 or -1")

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict = {"name": self.name,
                   "streams": [{"name": s.name, "priority": s.priority, **({"sms": s.sms} if s.sms != "all" else {})}
                               for s in self.streams],
                   "ops": {}}
        if self.sm_split is not None:
            d["sm_split"] = self.sm_split
        if self.min_attn_share:
            d["min_attn_share"] = self.min_attn_share
        for name, op in self.ops.items():
            entry: dict = {"stream": op.stream or self.streams[0].name}
            if op.cuts:
                entry["cuts"] = [{"of": c.of, **({"at": c.at} if c.at is not None else {"rows": c.rows})}
                                 for c in op.cuts]
            if op.sm_budget is not None:
                entry["sm_budget"] = op.sm_budget
            d["ops"][name] = entry
        if self.order is not None:
            d["order"] = [f"{e.op}.{e.nano}" + ("@-1" if e.layer_offset else "") for e in self.order]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError("a plan is a JSON object with at least a 'name'")
        streams = tuple(Stream(s["name"], int(s.get("priority", 0)), str(s.get("sms", "all")))
                        for s in d.get("streams", [{"name": "compute"}]))
        ops = {}
        for name, o in d.get("ops", {}).items():
            cuts = tuple(_parse_cut(d["name"], name, c) for c in o.get("cuts", []))
            budget = o.get("sm_budget")
            ops[name] = OpPlan(cuts, o.get("stream", streams[0].name if streams else ""),
                               None if budget is None else int(budget))
        order = None
        if "order" in d:
            order = tuple(_parse_entry(d["name"], e) for e in d["order"])
        split = d.get("sm_split")
        return cls(d["name"], streams, ops, order, None if split is None else int(split),
                   float(d.get("min_attn_share", 0.0)))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"plan file {p} does not exist")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan file {p} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


SEQUENTIAL = Plan("sequential", (Stream("compute"),))


def _parse_cut(plan: str, op: str, c: dict) -> Cut:
    if not isinstance(c, dict) or c.get("of") not in CUT_REGIONS or (("at" in c) == ("rows" in c)):
        raise ValueError(f"plan {plan!r}, op {op!r}: a cut is {{'of': one of {CUT_REGIONS}, "
                         f"'at': fraction}} or {{'of': ..., 'rows': n}}, got {c!r}")
    if "at" in c:
        return Cut(c["of"], at=float(c["at"]))
    return Cut(c["of"], rows=int(c["rows"]))


def _check_cuts(plan: str, op: str, cuts: tuple[Cut, ...]) -> None:
    for c in cuts:
        if c.at is not None and not 0.0 < c.at < 1.0:
            raise ValueError(f"plan {plan!r}, op {op!r}: cut fraction {c.at} must be in (0, 1)")
        if c.rows is not None and c.rows < 1:
            raise ValueError(f"plan {plan!r}, op {op!r}: cut rows {c.rows} must be positive")
    # Cuts must go forward: compare within a region, and regions in batch order (decode before prefill).
    rank = {"decode": 0, "tokens": 1, "prefill": 2}
    keys = [(c.of, c.at if c.at is not None else c.rows) for c in cuts]
    for (r1, v1), (r2, v2) in zip(keys, keys[1:]):
        if r1 == r2 and v2 <= v1:
            raise ValueError(f"plan {plan!r}, op {op!r}: cuts must increase, got {v1} then {v2} in {r1}")
        if r1 != r2 and "tokens" not in (r1, r2) and rank[r2] < rank[r1]:
            raise ValueError(f"plan {plan!r}, op {op!r}: a {r2} cut cannot follow a {r1} cut")


def _parse_entry(plan: str, text: str) -> OrderEntry:
    body, _, offset = str(text).partition("@")
    name, _, k = body.rpartition(".")
    if not name or not k.isdigit() or offset not in ("", "-1"):
        raise ValueError(f"plan {plan!r}: order entry {text!r} must look like 'op.k' or 'op.k@-1'")
    return OrderEntry(name, int(k), -1 if offset else 0)


def load_plan(spec: str) -> Plan:
    """'sequential', a built-in plan name (nanoflow/pipeline/plans/NAME.json), or a JSON file path."""
    if spec == "sequential":
        return SEQUENTIAL
    builtin = Path(__file__).parent / "plans" / f"{spec}.json"
    if builtin.is_file():
        return Plan.load(builtin)
    if Path(spec).is_file():
        return Plan.load(spec)
    names = sorted(p.stem for p in (Path(__file__).parent / "plans").glob("*.json"))
    raise ValueError(f"unknown plan {spec!r}: not 'sequential', a built-in plan ({', '.join(names)}) or a file")
