"""The profiler of NanoFlow's auto-search: times each op of one decoder layer, alone, on row ranges of
a synthetic dense batch, for a grid of nano-batch sizes and SM budgets; and the interference of a
memory-bound op (decode attention, on a high-priority stream, launched first) running at the same
time as each compute-stream op. It fills a `ProfileTable` (profile.py).

Timing: CUDA events on the GPU, with a device-side sleep queued first so the host has enqueued the
timed calls before they start (kernel time, not launch gaps); median of several reps. On CPU the host
clock (tests; no streams, so no interference table).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Callable

import torch

from nanoflow.autosearch.profile import (DEFAULT_MEMORY_BUDGETS, QUICK_MEMORY_BUDGETS, decode_sizes, dense_batch,
                                         op_meta, progress_bar, token_sizes)
from nanoflow.pipeline.profile_table import ProfileTable, budget_key, is_side_op
from nanoflow.pipeline.workload_class import WorkloadClass


# ---- timing --------------------------------------------------------------------------------------
class _Timer:
    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"
        self.can_sleep = self.cuda and hasattr(torch.cuda, "_sleep")
        self.cycles_per_ms = 1.8e6
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            rate = getattr(props, "clock_rate", None)  # kHz when present
            if rate:
                self.cycles_per_ms = float(rate)

    def sleep(self, launches: int) -> None:
        """Keep the GPU busy while the host enqueues `launches` kernels (~40 us each, generous)."""
        if self.can_sleep:
            torch.cuda._sleep(int(self.cycles_per_ms * (0.3 + 0.05 * launches)))

    def time(self, fn: Callable[[], None]) -> float:
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize(self.device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps + 1)]
        self.sleep(self.reps * 2)
        events[0].record()
        for i in range(self.reps):
            fn()
            events[i + 1].record()
        torch.cuda.synchronize(self.device)
        return statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(self.reps))

    def time_pair(self, side: Callable[[], None], comp: Callable[[], None], comp_reps: int,
                  side_stream, comp_stream, reps: int) -> tuple[float, float]:
        """The side op launched first on its (high-priority) stream, then comp_reps calls of comp on
        another stream, both released by one event: ms until each stream's last kernel ends (median)."""
        side_ms, comp_ms = [], []
        main = torch.cuda.current_stream(self.device)
        for _ in range(reps):
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            side_end = torch.cuda.Event(enable_timing=True)
            comp_end = torch.cuda.Event(enable_timing=True)
            self.sleep(comp_reps + 4)
            start.record(main)
            side_stream.wait_event(start)
            comp_stream.wait_event(start)
            with torch.cuda.stream(side_stream):
                side()
                side_end.record(side_stream)
            with torch.cuda.stream(comp_stream):
                for _ in range(comp_reps):
                    comp()
                comp_end.record(comp_stream)
            main.wait_stream(side_stream)
            main.wait_stream(comp_stream)
            torch.cuda.synchronize(self.device)
            side_ms.append(start.elapsed_time(side_end))
            comp_ms.append(start.elapsed_time(comp_end))
        return statistics.median(side_ms), statistics.median(comp_ms)


