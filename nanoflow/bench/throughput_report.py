"""What `nanoflow bench throughput` prints: one line per timed run and the summary table."""
from __future__ import annotations

from nanoflow.bench.busy_share import format_busy
from nanoflow.bench.conversations import format_kv_reuse
from nanoflow.bench.step_stats import format_classes


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def print_run(label: str, run: dict) -> None:
    print(f"[bench] {label}: {run['requests']} requests in {run['wall_s']:.2f} s, "
          f"{_fmt(run['total_tokens_per_s'])} total tokens/s, {_fmt(run['output_tokens_per_s'])} output tokens/s",
          flush=True)


def format_table(result: dict) -> str:
    """The compact summary printed at the end of a run."""
    header = ("system", "plan", "requests", "wall s", "total tok/s", "output tok/s", "req/s",
              "steady tok/s", "% opt", "% opt steady")
    rows = []
    for label, run in (("nanoflow", result), ("nanoflow compare", result.get("compare"))):
        if run is None:
            continue
        if run.get("variant"):
            label = f"nanoflow {run['variant']}"
        rows.append((label, run["plan"], str(run["requests"]), f"{run['wall_s']:.2f}",
                     _fmt(run["total_tokens_per_s"]), _fmt(run["output_tokens_per_s"]),
                     _fmt(run["requests_per_s"], 2), _fmt(run["steady_state_total_tokens_per_s"]),
                     _fmt(run["pct_of_optimal"], 1), _fmt(run["steady_state_pct_of_optimal"], 1)))
    base = result.get("baseline")
    if base is not None:
        optimal = result["optimal_tokens_per_s"]
        rows.append(("transformers", f"static bs={base['batch_size']}", str(base["requests"]),
                     f"{base['wall_s']:.2f}", _fmt(base["total_tokens_per_s"]),
                     _fmt(base["output_tokens_per_s"]), _fmt(base["requests_per_s"], 2), "n/a",
                     _fmt(100.0 * base["total_tokens_per_s"] / optimal, 1), "n/a"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    gemm = result["gemm"]
    flag = " (CPU or small n: % of optimal is only illustrative)" if gemm["illustrative"] else ""
    out = [
        f"== nanoflow bench throughput: {result['model']} ({result['num_params'] / 1e9:.3f}B params, "
        f"{result['dtype']}) on {result['device_name']}, workload {result['workload']}, {result['date']}",
        f"GEMM peak {gemm['tflops']:.4g} TFLOP/s ({gemm['dtype']} n={gemm['n']}, median of {gemm['iters']})"
        f"{flag}; optimal {_fmt(result['optimal_tokens_per_s'])} tokens/s"
        + (f" ({result['num_gpus']} GPUs x the one-GPU peak)" if result.get("num_gpus", 1) > 1 else ""),
        line(header), line(["-" * w for w in widths]), *(line(r) for r in rows),
        "total tok/s = (prompt + output tokens) / wall time of the timed region (end-to-end); "
        "steady = middle 80% of steps by time",
    ]
    for run in (result, result.get("compare")):
        load = run and run.get("host_load")
        if load and load["contended"]:
            out.append(f"WARNING: other processes used {100 * load['other_fraction']:.0f}% of the CPUs during "
                       f"the timed run of plan {run['plan']!r}: its figures are unreliable")
    idle = result.get("gpu_idle")
    if idle:
        out.append(f"GPU idle between steps: {100 * idle['idle_fraction']:.1f}% of the run "
                   f"(mean gap {idle['mean_idle_gap_ms']:.3f} ms over {idle['steps']} steps; CUDA events)")
    for run in (result, result.get("compare")):
        if run is not None and run.get("plan_steps") and run.get("steps"):
            choice = run.get("plan_choice")
            why = "predicted to lose" if not choice else (
                f"predicted or measured to lose; timed buckets: plan kept in {choice['plan_kept']}, "
                f"vetoed in {choice['plan_vetoed']} of {choice['judged']}")
            out.append(f"plan {run['plan']!r} ran on {run['plan_steps']} of {run['steps']['num_steps']} steps "
                       f"(the others sequentially: {why})")
    for run in (result, result.get("compare")):
        if run is not None and run.get("kv"):
            out.append(format_kv_reuse(f"nanoflow {run.get('variant') or run['plan']}", run["kv"]))
    compare = result.get("compare")
    if result.get("step_classes"):
        runs = [(result["plan"], result["step_classes"])]
        if compare is not None and compare.get("step_classes") and not compare.get("variant"):
            runs.append((compare["plan"], compare["step_classes"]))
        ratios = compare.get("class_ratios") if compare is not None and len(runs) == 2 else None
        out += format_classes(runs, ratios, compare["ratio"] if ratios is not None else None,
                              result.get("step_timing") or "time")
    for run in (result, compare):
        line_busy = run is not None and format_busy(run["plan"], run.get("busy"))
        if line_busy:
            out.append(line_busy)
    for g in ((compare or result).get("graphs") or ()):  # one engine: the latest run lists every plan
        out.append(f"CUDA graphs, plan {g['plan']!r}: {g['mode']}, {g['graphs']} shapes captured"
                   + (f" ({g['reason']})" if g.get("reason") else ""))
    if compare is not None and compare.get("variant"):
        out.append(f"{compare['ratio_means']}: {compare['ratio']:.3f}x")
        if compare.get("prefill_ratio") is not None:
            out.append(f"prefill tokens computed, {compare['variant']} / {result['variant']}: "
                       f"{compare['prefill_ratio']:.2f}x")
    elif compare is not None:
        out.append(f"plan ratio {result['plan']!r} / {result['compare']['plan']!r}: {result['compare']['ratio']:.3f}x")
    if base is not None:
        out.append(f"nanoflow / transformers: {base['ratio']:.2f}x ({base['ratio_means']})")
    if not result["exact_output_lengths"]:
        out.append(f"WARNING: generated {result['output_tokens']} output tokens, expected "
                   f"{result['expected_output_tokens']}")
    return "\n".join(out)
