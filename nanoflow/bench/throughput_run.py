"""One timed engine run of `nanoflow bench throughput`: warm-up (excluded), the GEMM peak right before,
the timed `llm.generate` (or closed-loop conversations), then the run's step, KV and GPU figures."""
from __future__ import annotations

import dataclasses
import time

import torch

from nanoflow.bench.busy_share import measure_busy_share
from nanoflow.bench.conversations import ConversationRun, kv_counters, kv_reuse, run_conversations
from nanoflow.bench.gemm_peak import GemmPeak, measure_gemm_peak
from nanoflow.bench.hf_baseline import synchronize
from nanoflow.bench.host_load import HostLoadMeter
from nanoflow.bench.step_stats import class_figures, step_statistics
from nanoflow.bench.throughput_options import (BUSY_SHARE_EVERY, BUSY_SHARE_MAX_OUTPUT_TOKENS,
                                               WARMUP_MAX_OUTPUT_TOKENS, ThroughputOptions, TimedRun)
from nanoflow.bench.workloads import BenchRequest, Conversation


def _generate_inputs(requests: list[BenchRequest], temperature: float) -> tuple[list[dict], list]:
    from nanoflow import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=temperature)
              for r in requests]
    return prompts, params


def timed_run(llm, plan: str, requests: list[BenchRequest], warmup: list[BenchRequest],
               opts: ThroughputOptions, device: torch.device, model_dtype: torch.dtype) -> TimedRun:
    conversations = bool(requests) and isinstance(requests[0], Conversation)
    if warmup:
        what = "conversations" if conversations else "requests"
        print(f"[bench] warm-up: {len(warmup)} untimed {what} of at most {WARMUP_MAX_OUTPUT_TOKENS} "
              f"output tokens ...", flush=True)
        with HostLoadMeter() as warm_load:
            if conversations:
                run_conversations(llm.engine, warmup, opts.temperature)
            else:
                llm.generate(*_generate_inputs(warmup, opts.temperature), use_tqdm=opts.use_tqdm)
        print(f"[bench] warm-up: {len(warmup)} {what} in {warm_load.wall_s:.1f} s (excluded)", flush=True)
        _warn_if_contended(warm_load, "warm-up", device)
    if hasattr(llm, "reset_prefix_cache"):  # every timed run starts cold: nothing cached by an earlier run
        llm.reset_prefix_cache()
    if not conversations:
        prompts, params = _generate_inputs(requests, opts.temperature)
    kv_before = kv_counters(llm.engine.stats() if hasattr(llm.engine, "stats") else None)
    gemm = _gemm_peak(device, model_dtype)
    step_log = getattr(llm.engine, "step_times", None)
    if device.type == "cuda":
        llm.engine.start_gpu_timeline()
    first_step = len(step_log) if step_log is not None else 0
    runner = getattr(llm.engine, "runner", None)
    plan_steps_before = getattr(runner, "plan_steps", None)
    print(f"[bench] timed run: {len(requests)} requests, plan {plan!r} ...", flush=True)
    synchronize(device)
    with HostLoadMeter() as load:
        t0 = time.perf_counter()
        if conversations:
            counts = run_conversations(llm.engine, requests, opts.temperature, use_tqdm=opts.use_tqdm)
        else:
            outputs = llm.generate(prompts, params, use_tqdm=opts.use_tqdm)
        synchronize(device)
        wall = time.perf_counter() - t0
    _warn_if_contended(load, "timed run", device)
    if not conversations:
        counts = _batch_counts(requests, outputs)
    # step_times is append-only: this run's steps are the ones after the snapshot.
    steps = step_statistics(step_log[first_step:]) if step_log is not None else None
    stats = llm.engine.stats() if hasattr(llm.engine, "stats") else None
    gpu_idle = llm.engine.gpu_idle_stats() if device.type == "cuda" else None
    classes, timing = _step_classes(llm, device, step_log[first_step:] if step_log is not None else [])
    busy = None
    if opts.compare is not None and device.type == "cuda" and opts.busy_share_requests and not conversations:
        busy = _busy_share(llm, requests[:opts.busy_share_requests], opts.temperature)
    graphs = getattr(runner, "graphs", None)
    return TimedRun(
        plan=plan, requests=counts.requests, input_tokens=counts.input_tokens, output_tokens=counts.output_tokens,
        expected_output_tokens=counts.expected_output_tokens,
        wall_s=wall, steps=steps, gemm=gemm, gpu_idle=gpu_idle,
        plan_steps=None if plan_steps_before is None else runner.plan_steps - plan_steps_before,
        plan_choice=runner.plan_choice_summary() if hasattr(runner, "plan_choice_summary") else None,
        host_load=load.result.to_dict() if device.type == "cpu" and load.result is not None else None,
        engine_stats=dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else None,
        kv=kv_reuse(kv_before, kv_counters(stats), counts.input_tokens),
        step_classes=classes, step_timing=timing, busy=busy,
        graphs=graphs.describe() if graphs is not None else None)


