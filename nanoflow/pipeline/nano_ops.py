"""Nano-ops, the row layouts they are cut against, their data hazards, and the issue program.

A *layout* says how many rows the step has, where decode rows end, and which rows each op touches:
- `BatchRows`: an eager step; exact rows (decode ops clipped to the batch's decode rows, prefill
  ops cut at request bounds).
- `GraphShape`: a CUDA-graph step, captured once for every batch of its shape: `num_tokens` padded
  rows whose decode count lies in (decode_lo, decode_hi]. Decode ops are declared on rows below
  decode_hi, prefill ops on rows from decode_lo: a superset of what they touch, since the kernels
  find the real split on the device (StepState.device_rows). Decode and prefill ops then declare
  overlapping rows of `attn_out`; they never write the same row (a row is a decode row or a
  prefill row), so the hazards skip write-after-write between them and keep both as producers.
Dependencies derived from declared rows are conservative, so every layout computes the sequential
plan's function.

The *program* of a layout is what the executor issues: nano-ops grouped in segments (consecutive
nano-ops of one stream between cross-stream waits), with the events each records and waits for. It
is built once per layout and cached (PlanExecutor.program), so a step's host work does not depend on
the plan's hazard tracking or on the batch beyond its shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nanoflow.pipeline.ops import Op, RowScope


@dataclass(eq=False)
class NanoOp:
    layer: int
    op: Op
    op_pos: int
    """Index of the op in its layer's op list."""
    op_offset: int
    """0, or -1 when issued with the next layer (the plan's '@-1')."""
    lo: int
    hi: int
    stream: int
    sm_budget: int | None
    deps: list["NanoOp"] = field(default_factory=list)
    cross_deps: list[tuple[int, int]] = field(default_factory=list)
    """Dependencies on other streams, as (round delta, position in that round): the latest per stream."""
    needs_event: bool = False
    index: int = 0


def op_rows(op: Op, lo: int, hi: int, batch) -> tuple[int, int]:
    """The rows a nano-op really touches: clipped to its scope; prefill cut at request bounds."""
    if op.scope == RowScope.DECODE:
        return lo, min(hi, batch.num_decode)
    if op.scope == RowScope.PREFILL:
        r0, r1 = batch.prefill_request_range(lo, hi)
        starts = batch.query_start_loc_cpu
        return starts[r0], starts[r1]
    return lo, hi


class BatchRows:
    """Layout of an eager step: the batch's exact rows."""

    def __init__(self, batch):
        self.batch = batch
        self.num_tokens = batch.num_tokens
        self.num_decode = batch.num_decode
        """Cuts resolve against these."""

    def rows(self, op: Op, lo: int, hi: int) -> tuple[int, int]:
        return op_rows(op, lo, hi, self.batch)


@dataclass(frozen=True)
class GraphShape:
    """Layout of a CUDA-graph step: every batch of `num_tokens` rows or fewer whose decode count d
    has decode_lo < d <= decode_hi (d == 0 when decode_hi == 0)."""

    num_tokens: int
    decode_lo: int
    decode_hi: int

    def __post_init__(self):
        if not 0 <= self.decode_lo <= self.decode_hi <= self.num_tokens or self.num_tokens < 1:
            raise ValueError(f"bad graph shape {self}")

    @property
    def num_decode(self) -> int:
        return self.decode_hi  # cuts of the decode region resolve against its upper bound

    def rows(self, op: Op, lo: int, hi: int) -> tuple[int, int]:
        if op.scope == RowScope.DECODE:
            return lo, min(hi, self.decode_hi)
        if op.scope == RowScope.PREFILL:
            return max(lo, self.decode_lo), hi
        return lo, hi

    def holds(self, num_tokens: int, num_decode: int) -> bool:
        """Whether a batch of this many rows / decode rows runs in this shape."""
        if num_tokens > self.num_tokens or num_decode > num_tokens:
            return False
        if self.decode_hi == 0:
            return num_decode == 0
        return self.decode_lo < num_decode <= self.decode_hi or (self.decode_lo == 0 and num_decode == 0)


def expected_producers(ops: list[Op]) -> dict[tuple[int, str], list[tuple[int, int]]]:
    """For each (op index, buffer it reads): the ops that produce those rows, as (op index, layer
    delta): walking back through the layer (wrapping into the previous layer) until an op that writes
    the buffer on all rows. E.g. o_gemm's attn_out comes from prefill_attn and decode_attn."""
    out = {}
    n = len(ops)
    for j, op in enumerate(ops):
        for buf in op.reads:
            found = []
            for back in range(1, n + 1):
                i = (j - back) % n
                if buf in ops[i].writes:
                    found.append((i, 0 if j - back >= 0 else -1))
                    if ops[i].scope == RowScope.ALL:
                        break
            out[(j, buf)] = found
    return out


def disjoint_scopes(a: Op, b: Op) -> bool:
    """Ops that never touch the same row whatever rows they declare: decode vs prefill."""
    return {a.scope, b.scope} == {RowScope.DECODE, RowScope.PREFILL}


