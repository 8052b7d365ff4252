"""CUDA graphs for every plan and every token count up to the dense batch.

A graph is captured per *shape* (nano_ops.GraphShape): a padded token count, and for plans whose
nano-ops depend on the decode count (several streams, or cuts of the decode / prefill region) a
bucket of decode counts. Every step of that shape replays it. What the step's kernels read lives in
fixed device buffers (`StaticInputs`: token ids, positions, KV slots, block tables, context lengths,
query start locations, and the decode / request counts as device scalars), so the captured launches
depend on no per-step host value:
- attention uses its graph forms (kernels.*_rows): decode attention on a fixed persistent grid
  computing the rows below the device's decode count, prefill attention on a fixed grid computing
  the requests from there on; rows of padding belong to no request (KV slot -1: never written);
- the other ops are row-independent, so padded rows only cost their share of the GEMMs.
Why not piecewise graphs with attention eager (the earlier engine/cuda_graphs.py): in every overlap
plan decode attention runs on its own stream *beside* the GEMMs of another nano-batch; breaking the
graph at each attention would join the streams there and serialise exactly what the plan overlaps.

Multi-stream plans are captured on their streams (the executor's fork / join with events inside
the capture). Streams on green-context SM partitions are checked once (graph_probe): if a single
graph keeps each kernel on its partition, that is the mode; else one graph per *segment* (the
nano-ops of one stream between cross-stream waits, captured on that stream) replayed in issue
order with events between them; else those plans run eagerly. `--enforce-eager` skips all of it.

A shape is captured when first needed twice (the first step runs eagerly on the same buffers, which
also compiles its kernels), or up front for the shapes most steps have (prepare). On CPU the same
buffers and programs run eagerly (capture=False): tests check the graph form's function there.
"""
from __future__ import annotations

import bisect
import logging
import warnings
from dataclasses import dataclass, field

import torch

from nanoflow.forward_batch import ForwardBatch
from nanoflow.models.llama import DeviceRows, StepState
from nanoflow.pipeline.executor import PlanExecutor
from nanoflow.pipeline.nano_ops import GraphShape, Program

logger = logging.getLogger(__name__)

FINE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 288, 320, 352, 384,
              416, 448, 480, 512)
COARSE_STEP = 64
"""Above 512 tokens, padded token counts are multiples of this (padding costs at most 64 rows of GEMMs)."""
MAX_GRAPHS_PER_PLAN = 400
"""Shapes captured per executor at most; steps of other shapes run eagerly (said once)."""
CAPTURE_AFTER_USES = 2
"""A shape not captured up front is captured on its second step (one-off shapes stay eager)."""


def capture_sizes(max_tokens: int) -> list[int]:
    """Padded token counts: FINE_SIZES, then every COARSE_STEP, then max_tokens (the dense batch)."""
    sizes = [s for s in FINE_SIZES if s < max_tokens]
    s = 512 + COARSE_STEP
    while s < max_tokens:
        sizes.append(s)
        s += COARSE_STEP
    return sorted(set(sizes + [max_tokens]))


def shape_for(executor: PlanExecutor, sizes: list[int], num_tokens: int, num_decode: int) -> GraphShape | None:
    """The graph shape a batch of num_tokens rows (num_decode of them decode rows) runs in."""
    if num_tokens < 1 or num_tokens > sizes[-1]:
        return None
    i = bisect.bisect_left(sizes, num_tokens)
    t = sizes[i]
    if not executor.decode_dependent():
        return GraphShape(t, 0, t)
    if num_decode == 0:
        return GraphShape(t, 0, 0)
    j = bisect.bisect_left(sizes, num_decode)  # num_decode <= num_tokens <= t: j <= i
    return GraphShape(t, sizes[j - 1] if j > 0 else 0, min(sizes[j], t))


def prepare_shapes(executor: PlanExecutor, sizes: list[int]) -> list[GraphShape]:
    """Shapes captured up front: every token count as a decode-only step, and for decode-dependent
    plans also the full dense batch at every decode bucket (prefill-heavy steps fill the budget)."""
    shapes = {shape_for(executor, sizes, t, t) for t in sizes}
    if executor.decode_dependent():
        shapes |= {shape_for(executor, sizes, sizes[-1], d) for d in [0, *sizes]}
    return sorted(shapes, key=lambda s: (s.num_tokens, s.decode_hi))