def _step_classes(llm, device: torch.device, host_steps: list) -> tuple[dict | None, str | None]:
    """Per-class figures of the timed run's steps: the runner's step records with each step's device
    time (CUDA events) on a GPU, its host time on CPU; None when the engine keeps no records."""
    records = getattr(getattr(llm.engine, "runner", None), "step_log", None)
    if records is None:
        return None, None
    if device.type == "cuda":
        step_ms, timing = llm.engine.gpu_step_ms(), "device time"
    else:
        step_ms, timing = [(end - start) * 1e3 for start, end, *_ in host_steps], "host time"
    if not step_ms or len(records) < len(step_ms):
        return None, None
    return class_figures(list(records)[-len(step_ms):], step_ms), timing


def _busy_share(llm, requests: list[BenchRequest], temperature: float) -> dict:
    prompts, params = _generate_inputs(
        [dataclasses.replace(r, output_len=min(r.output_len, BUSY_SHARE_MAX_OUTPUT_TOKENS)) for r in requests],
        temperature)
    print(f"[bench] busy share: {len(prompts)} untimed requests (at most {BUSY_SHARE_MAX_OUTPUT_TOKENS} output "
          f"tokens), every {BUSY_SHARE_EVERY}th step under torch.profiler ...", flush=True)
    t0 = time.perf_counter()
    busy = measure_busy_share(llm, prompts, params, every=BUSY_SHARE_EVERY)
    print(f"[bench] busy share: {busy['profiled_steps']} steps profiled in {time.perf_counter() - t0:.1f} s", flush=True)
    return busy


def _batch_counts(requests: list[BenchRequest], outputs) -> ConversationRun:
    return ConversationRun(requests=len(requests), input_tokens=sum(len(r.prompt_token_ids) for r in requests),
                           output_tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
                           expected_output_tokens=sum(r.output_len for r in requests))


def _warn_if_contended(meter: HostLoadMeter, what: str, device: torch.device) -> None:
    warning = meter.result.warning(what) if device.type == "cpu" and meter.result is not None else None
    if warning:
        print(f"[bench] warning: {warning}", flush=True)


def _gemm_peak(device: torch.device, model_dtype: torch.dtype) -> GemmPeak:
    """BENCHMARKING.md's C: bf16 on GPU; on CPU in the model's dtype, bounded to a few seconds."""
    dtype = model_dtype if device.type == "cpu" else torch.bfloat16
    where = "n up to 1024, a few seconds" if device.type == "cpu" else "n=8192"
    print(f"[bench] measuring the GEMM peak ({str(dtype).removeprefix('torch.')} matmuls on {device}, {where}) ...",
          flush=True)
    t0 = time.perf_counter()
    gemm = measure_gemm_peak(device, dtype=dtype)
    print(f"[bench] GEMM peak {gemm.tflops:.4g} TFLOP/s (n={gemm.n}) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return gemm
