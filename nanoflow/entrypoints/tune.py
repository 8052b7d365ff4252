"""`nanoflow tune --model M`: profile the layer's ops on this device, search pipeline plans with the
MILP (stage 1, then SM shares + interference in stage 2), run the best few for real on the same
synthetic dense batch, and cache the fastest for `--plan auto` (sequential unless a plan beats it beyond
the timing noise; on CPU only with --store).

    nanoflow tune --model llama-3-8b --quick           # ~2-3 minutes on an H200
    nanoflow tune --model llama-3-8b --workload splitwise --output plan.json --gantt plan.png
    nanoflow tune --model llama-3-70b --load-format dummy --tensor-parallel-size 4   # collectives profiled too
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from nanoflow.engine_args import add_engine_args
    t = parser.add_argument_group("tune")
    t.add_argument("--workload", default="constant:512:1024",
                   help="workload whose steady-state dense batch to tune for: constant:IN:OUT, splitwise, lmsys, "
                        "sharegpt, a PATH.csv, or 'mixed' (half decode; what serving looks up by default)")
    t.add_argument("--trace-dir", default=None, help="folder of the trace CSVs (for trace workloads)")
    t.add_argument("--decode-fraction", type=float, default=None,
                   help="override: share of decode rows in a batch filled to the token budget")
    t.add_argument("--context", type=int, default=None, help="override: mean context of decode requests")
    t.add_argument("--top-k", type=int, default=3, help="plans to validate by running them (default 3)")
    t.add_argument("--quick", action="store_true",
                   help="fewer sizes (multiples of 256), 3 memory SM budgets, fewer reps: ~2x faster")
    t.add_argument("--budgets", default=None,
                   help="memory-stream SM budgets to profile, e.g. 16,24,32,44 (default 16,24,32,44,56,64; "
                        "quick 32,44,64); compute ops get the rest of the SMs")
    t.add_argument("--max-profile-seconds", type=float, default=None,
                   help="stop timing SM budgets after this long (default 200, quick 90)")
    t.add_argument("--milp-time-limit", type=float, default=None, help="seconds per MILP (default 10, quick 5)")
    t.add_argument("--reps", type=int, default=None, help="timed steps per plan and round (default 5, quick 3)")
    t.add_argument("--profile-json", default=None,
                   help="reuse this stored profile (skip profiling); written there when it does not exist")
    t.add_argument("--output", default=None, help="also write the chosen plan's JSON to this file")
    t.add_argument("--gantt", default=None,
                   help="draw the chosen plan: measured timeline to this PNG, MILP schedule to *-predicted.png")
    t.add_argument("--store", action=argparse.BooleanOptionalAction, default=None,
                   help="write the plan cache that --plan auto reads (default: on a GPU yes; on CPU no, since "
                        "CPU timings say nothing about a GPU's)")
    t.add_argument("--no-hand-plans", action="store_true",
                   help="do not time the built-in hand plans (overlap-2, nano-4) for reference")
    t.add_argument("--cache-dir", default=None, help="plan cache folder (default $NANOFLOW_CACHE_DIR or "
                                                     "~/.cache/nanoflow/plans)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_args(parser, skip=("plan",))
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    return _tune(args)


# ---- step timing ---------------------------------------------------------------------------------
def time_plans(engine, batch, plans: list, *, reps: int = 5, rounds: int = 2, warmup: int = 2,
               progress: bool = True) -> list[float]:
    """Median ms per whole step (embed, every layer under the plan, logits) of each plan on `batch`:
    plans timed round-robin (`rounds` rounds of `reps` consecutive steps), CUDA events on GPU."""
    import torch

    from nanoflow.autosearch.profile import progress_bar
    from nanoflow.pipeline.executor import make_executor
    runner = engine.runner
    cuda = engine.device.type == "cuda"
    old = runner.executor
    executors = [make_executor(p, engine.model.layers[0].ops, engine.device) for p in plans]
    samples: list[list[float]] = [[] for _ in plans]
    failed: dict[int, str] = {}
    bar = progress_bar(total=len(plans) * rounds, desc="validate plans", unit="plan", disable=not progress)
    try:
        for r in range(rounds):
            for i, ex in enumerate(executors):
                if i in failed:
                    continue
                runner.executor = ex
                try:
                    for _ in range(warmup if r == 0 else 1):
                        runner.forward(batch)
                except Exception as exc:  # noqa: BLE001 - a plan that cannot run is reported, not fatal
                    if i == 0:
                        raise
                    failed[i] = f"{type(exc).__name__}: {exc}"
                    print(f"[tune] warning: plan {plans[i].name} failed to run: {failed[i][:300]}")
                    continue
                if cuda:
                    torch.cuda.synchronize(engine.device)
                    ev = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
                    ev[0].record()
                    for k in range(reps):
                        runner.forward(batch)
                        ev[k + 1].record()
                    torch.cuda.synchronize(engine.device)
                    samples[i] += [ev[k].elapsed_time(ev[k + 1]) for k in range(reps)]
                else:
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        runner.forward(batch)
                        samples[i].append((time.perf_counter() - t0) * 1e3)
                bar.update(1)
    finally:
        runner.executor = old
        bar.close()
    return [statistics.median(s) if s else float("inf") for s in samples]


# ---- the command ---------------------------------------------------------------------------------
def _tune(args: argparse.Namespace) -> int:
    from nanoflow.autosearch.profile import dense_batch
    from nanoflow.pipeline import plan_cache as cache
    from nanoflow.pipeline.profile_table import ProfileTable
    from nanoflow.pipeline.workload_class import MIXED, workload_class_for_engine
    from nanoflow.autosearch.profiler import profile_engine
    from nanoflow.autosearch.search import pick_for_validation, search
    from nanoflow.engine.engine import LLMEngine
    from nanoflow.engine_args import engine_config_from_args
    from nanoflow.pipeline.plan import SEQUENTIAL, load_plan

    progress = not args.no_progress
    phases: dict[str, float] = {}
    t_all = time.perf_counter()
    config = engine_config_from_args(args).replace(plan="sequential")
    print(f"[tune] building the engine: {config.model} (load format {config.load_format})", flush=True)
    t = time.perf_counter()
    engine = LLMEngine(config, stream_text=False)
    phases["engine"] = time.perf_counter() - t
    wl = workload_class_for_engine(engine, args.workload, decode_fraction=args.decode_fraction,
                                   context=args.context, trace_dir=args.trace_dir)
    key = cache.engine_key(engine, wl.name)
    print(f"[tune] {key.device}, {key.dtype}, token budget {key.dense_batch}; workload {args.workload} -> {wl.describe()}",
          flush=True)

    # 1. profile
    t = time.perf_counter()
    table = None
    if args.profile_json and Path(args.profile_json).is_file():
        table = ProfileTable.load(args.profile_json)
        problems = _profile_mismatch(table, engine, key, wl)
        if problems:
            print(f"[tune] warning: {args.profile_json} was measured elsewhere ({'; '.join(problems)})")
        wl = table.workload_class  # validate on the batch the profile describes
        key = key.with_class(wl.name)
        print(f"[tune] reusing profile {args.profile_json} ({wl.describe()})")
    else:
        budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else None
        print(f"[tune] profiling the layer's ops on {key.device} ({'quick' if args.quick else 'full'}) ...",
              flush=True)
        table = profile_engine(engine, wl, quick=args.quick, memory_budgets=budgets,
                               max_seconds=args.max_profile_seconds, progress=progress)
        if args.profile_json:
            table.save(args.profile_json)
            print(f"[tune] profile ({table.seconds:.1f} s) saved to {args.profile_json}")
    if args.store if args.store is not None else engine.device.type == "cuda":
        # The cache's copy is what serving's per-step plan choice reads (cache.lookup_profile).
        profile_path = cache.profile_dir(args.cache_dir) / key.filename()
        table.save(profile_path)
        print(f"[tune] profile stored for per-step plan choice: {profile_path}")
    phases["profile"] = time.perf_counter() - t
    print(table.summary())

    # 2. search
    t = time.perf_counter()
    time_limit = args.milp_time_limit or (5.0 if args.quick else 10.0)
    cands = search(table, time_limit=time_limit, max_seconds=40.0 if args.quick else 120.0, log=print,
                   progress=progress)
    phases["search"] = time.perf_counter() - t
    seq_cand = next(c for c in cands if c.mode == "sequential")
    chosen = pick_for_validation(cands, args.top_k)
    chosen += _green_variants(engine, chosen)
    print(f"[tune] search: {len(cands)} distinct plans in {phases['search']:.1f} s; validating "
          f"{len(chosen)} + sequential" + ("" if args.no_hand_plans else " + hand plans"))

    # 3. validate for real
    t = time.perf_counter()
    hand_names = [] if args.no_hand_plans else _hand_plans(engine)
    # Sequential is timed first and again last: the two medians' gap is the noise a winner must beat.
    plans = [SEQUENTIAL] + [c.plan for c in chosen] + [load_plan(n) for n in hand_names] + [SEQUENTIAL]
    reps = args.reps or (3 if args.quick else 5)
    with dense_batch(engine, wl) as batch:
        measured = time_plans(engine, batch, plans, reps=reps, rounds=1 if args.quick else 2, progress=progress)
    phases["validate"] = time.perf_counter() - t
    seq_ms, seq_again_ms = measured[0], measured[-1]
    auto = list(zip(chosen, measured[1:1 + len(chosen)]))
    hand = list(zip(hand_names, measured[1 + len(chosen):-1]))
    winner, winner_ms, why = choose_winner(seq_cand, seq_ms, seq_again_ms, auto, engine.device.type)

    # 4. summary, cache, outputs
    _print_summary(seq_cand, seq_ms, auto, hand, winner)
    print(f"[tune] {why}")
    best_hand = min(hand, key=lambda p: p[1]) if hand else None
    if best_hand and best_hand[1] < winner_ms * 0.97:
        print(f"[tune] note: hand plan {best_hand[0]} measured {winner_ms / best_hand[1]:.3f}x faster than "
              f"the auto plan (the search model misses something; see the profile summary)")
    plan = winner.plan
    if winner is not seq_cand:
        plan = dataclasses.replace(plan, name=f"{winner.name}@{wl.name}")
    meta = {"workload": args.workload, "workload_class": wl.to_dict(), "model": config.model,
            "candidate": winner.name, "structure": winner.structure, "mode": winner.mode,
            "memory_sm_budget": winner.side_budget, "cuts_rows": list(winner.cuts),
            "predicted_ms_per_layer": winner.predicted_ms, "simulated_ms_per_layer": winner.simulated_ms,
            "measured_ms_per_step": winner_ms, "sequential_ms_per_step": seq_ms,
            "hand_plans_ms_per_step": dict(hand), "profile_device": table.device,
            "torch": table.torch_version, "triton": table.triton_version}
    store = args.store if args.store is not None else engine.device.type == "cuda"
    if not store:
        reason = "--no-store" if args.store is False else "on CPU; pass --store to write it"
        print(f"[tune] plan cache not written ({reason})")
    else:
        path = cache.store_plan(plan, key, meta, args.cache_dir)
        print(f"[tune] cached {plan.name} for class {wl.name!r}: {path}")
        if wl.name != MIXED:
            mixed = cache.choose_entry(cache.entries_for(key, args.cache_dir), MIXED)
            if mixed is None or mixed["key"]["workload_class"] != MIXED or mixed.get("meta", {}).get("copied_from"):
                path = cache.store_plan(plan, key.with_class(MIXED), {**meta, "copied_from": wl.name}, args.cache_dir)
                print(f"[tune] also cached as the default ('mixed') plan for serving: {path}")
    if args.output:
        plan.save(args.output)
        print(f"[tune] wrote {args.output}")
    if args.gantt:
        _draw(engine, wl, winner, table, args.gantt)
    phases["total"] = time.perf_counter() - t_all
    print("[tune] time: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    return 0


MIN_STORED_SPEEDUP = 1.02
"""A plan replaces sequential only when it is at least this much faster (and beyond the timing noise)."""


def required_speedup(seq_ms: float, seq_again_ms: float) -> float:
    """Speed-up over sequential a plan needs to be chosen: MIN_STORED_SPEEDUP, or twice the relative gap
    of sequential's two timings when that is larger (a plan picked from noise must never be cached)."""
    noise = abs(seq_ms - seq_again_ms) / min(seq_ms, seq_again_ms)
    return max(MIN_STORED_SPEEDUP, 1.0 + 2.0 * noise)