class StaticInputs:
    """The fixed-size device buffers graph steps read: max_tokens rows, max_tokens requests (a request
    has at least one row), max_blocks block-table entries per request."""

    def __init__(self, max_tokens: int, max_blocks: int, device: torch.device):
        n, dev = max_tokens, device
        self.max_tokens, self.max_blocks = n, max_blocks
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.zeros(n + 1, dtype=torch.int32, device=dev)
        self.rows = DeviceRows(torch.zeros(1, dtype=torch.int32, device=dev),
                               torch.zeros(1, dtype=torch.int32, device=dev))
        self._empty = torch.empty(0, dtype=torch.long, device=dev)

    def fits(self, batch: ForwardBatch) -> bool:
        return batch.num_tokens <= self.max_tokens and batch.block_tables.shape[1] <= self.max_blocks

    def load(self, batch: ForwardBatch, padded: int) -> None:
        """Copies the batch in (device to device, on the current stream); rows padded..: KV slot -1,
        requests past the batch: no rows, context 0."""
        t, r = batch.num_tokens, batch.num_reqs
        self.input_ids[:t].copy_(batch.input_ids[:t], non_blocking=True)
        self.positions[:t].copy_(batch.positions[:t], non_blocking=True)
        self.slot_mapping[:t].copy_(batch.slot_mapping[:t], non_blocking=True)
        if padded > t:
            self.slot_mapping[t:padded].fill_(-1)
        width = batch.block_tables.shape[1]
        self.block_tables[:r, :width].copy_(batch.block_tables, non_blocking=True)
        self.seq_lens[:r].copy_(batch.seq_lens, non_blocking=True)
        self.seq_lens[r:].fill_(0)
        self.query_start_loc[:r + 1].copy_(batch.query_start_loc, non_blocking=True)
        self.query_start_loc[r + 1:].fill_(t)
        self.rows.num_decode.fill_(batch.num_decode)
        self.rows.num_reqs.fill_(r)

    def load_synthetic(self, shape: GraphShape, block_size: int) -> None:
        """A batch of this shape that writes no KV (slots -1) and reads block 0: for warming up and
        capturing shapes before any request has them."""
        t, d = shape.num_tokens, shape.decode_hi
        self.positions[:t].zero_()
        self.slot_mapping[:t].fill_(-1)
        self.block_tables.zero_()
        self.seq_lens.zero_()
        self.seq_lens[:d].fill_(1)
        r = d + (1 if t > d else 0)
        if t > d:
            self.seq_lens[d] = t - d
        qsl = torch.arange(r + 1, dtype=torch.int32)
        qsl[-1] = t
        self.query_start_loc[:r + 1].copy_(qsl.to(self.query_start_loc.device))
        self.query_start_loc[r + 1:].fill_(t)
        self.rows.num_decode.fill_(d)
        self.rows.num_reqs.fill_(r)

    def batch(self, padded: int) -> ForwardBatch:
        """The buffers as the ops see them: `padded` rows; host fields only for row counts."""
        return ForwardBatch(self.input_ids, self.positions, self.slot_mapping, self.block_tables, self.seq_lens,
                            self.query_start_loc, [0, padded], 0, self._empty)


@dataclass
class _Captured:
    graphs: list  # one (single) or the pre-graph + one per segment (segmented)
    program: Program | None = None


@dataclass
class _PlanGraphs:
    executor: PlanExecutor
    mode: str
    """'single', 'segmented', 'eager' (graphs refused), or 'static' (CPU: the graph form run eagerly)."""
    reason: str = ""
    captured: dict[GraphShape, _Captured] = field(default_factory=dict)
    uses: dict[GraphShape, int] = field(default_factory=dict)
    full_warned: bool = False


def _key(executor: PlanExecutor):
    """Sequential executors issue the same program: they share graphs."""
    return "sequential" if executor.is_sequential() else id(executor)


