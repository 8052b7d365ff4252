"""Runs the decoder layers under a plan: nano-ops issued in the plan's order on their streams, with
events only where a nano-op depends on one from another stream. Dependencies come from data hazards
(read-after-write, write-after-read, write-after-write on overlapping rows of a workspace buffer), so
every plan computes what the sequential one computes. On CPU the same nano-ops run in issue order."""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field

import torch

from nanoflow.pipeline.ops import Op, RowScope
from nanoflow.pipeline import sm_partition
from nanoflow.pipeline.plan import SEQUENTIAL, Plan
from nanoflow.pipeline.plan_fold import fold_plan


TEMPLATE_LAYERS = 5
"""Layers whose hazards are tracked each step; deeper models replicate the generic round."""


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


class _Hazards:
    """Per buffer: which nano-op last wrote, and which read since, each row range (disjoint segments:
    a later writer trims what it overwrote). Also checks that every read sees the model's data flow
    (a plan whose order reads rows before they are produced is rejected)."""

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
        for buf in node.op.writes:
            deps.update(n for a, b, n in self.writers.get(buf, ()) if a < hi and lo < b)
            deps.update(n for a, b, n in self.readers.get(buf, ()) if a < hi and lo < b)
        for buf in node.op.reads:
            self.readers.setdefault(buf, []).append((lo, hi, node))
        for buf in node.op.writes:  # what this node overwrote is now reached through it
            self.writers[buf] = _trim(self.writers.get(buf, []), lo, hi) + [(lo, hi, node)]
            self.readers[buf] = _trim(self.readers.get(buf, []), lo, hi)
        deps.discard(node)
        node.deps = sorted(deps, key=lambda n: n.index)

    def _check_source(self, node: NanoOp, j: int, buf: str, sources) -> None:
        expected = {(i, node.layer + delta) for i, delta in self.producers[(j, buf)] if node.layer + delta >= 0}
        got = {(self.op_index[n.op.name], n.layer) for _, _, n in sources}
        covered = sum(min(b, node.hi) - max(a, node.lo) for a, b, _ in sources)
        if not got <= expected or (expected and covered != node.hi - node.lo):
            raise ValueError(
                f"plan order issues {node.op.name} (layer {node.layer}, rows {node.lo}:{node.hi}) before "
                f"all of its input {buf!r} is produced by this step")


def _trim(segments: list[tuple[int, int, NanoOp]], lo: int, hi: int) -> list[tuple[int, int, NanoOp]]:
    """The parts of the segments outside lo:hi."""
    out = []
    for a, b, n in segments:
        if a < lo:
            out.append((a, min(b, lo), n))
        if b > hi:
            out.append((max(a, hi), b, n))
    return out