def choose_winner(seq_cand, seq_ms: float, seq_again_ms: float, auto: list, device_type: str):
    """(winner, its ms, why) from the validated candidates [(candidate, ms)]. Sequential unless a plan
    beats both of sequential's timings by required_speedup; always sequential off CUDA, where streams do
    not run concurrently and a measured gain can only be noise (a busy 2-core host once showed 9x)."""
    best, best_ms = min(auto, key=lambda p: p[1]) if auto else (seq_cand, seq_ms)
    gain = f"best {best.name} {seq_ms / best_ms:.3f}x, sequential {seq_ms:.3f} / {seq_again_ms:.3f} ms"
    if device_type != "cuda":
        return seq_cand, seq_ms, (f"no plan can beat sequential on {device_type} (streams do not overlap), so "
                                  f"any measured gain is noise ({gain}): sequential")
    margin = required_speedup(seq_ms, seq_again_ms)
    if best_ms * margin > min(seq_ms, seq_again_ms):
        return seq_cand, seq_ms, f"no candidate beat sequential by the {margin:.3f}x its timings need ({gain}): sequential"
    return best, best_ms, f"{best.name} is {seq_ms / best_ms:.3f}x sequential (needed {margin:.3f}x)"


def _green_variants(engine, chosen: list) -> list:
    """Stage 2 with the other SM-limiting method: each candidate that gives its memory stream an SM
    budget, again with that stream on a green-context split of as many SMs (the compute stream on
    the rest) and full-occupancy kernels in place of the budgeted persistent ones. CUDA only."""
    from nanoflow.pipeline import sm_partition
    if not sm_partition.available(engine.device):
        return []
    out, seen = [], set()
    for c in chosen:
        if c.side_budget is None or len(c.plan.streams) < 2 or c.plan.uses_sm_split():
            continue
        sms = -(-c.side_budget // 8) * 8  # the driver's granularity on Hopper
        if (c.name, sms) in seen:
            continue
        seen.add((c.name, sms))
        plan = c.plan.with_sm_split(sms)
        out.append(dataclasses.replace(c, name=plan.name, plan=plan, mode="green", side_budget=sms))
    return out


def _hand_plans(engine) -> list[str]:
    from nanoflow.pipeline.ops import COLLECTIVE_OPS
    from nanoflow.pipeline.plan import load_plan
    from nanoflow.pipeline.plan_fold import fold_plan
    names = []
    folder = Path(__file__).resolve().parent.parent / "pipeline" / "plans"
    layer = {op.name for op in engine.model.layers[0].ops}
    for p in sorted(folder.glob("*.json")):
        try:
            plan = load_plan(p.stem)
            if set(COLLECTIVE_OPS) & set(plan.ops) - layer:  # a tensor-parallel plan on one rank
                continue
            plan = fold_plan(plan, engine.model.layers[0].ops)  # MoE layers: one op for the MLP
            plan.validate([op.name for op in engine.model.layers[0].ops])
            names.append(p.stem)
        except ValueError:
            continue
    return names


def _profile_mismatch(table, engine, key, wl) -> list[str]:
    from nanoflow.pipeline.plan_cache import model_shape_hash
    out = []
    if table.device != key.device:
        out.append(f"device {table.device} != {key.device}")
    if model_shape_hash(table.model) != key.model_hash:
        out.append("another model shape")
    if table.dense_batch != key.dense_batch:
        out.append(f"token budget {table.dense_batch} != {key.dense_batch}")
    if table.workload.get("name") != wl.name:
        out.append(f"workload class {table.workload.get('name')} != {wl.name}")
    return out


def _print_summary(seq, seq_ms, auto, hand, winner) -> None:
    header = (f"{'candidate':<30}{'structure':>10}{'mode':>8}{'mem SMs':>8}{'MILP ms/layer':>15}"
              f"{'sim ms/layer':>14}{'pred vs seq':>12}{'ms/step':>10}{'vs seq':>9}")
    print("\n" + header)
    print("-" * len(header))

    def row(name, structure, mode, budget, pred, sim, ms, mark=""):
        pred_s = f"{pred:.4f}" if pred is not None else "-"
        sim_s = f"{sim:.4f}" if sim is not None else "-"
        ratio = f"{seq.simulated_ms / sim:.3f}x" if sim else "-"
        print(f"{(mark + name)[:30]:<30}{structure:>10}{mode:>8}{budget:>8}{pred_s:>15}{sim_s:>14}{ratio:>12}"
              f"{ms:>10.3f}{seq_ms / ms:>8.3f}x")

    row("sequential", "1", "-", "-", seq.predicted_ms, seq.simulated_ms, seq_ms, "* " if winner is seq else "  ")
    for c, ms in auto:
        row(c.name, c.structure, c.mode, str(c.side_budget or "all"), c.predicted_ms, c.simulated_ms, ms,
            "* " if c is winner else "  ")
    for name, ms in hand:
        row(f"hand: {name}", "-", "-", "-", None, None, ms, "  ")
    print("(* = stored; MILP/sim: modelled ms per layer from the profile; ms/step: measured whole step; "
          "vs seq: speed-up over sequential)\n")


def _draw(engine, wl, winner, table, out: str) -> None:
    from nanoflow.entrypoints.plan_show import draw_timeline, record_timeline
    entries = record_timeline(engine, wl, warmup=1, plan=winner.plan)
    path, stats = draw_timeline(entries, out, title=f"{winner.name} (measured), {wl.describe()}")
    print(f"[tune] measured timeline: {path} (layer {stats['layer']}, {stats['span_ms']:.3f} ms, "
          f"overlapped {stats['overlap_ms']:.3f} ms)")
    if winner.schedule:
        p = Path(out)
        pred = p.with_name(p.stem + "-predicted" + p.suffix)
        path, _ = draw_timeline(winner.schedule, pred, slot_view=True,
                                title=f"{winner.name} (MILP schedule, {winner.predicted_ms:.3f} ms/layer)")
        print(f"[tune] predicted schedule: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="nanoflow tune", description=__doc__))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