# ---- the profiler --------------------------------------------------------------------------------
def _versions() -> tuple[str, str | None]:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return torch.__version__, tv


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def profile_engine(engine, wl: WorkloadClass, *, quick: bool = False, memory_budgets=None,
                   reps: int | None = None, step: int | None = None, max_seconds: float | None = None,
                   interference: bool = True, progress: bool = True, log: Callable[[str], None] = print
                   ) -> ProfileTable:
    """Profiles layer 0 of `engine.model` on a synthetic dense batch of `wl` (see dense_batch).

    Grid: memory-stream ops (decode attention) on decode-row sizes x ({full} + memory budgets);
    compute ops (GEMMs, prefill attention) on token-row sizes x ({full} + num_sms - memory budget);
    other ops (norms, rope, activation) at full device. Essential entries (full device) are timed
    first; past max_seconds the remaining budgets are skipped (the search then does not use them)."""
    from nanoflow.models.llama import StepState

    t_start = time.perf_counter()
    device = engine.device
    cuda = device.type == "cuda"
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else None
    if memory_budgets is None:
        memory_budgets = QUICK_MEMORY_BUDGETS if quick else DEFAULT_MEMORY_BUDGETS
    memory_budgets = sorted({int(b) for b in memory_budgets if num_sms and 0 < b < num_sms}) if cuda else []
    compute_budgets = [num_sms - b for b in memory_budgets] if cuda else []
    reps = reps or (3 if quick or not cuda else 5)
    step = step or (256 if quick else 128)
    max_seconds = max_seconds if max_seconds is not None else (90.0 if quick else 200.0)
    timer = _Timer(device, reps, warmup=2 if cuda else 1)
    layer_ops = engine.model.layers[0].ops
    metas = [op_meta(op) for op in layer_ops]
    torch_v, triton_v = _versions()
    notes: list[str] = []
    with dense_batch(engine, wl) as batch:
        T, D = batch.num_tokens, batch.num_decode
        starts = batch.query_start_loc_cpu
        chunks = [starts[i + 1] - starts[i] for i in range(D, batch.num_reqs)]
        table = ProfileTable(
            device=device_name(device), num_sms=num_sms, torch_version=torch_v, triton_version=triton_v,
            model=asdict(engine.model_config), dtype=str(engine.model.dtype).replace("torch.", ""),
            tp=engine.config.tensor_parallel_size,
            dense_batch=engine.scheduler.config.token_budget, workload=wl.to_dict(), num_tokens=T,
            num_decode=D, prefill_chunks=chunks, ops=metas, memory_budgets=list(memory_budgets),
            compute_budgets=list(compute_budgets), timing="cuda-events" if cuda else "host-clock",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), notes=notes)
        state = StepState(batch, engine.runner.workspace, engine.runner.kv_caches)
        tok_sizes, dec_sizes = token_sizes(T, D, step), decode_sizes(D, step if D > 4 * step else 64)

        def call(op, lo: int, hi: int, budget: int | None) -> Callable[[], None]:
            def run() -> None:
                state.sm_budget = budget
                op.fn(state, lo, hi)
            return run

        with torch.inference_mode():
            engine.runner.forward(batch)  # fills every workspace buffer (on every rank under TP)
            tasks = _alone_tasks(layer_ops, metas, T, D, tok_sizes, dec_sizes, memory_budgets, compute_budgets)
            _share_network_calls(engine, layer_ops, tasks, timer)
            log(f"[tune] profiling {len(tasks)} op timings on {table.device} "
                f"({T} tokens: {D} decode + {T - D} prefill; {reps} reps each)")
            skipped = 0
            failed: set[tuple[str, int | None]] = set()
            bar = progress_bar(tasks, desc="profile ops", unit="op", disable=not progress)
            for essential, op, budget, lo, hi in bar:
                if (op.name, budget) in failed:
                    continue
                if not essential and time.perf_counter() - t_start > max_seconds:
                    skipped += 1
                    continue
                bar.set_postfix_str(f"{op.name}@{budget_key(budget)}", refresh=False)
                try:
                    ms = timer.time(call(op, lo, hi, budget))
                except Exception as exc:  # noqa: BLE001 - a budget the kernels refuse: drop that budget
                    if essential:
                        raise
                    failed.add((op.name, budget))
                    table.alone.get(op.name, {}).pop(budget_key(budget), None)
                    notes.append(f"{op.name} at {budget} SMs failed ({type(exc).__name__}: {exc})"[:300])
                    log(f"[tune] warning: {notes[-1]}")
                    continue
                table.alone.setdefault(op.name, {}).setdefault(budget_key(budget), {})[str(hi - lo)] = ms
            bar.close()
            if skipped:
                notes.append(f"{skipped} budgeted timings skipped after {max_seconds:.0f} s")
                log(f"[tune] warning: time limit reached, {skipped} budgeted timings skipped")
            _drop_incomplete_budgets(table, layer_ops, tok_sizes, dec_sizes, notes)
            if cuda and interference and D > 0:
                _profile_interference(table, layer_ops, metas, call, timer, T, D, reps, progress,
                                      t_start, max_seconds + (30.0 if quick else 60.0), log)
            elif not cuda:
                notes.append("interference not measured (no CUDA streams on CPU)")
            state.sm_budget = None
        if cuda:
            torch.cuda.synchronize(device)
    table.seconds = time.perf_counter() - t_start
    return table


def _alone_tasks(layer_ops, metas, T, D, tok_sizes, dec_sizes, memory_budgets, compute_budgets):
    """(essential, op, budget, lo, hi): full-device entries first, then budgets, the most useful first
    (mid-range memory budgets, whose compute complement is likely chosen)."""
    essential, extra = [], []
    order = sorted(memory_budgets, key=lambda b: abs(b - 40))
    for op, m in zip(layer_ops, metas):
        if m["scope"] == "decode":
            ranges = [(0, n) for n in dec_sizes] if D else []
        elif m["scope"] == "prefill":
            ranges = [(D, T)] if T > D else []
        else:
            ranges = [(0, n) for n in tok_sizes]
        essential += [(True, op, None, lo, hi) for lo, hi in ranges]
        if m["resource"] == "network":
            budgets = []  # collectives: NCCL's CTA limit is the group's (EngineConfig), not per op
        elif is_side_op(m):
            budgets = order
        elif m["resource"] == "compute":
            complement = dict(zip(memory_budgets, compute_budgets))
            budgets = [complement[b] for b in order]
        else:
            budgets = []
        for rank, b in enumerate(budgets):
            extra += [(rank, False, op, b, lo, hi) for lo, hi in ranges]
    extra.sort(key=lambda t: t[0])  # budget by budget, so a time limit drops whole budgets
    return essential + [t[1:] for t in extra]