class PlanExecutor:
    """Issues every layer's nano-ops for one step. Streams are created once, on the model's device."""

    def __init__(self, plan: Plan, layer_ops: list[Op], device: torch.device):
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
        op_names = [op.name for op in layer_ops]
        plan = fold_plan(plan, layer_ops)  # dense-layer plans on a layer with a MoE block
        plan.validate(op_names, num_sms)
        self.plan = plan
        self.name = plan.name
        self.device = device
        self.stream_index = {s.name: i for i, s in enumerate(plan.streams)}
        self.partition: sm_partition.SmPartition | None = None
        self.streams: list[torch.cuda.Stream | None] | None = None
        if device.type == "cuda":
            self.streams = self._make_streams(plan, device)
        self.order = plan.issue_order(op_names)
        self.record_timeline = False
        """When set, the next runs time every nano-op (CUDA events / host clock): see timeline()."""
        self._timeline: list[tuple[NanoOp, object, object]] = []
        # Reject an order that breaks the data flow now, not mid-serving: try it on a small batch.
        self.build([layer_ops, layer_ops, layer_ops], synthetic_batch())

    def _make_streams(self, plan: Plan, device: torch.device) -> list[torch.cuda.Stream | None]:
        """None (the caller's stream) for the first stream on all SMs; a partition's stream for a
        stream on 'split' / 'rest' SMs; a new stream with its priority otherwise."""
        if plan.uses_sm_split():
            if sm_partition.available(device):
                prio = {s.sms: s.priority for s in plan.streams if s.sms != "all"}
                self.partition = sm_partition.split_sms(device, plan.sm_split,
                                                        (prio.get("split", 0), prio.get("rest", 0)))
            else:
                warnings.warn(f"plan {plan.name!r}: no CUDA green contexts here (cuda-python missing or "
                              "too old); its streams share all SMs", stacklevel=3)
        streams = []
        for i, s in enumerate(plan.streams):
            if self.partition is not None and s.sms != "all":
                streams.append(self.partition.streams[0 if s.sms == "split" else 1])
            elif i == 0:
                streams.append(None)
            else:
                streams.append(torch.cuda.Stream(device=device, priority=s.priority))
        return streams

    def is_sequential(self) -> bool:
        return len(self.plan.streams) == 1 and all(
            not o.cuts and o.sm_budget is None for o in self.plan.ops.values()) and (
            self.plan.order is None and not self.plan.uses_sm_split())

    def build(self, layers_ops: list[list[Op]], batch) -> list[NanoOp]:
        """The step's nano-ops in issue order, with their cross-stream dependencies."""
        t, d = batch.num_tokens, batch.num_decode
        by_name = {op.name: i for i, op in enumerate(layers_ops[0])}
        producers = expected_producers(layers_ops[0])
        ranges = {}
        for name in by_name:
            op_plan = self.plan.op_plan(name)
            bounds = [0] + [min(max(c.resolve(t, d), 0), t) for c in op_plan.cuts] + [t]
            ranges[name] = [(bounds[k], max(bounds[k], bounds[k + 1])) for k in range(op_plan.num_nano)]
        nodes: list[NanoOp] = []
        hazards = _Hazards(by_name, producers)
        num_layers = len(layers_ops)
        for layer in range(num_layers + 1):  # one extra round flushes the last layer's "@-1" entries
            for entry in self.order:
                li = layer + entry.layer_offset
                if not 0 <= li < num_layers or (entry.layer_offset == 0 and layer == num_layers):
                    continue
                op = layers_ops[li][by_name[entry.op]]
                lo, hi = op_rows(op, *ranges[entry.op][entry.nano], batch)
                if hi <= lo:
                    continue
                op_plan = self.plan.op_plan(entry.op)
                node = NanoOp(li, op, by_name[entry.op], entry.layer_offset, lo, hi,
                              self.stream_index[op_plan.stream or self.plan.streams[0].name],
                              op_plan.sm_budget, index=len(nodes))
                hazards.add(node)
                nodes.append(node)
        _mark_cross_stream(nodes)
        return nodes

    def rounds(self, layers_ops: list[list[Op]], batch) -> list[list[NanoOp]]:
        """Nano-ops grouped by issue round (round r issues layer r's entries and layer r-1's '@-1'
        ones). Rounds 2..L-1 are the same up to a layer shift, so hazards are tracked on a model of
        at most TEMPLATE_LAYERS layers and the generic round is replicated: the per-step host cost
        does not grow with depth."""
        num_layers = len(layers_ops)
        small = min(num_layers, TEMPLATE_LAYERS)
        nodes = self.build(layers_ops[:small], batch)
        by_round: list[list[NanoOp]] = [[] for _ in range(small + 1)]
        for node in nodes:
            by_round[node.layer - node.op_offset].append(node)
        if small == num_layers:
            return by_round
        generic = by_round[2]
        out = by_round[:2]
        for r in range(2, num_layers):
            shift = r - 2
            out.append([dataclasses.replace(n, layer=n.layer + shift, deps=n.deps) for n in generic])
        flush = by_round[small]
        out.append([dataclasses.replace(n, layer=n.layer + num_layers - small) for n in flush])
        return out

    def run(self, layers_ops: list[list[Op]], state) -> None:
        if self.is_sequential() and not self.record_timeline:  # one stream, no cuts: no bookkeeping
            t = state.batch.num_tokens
            for ops in layers_ops:
                for op in ops:
                    op.fn(state, 0, t)
            return
        rounds = self.rounds(layers_ops, state.batch)
        self._timeline = []
        if self.streams is None:  # CPU: issue order is a valid execution order
            for nodes in rounds:
                for node in nodes:
                    state.sm_budget = node.sm_budget
                    t0 = time.perf_counter()
                    layers_ops[node.layer][node.op_pos].fn(state, node.lo, node.hi)
                    if self.record_timeline:
                        self._timeline.append((node, t0, time.perf_counter()))
            state.sm_budget = None
            return
        self._run_cuda(rounds, layers_ops, state)

    def _run_cuda(self, rounds: list[list[NanoOp]], layers_ops: list[list[Op]], state) -> None:
        main = torch.cuda.current_stream(self.device)
        streams = [main if s is None else s for s in self.streams]
        side = [s for i, s in enumerate(streams) if s is not main and s not in streams[:i]]
        start = main.record_event()
        for s in side:
            s.wait_event(start)  # side streams see the batch tensors the main stream copied in
        # Events by (round, position in round); a template node's deps are (round delta, position).
        events: dict[tuple[int, int], torch.cuda.Event] = {}
        current = main
        try:
            for r, nodes in enumerate(rounds):
                for pos, node in enumerate(nodes):
                    stream = streams[node.stream]
                    for dr, dpos in node.cross_deps:
                        stream.wait_event(events[(r + dr, dpos)])
                    if stream is not current:  # kernels launch on the current stream
                        torch.cuda.set_stream(stream)
                        current = stream
                    state.sm_budget = node.sm_budget
                    if self.record_timeline:
                        t0 = stream.record_event(torch.cuda.Event(enable_timing=True))
                    layers_ops[node.layer][node.op_pos].fn(state, node.lo, node.hi)
                    if self.record_timeline:
                        self._timeline.append((node, t0, stream.record_event(torch.cuda.Event(enable_timing=True))))
                    if node.needs_event:
                        events[(r, pos)] = stream.record_event()
        finally:
            torch.cuda.set_stream(main)
        state.sm_budget = None
        for s in side:
            main.wait_stream(s)

    def timeline(self) -> list[dict]:
        """Nano-ops of the last recorded run: layer, op, rows, stream, start and end in ms from the
        first start (CUDA events on GPU: the real overlap; host clock on CPU)."""
        if not self._timeline:
            return []
        first = self._timeline[0][1]
        if isinstance(first, float):
            span = lambda a, b: (a - first) * 1e3  # noqa: E731
        else:
            torch.cuda.synchronize(self.device)
            span = lambda a, b: first.elapsed_time(a)  # noqa: E731
        return [{"layer": n.layer, "op": n.op.name, "resource": n.op.resource.value, "lo": n.lo, "hi": n.hi,
                 "stream": self.plan.streams[n.stream].name, "sm_budget": n.sm_budget,
                 "start_ms": span(a, None), "end_ms": span(b, None)} for n, a, b in self._timeline]


def _mark_cross_stream(nodes: list[NanoOp]) -> None:
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


def make_executor(plan: Plan | None, layer_ops: list[Op], device: torch.device) -> PlanExecutor:
    return PlanExecutor(plan or SEQUENTIAL, layer_ops, device)


def synthetic_batch(decode: int = 7, prefill: tuple[int, ...] = (5, 9, 3)):
    """A host-only batch shape (decode rows, then prefill chunks) for checking plans."""
    from nanoflow.engine.forward_batch import ForwardBatch
    starts = list(range(decode + 1))
    for n in prefill:
        starts.append(starts[-1] + n)
    empty = torch.empty(0)
    return ForwardBatch(empty, empty, empty, empty, empty, empty, starts, decode, empty)
