"""CUDA-graph form of every plan, on CPU: the shapes (padded token count, decode bucket) cover every
batch, the programs of a shape order every real data hazard of every batch it holds, and the graph
form (fixed-size buffers, device-side decode / request counts, padded rows) gives the sequential
plan's greedy tokens. The issue programs are cached by shape (host work per step does not grow)."""
from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow.models.llama import LlamaForCausalLM
from nanoflow.models.presets import PRESETS
from nanoflow.pipeline.executor import make_executor, synthetic_batch
from nanoflow.pipeline.graphs import GraphSet, capture_sizes, prepare_shapes, shape_for
from nanoflow.pipeline.nano_ops import BatchRows, GraphShape
from nanoflow.pipeline.ops import RowScope
from nanoflow.pipeline.plan import Plan, load_plan
from tests.greedy import greedy_run
from tests.tiny_checkpoints import make_checkpoint

PLANS = ["sequential", "overlap-2", "nano-4", "overlap-split"]


@pytest.fixture(scope="module")
def layer_ops():
    return LlamaForCausalLM(PRESETS["default"], torch.float32, torch.device("meta")).layers[0].ops


def test_capture_sizes_reach_the_dense_batch():
    assert capture_sizes(2048)[:4] == [1, 2, 4, 8] and capture_sizes(2048)[-1] == 2048
    assert all(b - a <= 64 for a, b in zip(capture_sizes(2048), capture_sizes(2048)[1:]))
    assert capture_sizes(600)[-2:] == [576, 600] and capture_sizes(24)[-1] == 24


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(1, 3000), data=st.data())
def test_every_batch_has_a_shape_that_holds_it(layer_ops, budget, data):
    t = data.draw(st.integers(1, budget))
    d = data.draw(st.integers(0, t))
    sizes = capture_sizes(budget)
    for plan in ("sequential", "overlap-2"):
        ex = make_executor(load_plan(plan), layer_ops, torch.device("cpu"))
        shape = shape_for(ex, sizes, t, d)
        assert shape is not None and shape.holds(t, d) and shape.num_tokens in sizes
        assert shape.num_tokens - t < max(64, t)  # padding stays bounded
        if plan == "sequential":
            assert (shape.decode_lo, shape.decode_hi) == (0, shape.num_tokens)
        else:
            assert shape.decode_hi in sizes or shape.decode_hi in (0, shape.num_tokens)
    assert shape_for(ex, sizes, budget + 1, 0) is None


def test_prepare_shapes(layer_ops):
    sizes = capture_sizes(2048)
    seq = make_executor(None, layer_ops, torch.device("cpu"))
    assert [s.num_tokens for s in prepare_shapes(seq, sizes)] == sizes
    ex = make_executor(load_plan("overlap-2"), layer_ops, torch.device("cpu"))
    shapes = prepare_shapes(ex, sizes)
    assert shape_for(ex, sizes, 572, 572) in shapes and shape_for(ex, sizes, 2048, 300) in shapes
    assert len(shapes) <= 2 * len(sizes) + 1


def _reachability(nodes):
    """after[i]: indices of nodes that node i is ordered after (dependencies + same-stream order)."""
    after = []
    last_on: dict[int, int] = {}
    index = {id(n): i for i, n in enumerate(nodes)}
    for i, n in enumerate(nodes):
        direct = {index[id(d)] for d in n.deps}
        if n.stream in last_on:
            direct.add(last_on[n.stream])
        reach = set(direct)
        for j in direct:
            reach |= after[j]
        after.append(reach)
        last_on[n.stream] = i
    return after


def _real_rows(node, num_tokens, num_decode, padded):
    """Rows a nano-op of a graph-shape program really touches for this batch."""
    if node.op.scope == RowScope.DECODE:
        return node.lo, min(node.hi, num_decode)
    if node.op.scope == RowScope.PREFILL:
        return num_decode, num_tokens
    return node.lo, min(node.hi, padded)


def _assert_hazards_ordered(nodes, rows):
    after = _reachability(nodes)
    for j, b in enumerate(nodes):
        rb = rows(b)
        for i in range(j):
            a = nodes[i]
            ra = rows(a)
            if not (ra[0] < ra[1] and rb[0] < rb[1] and ra[0] < rb[1] and rb[0] < ra[1]):
                continue
            conflict = (set(a.op.writes) & set(b.op.reads)) or (set(a.op.reads) & set(b.op.writes)) or \
                (set(a.op.writes) & set(b.op.writes))
            if conflict:
                assert i in after[j], (f"{b.op.name} L{b.layer} {rb} not ordered after {a.op.name} L{a.layer} {ra} "
                                       f"on {sorted(conflict)}")