def _share_network_calls(engine, layer_ops, tasks, timer: _Timer) -> None:
    """Collectives need every rank: the worker ranks are told the network-op calls the timing loop
    will make (all essential, so none is skipped), and make them too, in the same order."""
    index = {op.name: i for i, op in enumerate(layer_ops)}
    calls = [(index[op.name], lo, hi, timer.warmup + timer.reps) for _, op, _, lo, hi in tasks
             if op.resource.value == "network"]
    if calls:
        engine.runner.share_calls(calls)


def _drop_incomplete_budgets(table: ProfileTable, layer_ops, tok_sizes, dec_sizes, notes) -> None:
    """A memory budget is usable only if the side ops and every compute op have all sizes for it
    (network ops are profiled on the whole device only)."""
    keep_m, keep_c = [], []
    for b, c in zip(table.memory_budgets, table.compute_budgets):
        ok = True
        for o in table.ops:
            want = None
            if o["resource"] == "network":
                continue
            if is_side_op(o):
                want = b
            elif o["resource"] == "compute":
                want = c
            if want is None:
                continue
            if o["scope"] == "prefill" and table.num_prefill == 0 or o["scope"] == "decode" and not table.num_decode:
                continue
            series = table.alone.get(o["name"], {}).get(budget_key(want), {})
            need = 1 if o["scope"] == "prefill" else len(dec_sizes if o["scope"] == "decode" else tok_sizes)
            if len(series) < need:
                ok = False
        if ok:
            keep_m.append(b)
            keep_c.append(c)
        else:
            notes.append(f"memory budget {b} dropped (incomplete timings)")
    table.memory_budgets, table.compute_budgets = keep_m, keep_c


def _profile_interference(table: ProfileTable, layer_ops, metas, call, timer: _Timer, T: int, D: int,
                          reps: int, progress: bool, t_start: float, max_seconds: float, log) -> None:
    device = timer.device
    side_stream = torch.cuda.Stream(device=device, priority=-1)
    comp_stream = torch.cuda.Stream(device=device, priority=0)
    sides = [(op, m) for op, m in zip(layer_ops, metas) if is_side_op(m) and m["scope"] == "decode"]
    comps = [(op, m) for op, m in zip(layer_ops, metas) if not is_side_op(m) and m["resource"] != "network"
             and (m["scope"] != "prefill" or T > D)]
    tasks = []
    for side, _ in sides:
        for b in [None, *table.memory_budgets]:
            c_budget = None if b is None else table.num_sms - b
            for comp, m in comps:
                tasks.append((side, b, comp, m, "free", None))
                if b is not None and m["resource"] == "compute":
                    tasks.append((side, b, comp, m, "shared", c_budget))
    log(f"[tune] measuring interference: {len(tasks)} pairs (memory op first on a high-priority stream)")
    bar = progress_bar(tasks, desc="interference", unit="pair", disable=not progress)
    skipped = 0
    for side, b, comp, m, mode, c_budget in bar:
        if time.perf_counter() - t_start > max_seconds:
            skipped += 1
            continue
        bar.set_postfix_str(f"{side.name}@{budget_key(b)} + {comp.name} ({mode})", refresh=False)
        lo, hi = (D, T) if m["scope"] == "prefill" else (0, T)
        if (b is not None and b not in table.memory_budgets) or \
                (c_budget is not None and not table.has_budget(comp.name, c_budget)):
            continue  # a budget dropped above
        side_fn = call(side, 0, D, b)
        comp_fn = call(comp, lo, hi, c_budget)
        try:
            side_alone = timer.time(side_fn)
            comp_alone = timer.time(comp_fn)
            comp_reps = max(1, min(256, math.ceil(2.0 * side_alone / max(comp_alone, 1e-4))))
            side_ms, comp_ms = timer.time_pair(side_fn, comp_fn, comp_reps, side_stream, comp_stream,
                                               max(2, reps - 2))
        except Exception as exc:  # noqa: BLE001
            table.notes.append(f"interference {side.name}@{b} + {comp.name}: {type(exc).__name__}: {exc}"[:300])
            log(f"[tune] warning: {table.notes[-1]}")
            continue
        table.interference.append({
            "side_op": side.name, "side_budget": b, "comp_op": comp.name, "mode": mode, "comp_budget": c_budget,
            "comp_reps": comp_reps, "side_rows": D, "comp_rows": hi - lo, "side_alone_ms": side_alone,
            "comp_alone_ms": comp_alone, "side_ms": side_ms, "comp_ms": comp_ms})
    bar.close()
    if skipped:
        table.notes.append(f"{skipped} interference pairs skipped (time limit)")
        log(f"[tune] warning: time limit reached, {skipped} interference pairs skipped")
