"""Runs the decoder layers under a plan: nano-ops issued in the plan's order on their streams, with
events only where a nano-op depends on one from another stream. Dependencies come from data hazards
(read-after-write, write-after-read, write-after-write on overlapping rows of a workspace buffer), so
every plan computes what the sequential one computes. On CPU the same nano-ops run in issue order.

The issue program of a batch shape (nano-ops, segments, events: nano_ops.Program) is built once and
cached by the shape (token count, decode count, prefill request bounds where a plan cuts prefill),
so the host's work per step is issuing it. A `GraphShape` layout gives the program a CUDA graph of
that shape replays (pipeline/graphs.py)."""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections import OrderedDict

import torch

from nanoflow.pipeline import sm_partition
from nanoflow.pipeline.nano_ops import (BatchRows, GraphShape, Hazards, NanoOp, Program, expected_producers,
                                        make_program, mark_cross_stream, op_rows)
from nanoflow.pipeline.ops import Op, RowScope
from nanoflow.pipeline.plan import SEQUENTIAL, Plan
from nanoflow.pipeline.plan_fold import fold_plan

__all__ = ["TEMPLATE_LAYERS", "NanoOp", "PlanExecutor", "make_executor", "op_rows", "expected_producers",
           "synthetic_batch", "GraphShape", "BatchRows"]