def _plans_under_test():
    plans = [load_plan(p) for p in PLANS]
    d = load_plan("overlap-2").to_dict()  # decode attention cut finer than the GEMMs, tokens cuts
    d["ops"]["decode_attn"]["cuts"] = [{"of": "decode", "at": 0.25}, {"of": "decode", "at": 0.5},
                                       {"of": "decode", "at": 0.75}]
    d["ops"].pop("decode_attn")
    d.pop("order")
    d["ops"]["decode_attn"] = {"stream": "memory", "cuts": [{"of": "decode", "at": 0.3}]}
    d["ops"]["qkv_gemm"] = {"stream": "compute", "cuts": [{"of": "tokens", "at": 0.4}]}
    plans.append(Plan.from_dict(d))
    cuts = {"stream": "compute", "cuts": [{"of": "tokens", "at": 0.45}, {"of": "tokens", "at": 0.7}]}
    e = {"name": "tokens-cuts", "streams": [{"name": "compute"}, {"name": "memory", "priority": -1}],
         "ops": {n: dict(cuts) for n in ("o_gemm", "post_norm", "gate_up_gemm", "act", "down_gemm", "input_norm")}}
    e["ops"]["decode_attn"] = {"stream": "memory", "cuts": [{"of": "decode", "at": 0.5}]}
    plans.append(Plan.from_dict(e))
    e = json.loads(json.dumps(e))  # prefill attention beside the GEMMs, on the memory stream
    e["name"] = "prefill-side"
    e["ops"]["prefill_attn"] = {"stream": "memory"}
    plans.append(Plan.from_dict(e))
    return plans


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_graph_programs_order_every_real_hazard(layer_ops, data):
    """For a random batch, the program of its graph shape (declared rows, decode / prefill declared
    over a bucket) orders every conflicting pair of nano-ops on the rows they really touch."""
    budget = data.draw(st.sampled_from([24, 96, 600]))
    sizes = capture_sizes(budget)
    t = data.draw(st.integers(1, budget))
    d = data.draw(st.integers(0, t))
    plan = data.draw(st.sampled_from(_plans_under_test()))
    ex = make_executor(plan, layer_ops, torch.device("cpu"))
    shape = shape_for(ex, sizes, t, d)
    nodes = ex.build([layer_ops] * 3, shape)
    _assert_hazards_ordered(nodes, lambda n: _real_rows(n, t, d, shape.num_tokens))
    # eager layouts too: their rows are exact
    batch = synthetic_batch(d, (t - d,) if t > d else ())
    _assert_hazards_ordered(ex.build([layer_ops] * 3, batch), lambda n: (n.lo, n.hi))


def test_programs_are_cached_by_shape(layer_ops):
    ex = make_executor(load_plan("nano-4"), layer_ops, torch.device("cpu"))
    layers = [layer_ops] * 32
    before = ex.num_builds
    for _ in range(20):
        for d, prefill in ((64, (100, 36)), (200, ())):
            prog = ex.program(layers, BatchRows(synthetic_batch(d, prefill)))
    assert ex.num_builds - before == 2  # one per shape
    assert ex.program(layers, BatchRows(synthetic_batch(200, ()))) is prog
    shape = GraphShape(256, 192, 224)
    assert ex.program(layers, shape) is ex.program(layers, shape) and ex.num_builds - before == 3
    # segments: one stream each; every wait refers to an event an earlier segment recorded
    recorded = set()
    for seg in prog.segments:
        assert len({n.stream for n in seg.nodes}) == 1 and seg.nodes
        assert set(seg.waits) <= recorded
        if seg.record >= 0:
            recorded.add(seg.record)
    assert prog.num_nodes == sum(len(r) for r in prog.rounds)


def test_prefill_cut_plans_refuse_graphs(layer_ops):
    d = load_plan("overlap-2").to_dict()
    d["ops"]["prefill_attn"]["cuts"] = [{"of": "prefill", "at": 0.5}]
    d["order"] = [e if e != "prefill_attn.0" else "prefill_attn.0" for e in d["order"]]
    d["order"].insert(d["order"].index("prefill_attn.0") + 1, "prefill_attn.1")
    ex = make_executor(Plan.from_dict(d), layer_ops, torch.device("cpu"))
    assert "prefill_attn" in ex.graph_capable()
    assert make_executor(load_plan("overlap-2"), layer_ops, torch.device("cpu")).graph_capable() is None


# ---- the graph form end to end on CPU ------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("graphs"), num_layers=6)


def _greedy(ckpt, plan: str, prompts, graphs: bool, budget: int = 24):
    def use_graph_form(llm):  # the graph form without capture (CPU): fixed buffers, device-side counts, padding
        r = llm.engine.runner
        r.graphs = GraphSet(r.model, r.workspace, r.kv_caches, r.block_size, 64, capture=False)
    tokens, llm = greedy_run(ckpt, prompts, 8, use_graph_form if graphs else None,
                             max_num_batched_tokens=budget, plan=plan)
    return tokens, llm.engine.runner


def test_graph_form_gives_the_sequential_tokens(ckpt, tmp_path):
    rng = random.Random(3)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.randrange(2, 30))] for _ in range(7)]
    reference, _ = _greedy(ckpt, "sequential", prompts, graphs=False)
    extra = []
    for i, plan in enumerate(_plans_under_test()[len(PLANS):]):
        extra.append(tmp_path / f"extra{i}.json")
        extra[-1].write_text(json.dumps(plan.to_dict()))
    for plan in [*PLANS, *map(str, extra)]:
        tokens, runner = _greedy(ckpt, plan, prompts, graphs=True)
        assert tokens == reference, plan
        assert runner.graphs.stats["eager_graph_steps"] == len(runner.step_log) > 0
        assert all(r.graph for r in runner.step_log)
