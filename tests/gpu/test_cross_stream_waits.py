"""The executor's cross-stream waits, tested where they matter: on a GPU, with streams that really
run at the same time (on CPU nano-ops run in issue order, so a missing wait cannot show).

A synthetic layer of two ops on two streams, cut into two nano-batches each: `produce` (h = 3x + l + 1,
preceded by a GPU sleep so it finishes long after it is issued) and `consume` (x = h - l), run through
the real PlanExecutor for several layers (more than TEMPLATE_LAYERS, so the replicated rounds' waits
are exercised too). Every consume waits for the produce of its rows on the other stream, and every
produce of the next layer for the consume before it. The result must equal the same arithmetic done
in order. As a self-check the same run with the executor's waits stripped from its program
(make_program wrapped) must give a *different* result: proof that this test detects a missing wait.
Both for eager issue and for a CUDA graph captured from the executor's issue."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nanoflow.pipeline import executor as executor_mod
from nanoflow.pipeline.ops import Op, Resource
from nanoflow.pipeline.plan import Plan

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

ROWS = 4096
LAYERS = 7
SLEEP_CYCLES = 20_000_000
"""GPU sleep before every produce nano-op (~10 ms at H100 clocks): a consume that does not wait
for it runs long before it."""
SENTINEL = -12345


def _plan(slow_on_main: bool) -> Plan:
    """produce and consume on different streams, each cut at half of the rows."""
    producer, consumer = ("main", "side") if slow_on_main else ("side", "main")
    half = [{"of": "tokens", "at": 0.5}]
    return Plan.from_dict({
        "name": f"race-{producer}",
        "streams": [{"name": "main"}, {"name": "side", "priority": -1}],
        "ops": {"produce": {"stream": producer, "cuts": half}, "consume": {"stream": consumer, "cuts": half}},
    })


def _layers(buffers: dict[str, torch.Tensor], sleep: bool) -> list[list[Op]]:
    x, h = buffers["x"], buffers["h"]
    layers = []
    for layer in range(LAYERS):
        def produce(state, lo, hi, layer=layer):
            if sleep:
                torch.cuda._sleep(SLEEP_CYCLES)
            torch.mul(x[lo:hi], 3, out=h[lo:hi])
            h[lo:hi].add_(layer + 1)

        def consume(state, lo, hi, layer=layer):
            torch.sub(h[lo:hi], layer, out=x[lo:hi])

        layers.append([Op("produce", Resource.COMPUTE, produce, reads=("x",), writes=("h",)),
                       Op("consume", Resource.MEMORY, consume, reads=("h",), writes=("x",))])
    return layers


def _start(device) -> torch.Tensor:
    return (torch.arange(ROWS, device=device, dtype=torch.int64) % 7) - 3


def _expected() -> torch.Tensor:
    x = _start("cpu")
    for layer in range(LAYERS):
        x = 3 * x + layer + 1 - layer
    return x


def _state():
    return SimpleNamespace(batch=SimpleNamespace(num_tokens=ROWS, num_decode=0), sm_budget=None, stream_sms=None)


def _reset(buffers):
    buffers["x"].copy_(_start(buffers["x"].device))
    buffers["h"].fill_(SENTINEL)


def _strip_waits(monkeypatch) -> list[int]:
    """Wrap the executor's make_program so its programs have no cross-stream waits; returns a list
    that receives the number of waits removed per program built."""
    removed: list[int] = []
    real = executor_mod.make_program

    def no_waits(rounds):
        prog = real(rounds)
        removed.append(sum(len(seg.waits) for seg in prog.segments))
        for seg in prog.segments:
            seg.waits = []
        return prog

    monkeypatch.setattr(executor_mod, "make_program", no_waits)
    return removed


def _run_eager(slow_on_main: bool, device) -> torch.Tensor:
    buffers = {"x": torch.empty(ROWS, dtype=torch.int64, device=device),
               "h": torch.empty(ROWS, dtype=torch.int64, device=device)}
    layers = _layers(buffers, sleep=device.type == "cuda")
    ex = executor_mod.PlanExecutor(_plan(slow_on_main), layers[0], device)
    _reset(buffers)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ex.run(layers, _state())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return buffers["x"].cpu()


def _run_graph(slow_on_main: bool, device) -> list[torch.Tensor]:
    """Captures one step of the executor into a CUDA graph (as graphs.py's single-graph mode does:
    the executor forks its side stream from the capturing stream and joins it back), then replays
    it twice on reset buffers: the result of each replay."""
    buffers = {"x": torch.empty(ROWS, dtype=torch.int64, device=device),
               "h": torch.empty(ROWS, dtype=torch.int64, device=device)}
    layers = _layers(buffers, sleep=True)
    ex = executor_mod.PlanExecutor(_plan(slow_on_main), layers[0], device)
    _reset(buffers)
    ex.run(layers, _state())  # the program is built (and cached) outside the capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        graph.capture_begin()
        ex.run(layers, _state())
        graph.capture_end()
    torch.cuda.synchronize(device)
    results = []
    for _ in range(2):
        _reset(buffers)
        torch.cuda.synchronize(device)
        graph.replay()
        torch.cuda.synchronize(device)
        results.append(buffers["x"].cpu())
    return results


def test_race_plan_has_waits_both_ways_and_the_sabotage_strips_them(monkeypatch):
    """Runs everywhere (CPU included): the synthetic plan's program waits across streams in both
    directions, and the wrapped make_program really removes the waits (so the GPU self-check below
    sabotages what it claims to). On CPU the result is right either way: issue order."""
    device = torch.device("cpu")
    layers = _layers({"x": torch.empty(ROWS, dtype=torch.int64), "h": torch.empty(ROWS, dtype=torch.int64)},
                     sleep=False)
    ex = executor_mod.PlanExecutor(_plan(True), layers[0], device)
    prog = ex.program(layers, executor_mod.BatchRows(_state().batch))
    waiting_streams = {seg.stream for seg in prog.segments if seg.waits}
    assert waiting_streams == {0, 1}, [(s.stream, s.waits) for s in prog.segments]
    removed = _strip_waits(monkeypatch)
    sabotaged = executor_mod.PlanExecutor(_plan(True), layers[0], device)
    prog2 = sabotaged.program(layers, executor_mod.BatchRows(_state().batch))
    assert removed and removed[0] == sum(len(s.waits) for s in prog.segments) > 0
    assert not any(seg.waits for seg in prog2.segments)
    assert torch.equal(_run_eager(True, device), _expected())


@needs_cuda
@pytest.mark.parametrize("slow_on_main", [True, False], ids=["slow-main", "slow-side"])
def test_eager_cross_stream_waits(slow_on_main, monkeypatch):
    device = torch.device("cuda")
    want = _expected()
    got = _run_eager(slow_on_main, device)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {ROWS} rows differ with the waits in place"
    removed = _strip_waits(monkeypatch)
    sabotaged = _run_eager(slow_on_main, device)
    assert removed and removed[0] > 0
    assert not torch.equal(sabotaged, want), \
        "with the cross-stream waits removed the result is still right: this test would not catch a missing wait"


@needs_cuda
@pytest.mark.parametrize("slow_on_main", [True, False], ids=["slow-main", "slow-side"])
def test_graph_replay_cross_stream_waits(slow_on_main, monkeypatch):
    device = torch.device("cuda")
    want = _expected()
    for got in _run_graph(slow_on_main, device):
        assert torch.equal(got, want), f"{int((got != want).sum())} of {ROWS} rows differ with the waits in place"
    removed = _strip_waits(monkeypatch)
    sabotaged = _run_graph(slow_on_main, device)
    assert removed and removed[0] > 0
    assert not all(torch.equal(s, want) for s in sabotaged), \
        "graph without the cross-stream waits still gives the right result: this test would not catch it"
