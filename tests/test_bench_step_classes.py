"""bench throughput --compare: steps classified by the decode share of their tokens, tokens/s and the
plan ratio per class, and the GPU busy share inside a step (from device intervals)."""
from __future__ import annotations

import json

import pytest

from nanoflow.bench.busy_share import busy_figures, format_busy, summarise
from nanoflow.bench.step_stats import (STEP_CLASSES, class_figures, class_ratios, format_classes,
                                       step_class)
from nanoflow.bench.throughput import format_table, run_throughput
from nanoflow.engine.runner import StepRecord


def test_step_class_by_decode_share():
    assert step_class(572, 572) == "decode-only"
    assert step_class(1, 1) == "decode-only"
    assert step_class(1084, 572) == "mixed"       # 53% decode
    assert step_class(1000, 500) == "mixed"       # the boundary belongs to mixed
    assert step_class(2048, 572) == "prefill-heavy"
    assert step_class(2048, 0) == "prefill-heavy"
    for bad in ((0, 0), (4, 5), (4, -1)):
        with pytest.raises(ValueError):
            step_class(*bad)


def _records(spec):
    return [StepRecord(t, d, plan, graph) for t, d, plan, graph in spec]


def test_class_figures_and_ratios():
    records = _records([(2048, 100, False, True), (2048, 1500, True, True), (600, 600, True, False),
                        (600, 600, True, True)])
    figs = class_figures(records, [50.0, 45.0, 20.0, 30.0])
    assert figs["prefill-heavy"] == pytest.approx({"steps": 1, "tokens": 2048, "ms": 50.0, "plan_steps": 0,
                                                   "graph_steps": 1, "tokens_per_s": 2048 / 0.05})
    assert figs["decode-only"]["tokens_per_s"] == pytest.approx(1200 / 0.05)
    assert figs["mixed"]["plan_steps"] == 1
    assert figs["all steps"]["steps"] == 4 and figs["all steps"]["ms"] == pytest.approx(145.0)
    assert figs["all steps"]["graph_steps"] == 3
    slower = class_figures(records, [50.0, 60.0, 40.0, 40.0])
    ratios = class_ratios(figs, slower)
    assert ratios["prefill-heavy"] == pytest.approx(1.0)
    assert ratios["mixed"] == pytest.approx(60 / 45)
    assert ratios["decode-only"] == pytest.approx(80 / 50)
    none = class_figures(_records([(10, 10, False, False)]), [1.0])
    assert class_ratios(none, figs)["mixed"] is None  # no mixed steps in one run
    text = "\n".join(format_classes([("a", figs), ("b", slower)], ratios, 1.23, "device time"))
    for name in (*STEP_CLASSES, "all steps", "end to end", "1.230x", "1.600x"):
        assert name in text
    with pytest.raises(ValueError, match="step records"):
        class_figures(records, [1.0])


def test_busy_figures_sequential_and_overlapped():
    seq = busy_figures([(0, 10), (12, 20), (25, 30)])  # gaps of 2 and 5 us
    assert seq["span_us"] == 30 and seq["kernel_us"] == 23 and seq["covered_us"] == 23
    assert seq["kernel_over_span"] == pytest.approx(23 / 30) and seq["covered_over_span"] == pytest.approx(23 / 30)
    over = busy_figures([(0, 20), (5, 15), (18, 30)])   # two streams at once
    assert over["kernel_us"] == 42 and over["covered_us"] == 30 and over["kernel_over_span"] > 1
    assert over["covered_over_span"] == pytest.approx(1.0)
    assert busy_figures([]) is None
    summary = summarise([("decode-only", seq), ("decode-only", over), ("mixed", seq)])
    assert summary["decode-only"]["steps"] == 2 and "prefill-heavy" not in summary
    assert "decode-only" in format_busy("overlap-2", {"classes": summary})


def test_compare_reports_every_class_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    result = run_throughput(model="default", device="cpu", workload="constant:16:8", num_requests=8,
                            warmup_requests=1, plan="overlap-2", compare="sequential", output_json=str(out),
                            use_tqdm=False, max_num_batched_tokens=64)
    saved = json.loads(out.read_text())
    for run in (saved, saved["compare"]):
        figs = run["step_classes"]
        assert run["step_timing"] == "host time"
        assert figs["all steps"]["steps"] == run["steps"]["num_steps"]
        assert figs["all steps"]["tokens"] == 8 * 16 + 8 * 7  # prompts + all but the last output token
        assert sum(figs[c]["steps"] for c in STEP_CLASSES) == figs["all steps"]["steps"]
        assert figs["decode-only"]["steps"] > 0 and figs["prefill-heavy"]["steps"] > 0
    assert set(saved["compare"]["class_ratios"]) == {*STEP_CLASSES, "all steps"}
    assert saved["step_classes"]["all steps"]["plan_steps"] == saved["plan_steps"]
    table = format_table(result)
    assert "per step class" in table and "end to end" in table and "decode-only" in table