TEMPLATE_LAYERS = 5
"""Layers whose hazards are tracked per shape; deeper models replicate the generic round."""
MAX_CACHED_PROGRAMS = 1024
"""Programs kept per executor (least recently used dropped): batch shapes seen recently."""


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
        self.stream_sms: list[int | None] = [None] * len(plan.streams)
        """SMs of each stream's green-context partition (None: an ordinary stream)."""
        if device.type == "cuda":
            self.streams = self._make_streams(plan, device)
        self.order = plan.issue_order(op_names)
        self._op_names = op_names
        self._scopes = {op.name: op.scope for op in layer_ops}
        self.record_timeline = False
        """When set, the next runs time every nano-op (CUDA events / host clock): see timeline()."""
        self._timeline: list[tuple[NanoOp, object, object]] = []
        self._programs: OrderedDict = OrderedDict()
        self.num_builds = 0
        """Hazard builds so far (one per new batch shape; tests and benchmarks read it)."""
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
                side = 0 if s.sms == "split" else 1
                streams.append(self.partition.streams[side])
                self.stream_sms[i] = self.partition.sm_counts[side]
            elif i == 0:
                streams.append(None)
            else:
                streams.append(torch.cuda.Stream(device=device, priority=s.priority))
        return streams

    def is_sequential(self) -> bool:
        return len(self.plan.streams) == 1 and all(
            not o.cuts and o.sm_budget is None for o in self.plan.ops.values()) and (
            self.plan.order is None and not self.plan.uses_sm_split())

    # ---- shapes --------------------------------------------------------------------------------
    def graph_capable(self) -> str | None:
        """None if the plan can run in CUDA graphs, else why not (prefill cut at request bounds
        depends on the batch's requests, which a graph of a shape does not know)."""
        cut = [n for n in self._op_names if self._scopes[n] == RowScope.PREFILL and self.plan.op_plan(n).cuts]
        if cut:
            return f"plan {self.name!r} cuts {', '.join(cut)} (at request bounds)"
        return None

    def decode_dependent(self) -> bool:
        """Whether the plan's nano-ops depend on the batch's decode count (cuts of the decode or
        prefill region, or several streams: decode and prefill attention may then overlap), so
        its CUDA graphs are captured per decode-count bucket; otherwise one per token count."""
        if len(self.plan.streams) > 1:
            return True
        return any(c.of != "tokens" for o in self.plan.ops.values() for c in o.cuts)

    def _layout_key(self, layers_ops: list[list[Op]], layout) -> tuple:
        owner = (id(layers_ops[0]), len(layers_ops))
        if isinstance(layout, GraphShape):
            return owner + (layout,)
        batch = layout.batch
        key = owner + (layout.num_tokens, layout.num_decode)
        for name in self._op_names:  # prefill cut at request bounds: the bounds are part of the shape
            if self._scopes[name] == RowScope.PREFILL and self.plan.op_plan(name).cuts:
                key += tuple(op_rows(_SCOPE_PROBE[RowScope.PREFILL], lo, hi, batch)
                             for lo, hi in self._ranges(name, layout.num_tokens, layout.num_decode))
        return key

    def _ranges(self, name: str, t: int, d: int) -> list[tuple[int, int]]:
        op_plan = self.plan.op_plan(name)
        bounds = [0] + [min(max(c.resolve(t, d), 0), t) for c in op_plan.cuts] + [t]
        return [(bounds[k], max(bounds[k], bounds[k + 1])) for k in range(op_plan.num_nano)]

    # ---- building ------------------------------------------------------------------------------
    def build(self, layers_ops: list[list[Op]], batch) -> list[NanoOp]:
        """The step's nano-ops in issue order, with their cross-stream dependencies. `batch`: a
        ForwardBatch (its exact rows) or a layout (BatchRows, GraphShape)."""
        layout = batch if isinstance(batch, (BatchRows, GraphShape)) else BatchRows(batch)
        self.num_builds += 1
        t, d = layout.num_tokens, layout.num_decode
        by_name = {op.name: i for i, op in enumerate(layers_ops[0])}
        producers = expected_producers(layers_ops[0])
        ranges = {name: self._ranges(name, t, d) for name in by_name}
        nodes: list[NanoOp] = []
        hazards = Hazards(by_name, producers)
        num_layers = len(layers_ops)
        for layer in range(num_layers + 1):  # one extra round flushes the last layer's "@-1" entries
            for entry in self.order:
                li = layer + entry.layer_offset
                if not 0 <= li < num_layers or (entry.layer_offset == 0 and layer == num_layers):
                    continue
                op = layers_ops[li][by_name[entry.op]]
                lo, hi = layout.rows(op, *ranges[entry.op][entry.nano])
                if hi <= lo:
                    continue
                op_plan = self.plan.op_plan(entry.op)
                node = NanoOp(li, op, by_name[entry.op], entry.layer_offset, lo, hi,
                              self.stream_index[op_plan.stream or self.plan.streams[0].name],
                              op_plan.sm_budget, index=len(nodes))
                hazards.add(node)
                nodes.append(node)
        mark_cross_stream(nodes)
        return nodes

    def rounds(self, layers_ops: list[list[Op]], batch) -> list[list[NanoOp]]:
        """Nano-ops grouped by issue round (round r issues layer r's entries and layer r-1's '@-1'
        ones). Rounds 2..L-1 are the same up to a layer shift, so hazards are tracked on a model of
        at most TEMPLATE_LAYERS layers and the generic round is replicated: the host cost does not
        grow with depth."""
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

    def program(self, layers_ops: list[list[Op]], layout) -> Program:
        """The cached issue program of a layout (ForwardBatch, BatchRows or GraphShape)."""
        if not isinstance(layout, (BatchRows, GraphShape)):
            layout = BatchRows(layout)
        key = self._layout_key(layers_ops, layout)
        prog = self._programs.get(key)
        if prog is not None:
            self._programs.move_to_end(key)
            return prog
        prog = make_program(self.rounds(layers_ops, layout))
        self._programs[key] = prog
        if len(self._programs) > MAX_CACHED_PROGRAMS:
            self._programs.popitem(last=False)
        return prog

    # ---- running -------------------------------------------------------------------------------
    def run(self, layers_ops: list[list[Op]], state, shape: GraphShape | None = None) -> None:
        """Issues the step. `shape`: run the program of that CUDA-graph shape (state holds the
        graph's fixed-size buffers and device_rows); otherwise the batch's own."""
        if shape is None and self.is_sequential() and not self.record_timeline:
            t = state.batch.num_tokens  # one stream, no cuts: no bookkeeping
            for ops in layers_ops:
                for op in ops:
                    op.fn(state, 0, t)
            return
        prog = self.program(layers_ops, shape if shape is not None else BatchRows(state.batch))
        self._timeline = []
        if self.streams is None:  # CPU: issue order is a valid execution order
            for seg in prog.segments:
                state.stream_sms = None
                for node in seg.nodes:
                    state.sm_budget = node.sm_budget
                    t0 = time.perf_counter()
                    layers_ops[node.layer][node.op_pos].fn(state, node.lo, node.hi)
                    if self.record_timeline:
                        self._timeline.append((node, t0, time.perf_counter()))
            state.sm_budget = None
            return
        self._run_cuda(prog, layers_ops, state)

    def _run_cuda(self, prog: Program, layers_ops: list[list[Op]], state) -> None:
        main = torch.cuda.current_stream(self.device)
        streams = [main if s is None else s for s in self.streams]
        side = [s for i, s in enumerate(streams) if s is not main and s not in streams[:i]]
        start = main.record_event()
        for s in side:
            s.wait_event(start)  # side streams see the batch tensors the main stream copied in
        if len(prog.events) < prog.num_events:
            prog.events = [torch.cuda.Event() for _ in range(prog.num_events)]
        events = prog.events
        current = main
        try:
            for seg in prog.segments:
                stream = streams[seg.stream]
                for e in seg.waits:
                    stream.wait_event(events[e])
                if stream is not current:  # kernels launch on the current stream
                    torch.cuda.set_stream(stream)
                    current = stream
                state.stream_sms = self.stream_sms[seg.stream]
                for node in seg.nodes:
                    state.sm_budget = node.sm_budget
                    if self.record_timeline:
                        t0 = stream.record_event(torch.cuda.Event(enable_timing=True))
                    layers_ops[node.layer][node.op_pos].fn(state, node.lo, node.hi)
                    if self.record_timeline:
                        self._timeline.append((node, t0, stream.record_event(torch.cuda.Event(enable_timing=True))))
                if seg.record >= 0:
                    events[seg.record].record(stream)
        finally:
            torch.cuda.set_stream(main)
        state.sm_budget = None
        state.stream_sms = None
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


_SCOPE_PROBE = {RowScope.PREFILL: Op("prefill", None, None, RowScope.PREFILL)}  # type: ignore[arg-type]
"""An op of prefill scope, for computing the request bounds of a prefill cut (layout keys)."""


def make_executor(plan: Plan | None, layer_ops: list[Op], device: torch.device) -> PlanExecutor:
    return PlanExecutor(plan or SEQUENTIAL, layer_ops, device)


def synthetic_batch(decode: int = 7, prefill: tuple[int, ...] = (5, 9, 3)):
    """A host-only batch shape (decode rows, then prefill chunks) for checking plans."""
    from nanoflow.forward_batch import ForwardBatch
    starts = list(range(decode + 1))
    for n in prefill:
        starts.append(starts[-1] + n)
    empty = torch.empty(0)
    return ForwardBatch(empty, empty, empty, empty, empty, empty, starts, decode, empty)