class Hazards:
    """Per buffer: which nano-op last wrote, and which read since, each row range (disjoint segments:
    a later writer trims what it overwrote; a decode and a prefill writer keep each other, see the
    module doc). Also checks that every read sees the model's data flow (a plan whose order reads
    rows before they are produced is rejected)."""

    def __init__(self, op_index: dict[str, int], producers: dict[tuple[int, str], list[tuple[int, int]]]):
        self.op_index = op_index
        self.producers = producers
        self.writers: dict[str, list[tuple[int, int, NanoOp]]] = {}
        self.readers: dict[str, list[tuple[int, int, NanoOp]]] = {}

    def add(self, node: NanoOp) -> None:
        lo, hi = node.lo, node.hi
        deps = set()
        j = self.op_index[node.op.name]
        for buf in node.op.reads:
            sources = [(a, b, n) for a, b, n in self.writers.get(buf, ()) if a < hi and lo < b]
            self._check_source(node, j, buf, sources)
            deps.update(n for _, _, n in sources)
        kept_readers = set()
        for buf in node.op.writes:
            overlapping = [(a, b, n) for a, b, n in self.writers.get(buf, ()) if a < hi and lo < b]
            deps.update(n for _, _, n in overlapping if not disjoint_scopes(node.op, n.op))
            deps.update(n for a, b, n in self.readers.get(buf, ()) if a < hi and lo < b)
            if any(disjoint_scopes(node.op, n.op) for _, _, n in overlapping):
                kept_readers.add(buf)  # a later writer may not depend on this one: it must see them
        for buf in node.op.reads:
            self.readers.setdefault(buf, []).append((lo, hi, node))
        for buf in node.op.writes:  # what this node overwrote is now reached through it
            segs = self.writers.get(buf, [])
            keep = [s for s in segs if disjoint_scopes(node.op, s[2].op)]
            trim = [s for s in segs if not disjoint_scopes(node.op, s[2].op)]
            self.writers[buf] = _trim(trim, lo, hi) + keep + [(lo, hi, node)]
            if buf not in kept_readers:
                self.readers[buf] = _trim(self.readers.get(buf, []), lo, hi)
        deps.discard(node)
        node.deps = sorted(deps, key=lambda n: n.index)

    def _check_source(self, node: NanoOp, j: int, buf: str, sources) -> None:
        expected = {(i, node.layer + delta) for i, delta in self.producers[(j, buf)] if node.layer + delta >= 0}
        got = {(self.op_index[n.op.name], n.layer) for _, _, n in sources}
        covered = _union_length([(max(a, node.lo), min(b, node.hi)) for a, b, _ in sources])
        if not got <= expected or (expected and covered != node.hi - node.lo):
            raise ValueError(
                f"plan order issues {node.op.name} (layer {node.layer}, rows {node.lo}:{node.hi}) before "
                f"all of its input {buf!r} is produced by this step")


def _union_length(spans: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _trim(segments: list[tuple[int, int, NanoOp]], lo: int, hi: int) -> list[tuple[int, int, NanoOp]]:
    """The parts of the segments outside lo:hi."""
    out = []
    for a, b, n in segments:
        if a < lo:
            out.append((a, min(b, lo), n))
        if b > hi:
            out.append((max(a, hi), b, n))
    return out


def mark_cross_stream(nodes: list[NanoOp]) -> None:
    """Cross-stream waits: per source stream only the latest dependency (same-stream order covers
    the earlier ones), addressed by (round delta, position in round)."""
    position: dict[NanoOp, tuple[int, int]] = {}
    counts: dict[int, int] = {}
    for node in nodes:
        r = node.layer - node.op_offset
        position[node] = (r, counts.get(r, 0))
        counts[r] = counts.get(r, 0) + 1
    for node in nodes:
        latest: dict[int, NanoOp] = {}
        for dep in node.deps:
            if dep.stream != node.stream and (dep.stream not in latest or dep.index > latest[dep.stream].index):
                latest[dep.stream] = dep
        r = position[node][0]
        node.cross_deps = []
        for dep in latest.values():
            dep.needs_event = True
            dr, pos = position[dep]
            node.cross_deps.append((dr - r, pos))


@dataclass
class Segment:
    """Consecutive nano-ops of one stream: wait for `waits`, issue `nodes`, then record `record`."""
    stream: int
    nodes: list[NanoOp]
    waits: list[int]
    """Event ids recorded by earlier segments of other streams."""
    record: int = -1
    """Event id recorded after the last nano-op (-1: none)."""


@dataclass
class Program:
    """A layout's issue program: nano-ops by round (for inspection) and the segments issued."""
    rounds: list[list[NanoOp]]
    segments: list[Segment]
    num_events: int
    events: list = field(default_factory=list)
    """CUDA events of the program (made on first use, reused every step)."""

    @property
    def num_nodes(self) -> int:
        return sum(len(s.nodes) for s in self.segments)


def make_program(rounds: list[list[NanoOp]]) -> Program:
    """Segments of the rounds: a new one wherever the stream changes or a nano-op waits for another
    stream; one ends after every nano-op another stream waits for (its event is recorded there)."""
    flat_index: dict[tuple[int, int], int] = {}
    flat: list[tuple[int, NanoOp]] = []
    for r, nodes in enumerate(rounds):
        for pos, node in enumerate(nodes):
            flat_index[(r, pos)] = len(flat)
            flat.append((r, node))
    event_of: dict[int, int] = {}
    for i, (_, node) in enumerate(flat):
        if node.needs_event:
            event_of[i] = len(event_of)
    segments: list[Segment] = []
    current: Segment | None = None
    for i, (r, node) in enumerate(flat):
        waits = [event_of[flat_index[(r + dr, pos)]] for dr, pos in node.cross_deps]
        if current is None or current.stream != node.stream or waits:
            current = Segment(node.stream, [], waits)
            segments.append(current)
        current.nodes.append(node)
        if node.needs_event:
            current.record = event_of[i]
            current = None
    return Program(rounds, segments, len(event_of))