class GraphSet:
    """The graphs of every executor one ModelRunner uses (the plan's, the sequential fallback's)."""

    def __init__(self, model, workspace, kv_caches, block_size: int, max_blocks: int, capture: bool = True):
        self.model = model
        self.ws = workspace
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.capture = capture and model.device.type == "cuda"
        self.sizes = capture_sizes(workspace.max_tokens)
        self.inputs = StaticInputs(workspace.max_tokens, max_blocks, model.device)
        for name, buf in vars(workspace).items():  # padded rows compute on finite values, never NaN
            if isinstance(buf, torch.Tensor):
                buf.zero_()
        self._plans: dict[object, _PlanGraphs] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._stream_pools: dict[int, object] = {}
        self._capture_stream = torch.cuda.Stream(model.device) if self.capture else None
        self._probes: dict[int, dict] = {}
        self.stats = {"replays": 0, "eager_graph_steps": 0, "captures": 0, "capture_failures": 0}
        """Counters: graph replays, steps run on the static buffers without a graph, shapes captured."""

    # ---- public ----------------------------------------------------------------------------------
    def can_run(self, executor: PlanExecutor, batch: ForwardBatch) -> bool:
        plan = self._plan(executor)
        return plan.mode != "eager" and self.inputs.fits(batch) and \
            shape_for(executor, self.sizes, batch.num_tokens, batch.num_decode) is not None

    def run(self, executor: PlanExecutor, batch: ForwardBatch) -> GraphShape:
        """Computes the batch's hidden states into the workspace (its rows; padding beyond): a
        graph replay when its shape is captured, else the same work issued eagerly on the buffers."""
        plan = self._plan(executor)
        shape = shape_for(executor, self.sizes, batch.num_tokens, batch.num_decode)
        self.inputs.load(batch, shape.num_tokens)
        cap = plan.captured.get(shape)
        if cap is not None:
            self._replay(plan, cap)
            self.stats["replays"] += 1
            return shape
        self._issue(executor, shape)
        self.stats["eager_graph_steps"] += 1
        if self.capture and plan.mode in ("single", "segmented"):
            plan.uses[shape] = plan.uses.get(shape, 0) + 1
            if plan.uses[shape] >= CAPTURE_AFTER_USES:
                self._capture(plan, shape)
        return shape

    def prepare(self, executor: PlanExecutor) -> None:
        """Captures the shapes most steps have (prepare_shapes), each after one eager warm-up run on
        a synthetic batch that writes no KV. Call while no step is in flight."""
        plan = self._plan(executor)
        if not self.capture or plan.mode not in ("single", "segmented"):
            return
        for shape in prepare_shapes(executor, self.sizes):
            if shape in plan.captured:
                continue
            self.inputs.load_synthetic(shape, self.block_size)
            self._issue(executor, shape)
            self._capture(plan, shape)
        torch.cuda.synchronize(self.model.device)

    def mode(self, executor: PlanExecutor) -> str:
        return self._plan(executor).mode

    def describe(self) -> list[dict]:
        return [{"plan": p.executor.name, "mode": p.mode, "reason": p.reason, "graphs": len(p.captured),
                 "probe": self._probes.get(id(p.executor))} for p in self._plans.values()]

    # ---- internals ---------------------------------------------------------------------------------
    def _plan(self, executor: PlanExecutor) -> _PlanGraphs:
        key = _key(executor)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        refused = executor.graph_capable()
        if refused:
            plan = _PlanGraphs(executor, "eager", refused)
            warnings.warn(f"CUDA graphs off for plan {executor.name!r}: {refused}; it runs eagerly", stacklevel=3)
        elif not self.capture:
            plan = _PlanGraphs(executor, "static")
        elif executor.partition is None:
            plan = _PlanGraphs(executor, "single")
        else:
            from nanoflow.pipeline.graph_probe import probe_partition
            probe = probe_partition(executor, self._capture_stream)
            self._probes[id(executor)] = probe
            plan = _PlanGraphs(executor, probe["mode"], probe.get("reason", ""))
            logger.info("plan %s: green-context graphs %s (%s)", executor.name, probe["mode"], probe)
            if probe["mode"] == "eager":
                warnings.warn(f"CUDA graphs off for plan {executor.name!r}: {probe.get('reason')}", stacklevel=3)
        self._plans[key] = plan
        return plan

    def _state(self, shape: GraphShape) -> StepState:
        return StepState(self.inputs.batch(shape.num_tokens), self.ws, self.kv_caches,
                         device_rows=self.inputs.rows)

    def _layers(self) -> list:
        return [layer.ops for layer in self.model.layers]

    def _issue(self, executor: PlanExecutor, shape: GraphShape) -> None:
        state = self._state(shape)
        self.model.embed(state)
        executor.run(self._layers(), state, shape)

    def _capture(self, plan: _PlanGraphs, shape: GraphShape) -> None:
        if len(plan.captured) >= MAX_GRAPHS_PER_PLAN:
            if not plan.full_warned:
                plan.full_warned = True
                warnings.warn(f"plan {plan.executor.name!r}: {MAX_GRAPHS_PER_PLAN} CUDA graphs captured; "
                              "steps of other shapes run eagerly", stacklevel=3)
            return
        device = self.model.device
        torch.cuda.synchronize(device)
        try:
            if plan.mode == "single":
                cap = _Captured([self._capture_one(lambda: self._issue(plan.executor, shape), self._pool,
                                                   self._capture_stream)])
            else:
                cap = self._capture_segments(plan.executor, shape)
        except Exception as exc:  # noqa: BLE001 - a capture the driver refuses: that plan runs eagerly
            torch.cuda.synchronize(device)
            self.stats["capture_failures"] += 1
            plan.mode, plan.reason = "eager", f"capture failed: {type(exc).__name__}: {exc}"
            plan.captured.clear()
            warnings.warn(f"CUDA graphs off for plan {plan.executor.name!r}: {plan.reason}", stacklevel=3)
            return
        plan.captured[shape] = cap
        self.stats["captures"] += 1

    def _capture_one(self, issue, pool, stream) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            g.capture_begin(pool=pool)
            try:
                issue()
            finally:
                g.capture_end()
        return g

    def _capture_segments(self, executor: PlanExecutor, shape: GraphShape) -> _Captured:
        """One graph for the embedding, then one per segment, captured on the segment's stream (the
        main stream's segments on a side stream of the primary context; graphs replay anywhere)."""
        prog = executor.program(self._layers(), shape)
        state = self._state(shape)
        layers = self._layers()
        graphs = [self._capture_one(lambda: self.model.embed(state), self._pool_of(-1), self._capture_stream)]
        for seg in prog.segments:
            stream = executor.streams[seg.stream] or self._capture_stream

            def issue(seg=seg):
                state.stream_sms = executor.stream_sms[seg.stream]
                for node in seg.nodes:
                    state.sm_budget = node.sm_budget
                    layers[node.layer][node.op_pos].fn(state, node.lo, node.hi)
                state.sm_budget = state.stream_sms = None
            graphs.append(self._capture_one(issue, self._pool_of(seg.stream), stream))
        return _Captured(graphs, prog)

    def _pool_of(self, stream_index: int):
        """Segment graphs of different streams replay at the same time: a memory pool per stream."""
        if stream_index not in self._stream_pools:
            self._stream_pools[stream_index] = torch.cuda.graph_pool_handle()
        return self._stream_pools[stream_index]

    def _replay(self, plan: _PlanGraphs, cap: _Captured) -> None:
        if cap.program is None:
            cap.graphs[0].replay()
            return
        executor, prog = plan.executor, cap.program
        main = torch.cuda.current_stream(self.model.device)
        streams = [main if s is None else s for s in executor.streams]
        side = [s for i, s in enumerate(streams) if s is not main and s not in streams[:i]]
        cap.graphs[0].replay()
        start = main.record_event()
        for s in side:
            s.wait_event(start)
        if len(prog.events) < prog.num_events:
            prog.events = [torch.cuda.Event() for _ in range(prog.num_events)]
        try:
            for seg, g in zip(prog.segments, cap.graphs[1:]):
                stream = streams[seg.stream]
                for e in seg.waits:
                    stream.wait_event(prog.events[e])
                torch.cuda.set_stream(stream)
                g.replay()
                if seg.record >= 0:
                    prog.events[seg.record].record(stream)
        finally:
            torch.cuda.set_stream(main)
        for s in side:
            main.wait_stream(s)
