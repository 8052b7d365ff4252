"""How busy the GPU is inside a step: the device intervals (kernels, copies) torch.profiler records
for one step, against the step's device span (first start to last end).

- kernel time / span: the sum of the intervals over the span. Below 1 the GPU idled inside the step
  (launch gaps, waits for the host); above 1 kernels ran at the same time (overlap).
- covered / span: the share of the span with at least one interval running (1 - idle inside).

`measure_busy_share` runs an untimed sample of requests synchronously (one step per engine.step)
and profiles every `every`-th step, so each profiled window holds exactly one step's work; steps are
classified like the timed run's (bench.step_stats.step_class).
"""
from __future__ import annotations

import statistics

from nanoflow.bench.step_stats import STEP_CLASSES, step_class


def busy_figures(intervals: list[tuple[float, float]]) -> dict | None:
    """{'kernel_us', 'span_us', 'covered_us', 'kernel_over_span', 'covered_over_span'} of device
    intervals (start, end) in microseconds; None when there are none."""
    spans = sorted((a, b) for a, b in intervals if b >= a)
    if not spans:
        return None
    start, end = spans[0][0], max(b for _, b in spans)
    kernel = sum(b - a for a, b in spans)
    covered, reach = 0.0, None
    for a, b in spans:
        if reach is None or a > reach:
            covered += b - a
            reach = b
        elif b > reach:
            covered += b - reach
            reach = b
    span = end - start
    return {"kernel_us": kernel, "span_us": span, "covered_us": covered,
            "kernel_over_span": kernel / span if span > 0 else None,
            "covered_over_span": covered / span if span > 0 else None}


def summarise(samples: list[tuple[str, dict]]) -> dict[str, dict]:
    """Median figures per step class over (class, busy_figures) samples."""
    out = {}
    for name in STEP_CLASSES:
        figs = [f for c, f in samples if c == name and f and f["span_us"] > 0]
        if figs:
            out[name] = {"steps": len(figs),
                         "kernel_over_span": statistics.median(f["kernel_over_span"] for f in figs),
                         "covered_over_span": statistics.median(f["covered_over_span"] for f in figs),
                         "span_ms": statistics.median(f["span_us"] for f in figs) / 1e3}
    return out


def device_intervals(prof) -> list[tuple[float, float]]:
    """(start, end) in us of the device activities (kernels, memcpy, memset) a profile recorded."""
    from torch.autograd import DeviceType
    try:
        events = prof.profiler.kineto_results.events()
        return [(e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3) for e in events
                if e.device_type() == DeviceType.CUDA]
    except AttributeError:  # older / newer profiler layouts
        return [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]


def measure_busy_share(llm, prompts: list[dict], params, every: int = 8) -> dict:
    """Runs the prompts to completion, synchronously, profiling every `every`-th step (CUDA only)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    runner = engine.runner
    saved = engine.config.async_scheduling
    engine.config.async_scheduling = False  # one step per engine.step(): a profile window holds one step
    samples: list[tuple[str, dict]] = []
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"__busy_{i}", prompt["prompt_token_ids"], p)
        step = 0
        while engine.has_unfinished_requests():
            step += 1
            if step % every:
                engine.step()
                continue
            torch.cuda.synchronize(engine.device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.step()
                torch.cuda.synchronize(engine.device)
            rec = runner.step_log[-1] if runner.step_log else None
            if rec is not None:
                samples.append((step_class(rec.num_tokens, rec.num_decode), busy_figures(device_intervals(prof))))
    finally:
        engine.config.async_scheduling = saved
    return {"every": every, "requests": len(prompts), "profiled_steps": len(samples), "classes": summarise(samples)}


def format_busy(label: str, busy: dict | None) -> str | None:
    if not busy or not busy.get("classes"):
        return None
    cells = [f"{name} {f['kernel_over_span']:.2f} / {f['covered_over_span']:.2f} ({f['steps']} steps, "
             f"{f['span_ms']:.1f} ms)" for name, f in busy["classes"].items()]
    return f"GPU busy inside a step, plan {label!r} (kernel time / span, covered / span): " + "; ".join(cells)
