"""Offline throughput benchmark (`nanoflow bench throughput`), following ../shared/BENCHMARKING.md.

One process: build the engine, warm up (excluded), measure the GEMM peak right before the timed run,
time `llm.generate` over all requests, then optionally the same requests under another plan
(`--compare`), with prefix caching or the host tier off (`--compare-prefix-caching`,
`--compare-host-tier`), and through transformers' static batched `generate` with the same weights
(`--baseline hf`). Every timed run starts with an empty prefix cache; multi-round workloads run their
conversations closed-loop (bench/conversations.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from nanoflow.bench.gemm_peak import GemmPeak, device_name, measure_gemm_peak
from nanoflow.bench.hf_baseline import empty_cache, run_hf_baseline, synchronize
from nanoflow.bench.host_load import HostLoadMeter
from nanoflow.bench.busy_share import format_busy, measure_busy_share
from nanoflow.bench.step_stats import StepStats, class_figures, class_ratios, format_classes, step_statistics
from nanoflow.bench.conversations import (ConversationRun, format_kv_reuse, kv_counters, kv_reuse,
                                          run_conversations)
from nanoflow.bench.workloads import (BenchRequest, Conversation, ConversationTurn, Workload, parse_workload,
                                      sample_conversations, sample_requests)
from nanoflow.config import EngineConfig

WARMUP_MAX_OUTPUT_TOKENS = 64
"""Warm-up requests generate at most this many tokens (enough to exercise prefill and decode)."""
WARMUP_SEED_OFFSET = 1_000_003
"""Warm-up prompts use seed + this, so they differ from the timed ones."""
BUSY_SHARE_MAX_OUTPUT_TOKENS = 128
"""Requests of the busy-share sample generate at most this many tokens."""
BUSY_SHARE_EVERY = 8
"""The busy-share sample profiles every this-many-th step."""

# EngineConfig fields with a dedicated benchmark flag (engine_args may not set them).
_DEDICATED_ENGINE_FIELDS = ("model", "load_format", "dtype", "device", "seed", "max_model_len",
                            "max_num_batched_tokens", "max_num_seqs", "plan")


@dataclass
class ThroughputOptions:
    """Everything `run_throughput` takes (the CLI flags, one to one)."""

    model: str = "default"
    """Model directory, dummy preset name (llama-3-8b, ...) or 'default'."""
    load_format: str = "auto"
    """EngineConfig.load_format."""
    dtype: str = "auto"
    """EngineConfig.dtype."""
    device: str = "auto"
    """EngineConfig.device."""
    workload: str = "constant:512:512"
    """constant:IN:OUT, splitwise, lmsys, sharegpt, a PATH.csv, shared-prefix:SYS:UNIQUE:OUT[:GROUPS] or
    multi-round:TRACE[:ROUNDS] (then num_requests counts conversations)."""
    num_requests: int = 1000
    """Timed requests."""
    seed: int = 0
    """Seed of the request sample, the prompt ids and the engine."""
    max_num_batched_tokens: int | None = None
    """EngineConfig.max_num_batched_tokens (None: the engine's default)."""
    max_num_seqs: int | None = None
    """EngineConfig.max_num_seqs (None: the engine's default)."""
    max_model_len: int | None = None
    """EngineConfig.max_model_len (None: the model's max_position_embeddings)."""
    plan: str = "sequential"
    """EngineConfig.plan of the main run."""
    compare: str | None = None
    """Another plan to run the same requests with, in this process; the ratio plan / compare is reported."""
    compare_prefix_caching: bool = False
    """Also run the same requests with prefix caching off (same engine); the ratio on / off is reported."""
    compare_host_tier: bool = False
    """Also run the same requests with the host KV tier off (same engine; needs kv_host_gb > 0)."""
    baseline: str | None = None
    """'hf': also run transformers' static batched generate with the same weights."""
    hf_batch_size: int = 64
    """Requests per transformers generate call (left-padded)."""
    hf_num_requests: int = 256
    """The transformers baseline runs the first this-many requests; rates (tokens/s) are compared."""
    warmup_requests: int = 32
    """Requests of an untimed warm-up generate before each timed engine run (0: none)."""
    busy_share_requests: int = 256
    """With --compare on a GPU: after each timed run, an untimed sample of the first this-many requests
    (at most 128 output tokens, run synchronously) with every 8th step under torch.profiler, for the
    GPU's busy share inside a step (0: none)."""
    temperature: float = 1.0
    """Sampling temperature of every request (0: greedy); the HF baseline samples the same way."""
    output_json: str | None = None
    """Write the result JSON here."""
    trace_dir: str | None = None
    """Folder of the trace CSVs (default: $NANOFLOW_TRACE_DIR, else the copies shipped in the package)."""
    engine_args: dict = field(default_factory=dict)
    """Other EngineConfig fields, e.g. {'enforce_eager': True} (the CLI's engine flags)."""
    use_tqdm: bool = True
    """Show a progress bar during the timed run."""
    command: str | None = None
    """The command line to record (run_from_args fills it in)."""

    def __post_init__(self) -> None:
        for name in ("num_requests", "hf_batch_size", "hf_num_requests"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.busy_share_requests, int) or self.busy_share_requests < 0:
            raise ValueError(f"busy_share_requests must be a non-negative integer, got {self.busy_share_requests!r}")
        if not isinstance(self.warmup_requests, int) or self.warmup_requests < 0:
            raise ValueError(f"warmup_requests must be a non-negative integer, got {self.warmup_requests!r}")
        if self.baseline not in (None, "hf"):
            raise ValueError(f"baseline must be 'hf' or None, got {self.baseline!r}")
        if self.baseline == "hf" and self.engine_args.get("tensor_parallel_size", 1) != 1:
            raise ValueError("the transformers baseline runs on one GPU: drop --baseline hf with "
                             "--tensor-parallel-size")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a non-negative number, got {self.temperature!r}")
        if sum([self.compare is not None, bool(self.compare_prefix_caching), bool(self.compare_host_tier)]) > 1:
            raise ValueError("compare, compare_prefix_caching and compare_host_tier: choose one comparison")
        if self.compare_prefix_caching and self.engine_args.get("enable_prefix_caching") is False:
            raise ValueError("compare_prefix_caching compares against caching on: drop --no-enable-prefix-caching")
        if self.compare_host_tier and not self.engine_args.get("kv_host_gb"):
            raise ValueError("compare_host_tier needs a host tier: pass --kv-host-gb")
        clash = sorted(set(self.engine_args) & set(_DEDICATED_ENGINE_FIELDS))
        if clash:
            raise ValueError(f"engine_args: set {', '.join(clash)} with its own option")
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(self.engine_args) - known)
        if unknown:
            raise ValueError(f"engine_args: unknown EngineConfig field(s) {', '.join(unknown)}")


@dataclass
class TimedRun:
    """One timed `llm.generate` over the benchmark requests."""

    plan: str
    """The engine's plan."""
    requests: int
    """Requests run."""
    input_tokens: int
    """Prompt tokens of all requests."""
    output_tokens: int
    """Tokens generated (counted from the outputs)."""
    expected_output_tokens: int
    """Sum of the requested output lengths (equal to output_tokens when lengths are exact)."""
    wall_s: float
    """Wall time of the timed region (generate only)."""
    steps: StepStats | None
    """Per-step figures from llm.engine.step_times, or None when the engine does not record them."""
    gemm: GemmPeak
    """The GEMM peak measured right before this run."""
    engine_stats: dict | None
    """llm.engine.stats() after the run."""
    gpu_idle: dict | None = None
    """Device busy vs. idle time between steps (CUDA events around each step), on CUDA."""
    plan_steps: int | None = None
    """Steps of this run under the (non-sequential) plan; the others ran sequentially because the
    plan's min_attn_share did not apply. None when the engine does not count them."""
    host_load: dict | None = None
    """On CPU: CPU seconds of this process and of all others during the timed region (HostLoad)."""
    kv: dict | None = None
    """Prefill tokens computed vs prompt tokens, prefix-cache and host-tier counters of this run."""
    variant: str | None = None
    """What a KV comparison changed in this run ('prefix caching on', 'host tier off', ...)."""
    step_classes: dict | None = None
    """Per step class (decode-only / mixed / prefill-heavy): steps, tokens, step ms, tokens/s
    (bench.step_stats.class_figures); device time on a GPU, host time on CPU."""
    step_timing: str | None = None
    """'device time' (CUDA events around each step) or 'host time'."""
    busy: dict | None = None
    """GPU busy share inside a step per class, from the profiled sample (bench.busy_share)."""
    graphs: list | None = None
    """CUDA-graph mode and graph count per plan of the engine (None without graphs)."""

    def metrics(self, num_params: int, num_gpus: int = 1) -> dict:
        """The figures BENCHMARKING.md asks for, as a flat dict. Tensor parallel over num_gpus GPUs:
        optimal = num_gpus x the one-GPU GEMM peak / (2 x params)."""
        total = (self.input_tokens + self.output_tokens) / self.wall_s
        optimal = num_gpus * self.gemm.tflops * 1e12 / (2 * num_params)
        steady = self.steps.steady_tokens_per_s if self.steps is not None else None
        return {
            "plan": self.plan,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "expected_output_tokens": self.expected_output_tokens,
            "exact_output_lengths": self.output_tokens == self.expected_output_tokens,
            "wall_s": self.wall_s,
            "total_tokens_per_s": total,
            "output_tokens_per_s": self.output_tokens / self.wall_s,
            "requests_per_s": self.requests / self.wall_s,
            "steady_state_total_tokens_per_s": steady,
            "gemm_peak_tflops": self.gemm.tflops,
            "num_gpus": num_gpus,
            "gemm": self.gemm.to_dict(),
            "optimal_tokens_per_s": optimal,
            "pct_of_optimal": 100.0 * total / optimal,
            "steady_state_pct_of_optimal": None if steady is None else 100.0 * steady / optimal,
            "steps": None if self.steps is None else self.steps.to_dict(),
            "engine_stats": self.engine_stats,
            "gpu_idle": self.gpu_idle,
            "plan_steps": self.plan_steps,
            "host_load": self.host_load,
            "variant": self.variant,
            "kv": self.kv,
            "step_classes": self.step_classes,
            "step_timing": self.step_timing,
            "busy": self.busy,
            "graphs": self.graphs,
        }


def run_throughput(**kwargs) -> dict:
    """Runs the benchmark (keyword arguments: ThroughputOptions fields) and returns the result dict."""
    opts = ThroughputOptions(**kwargs)
    workload = parse_workload(opts.workload, opts.trace_dir)
    if workload.kind == "multi-round" and opts.baseline is not None:
        raise ValueError("the transformers baseline runs single requests: not with a multi-round workload")
    started = datetime.now(timezone.utc).astimezone()

    llm = _build_llm(opts, opts.plan)
    dtype, device = _model_dtype_device(llm)
    model_config = llm.model_config
    num_params = model_config.num_active_parameters()  # MoE: per token (Mixtral 8x7B 12.9e9), not all experts
    max_len = _max_model_len(llm, opts)
    if workload.kind == "multi-round":
        requests = sample_conversations(workload, opts.num_requests, opts.seed, model_config.vocab_size, max_len)
        turns = [len(c.turns) for c in requests]
        print(f"[bench] {opts.model}: {num_params / 1e9:.3f}B params, {workload.describe()}, "
              f"{len(requests)} conversations, {sum(turns)} turns, "
              f"{sum(sum(c.prompt_lens()) for c in requests)} prompt tokens (history included), "
              f"{sum(t.output_len for c in requests for t in c.turns)} output tokens", flush=True)
    else:
        requests = sample_requests(workload, opts.num_requests, opts.seed, model_config.vocab_size, max_len)
        print(f"[bench] {opts.model}: {num_params / 1e9:.3f}B params, {workload.describe()}, "
              f"{len(requests)} requests, {sum(len(r.prompt_token_ids) for r in requests)} prompt tokens, "
              f"{sum(r.output_len for r in requests)} output tokens", flush=True)
    warmup = _warmup_requests(workload, opts, model_config.vocab_size, max_len)

    kv_variant = _kv_variant(opts)
    num_gpus = int(opts.engine_args.get("tensor_parallel_size", 1))
    main = _timed_run(llm, opts.plan, requests, warmup, opts, device, dtype)
    main.variant = kv_variant and f"{kv_variant} on"
    runs = {"main": main.metrics(num_params, num_gpus)}
    _print_run("nanoflow", runs["main"])
    if kv_variant is not None:
        if opts.compare_prefix_caching:
            llm.engine.kv.set_prefix_caching(False)
        else:
            llm.engine.kv.set_host_tier_enabled(False)
        compared = _timed_run(llm, opts.plan, requests, warmup, opts, device, dtype)
        compared.variant = f"{kv_variant} off"
        runs["compare"] = compared.metrics(num_params, num_gpus)
        runs["compare"]["ratio"] = runs["main"]["total_tokens_per_s"] / runs["compare"]["total_tokens_per_s"]
        runs["compare"]["ratio_means"] = f"total tokens/s with {kv_variant} on / off"
        on, off = runs["main"]["kv"], runs["compare"]["kv"]
        if on and off and on["prefill_tokens_computed"]:
            runs["compare"]["prefill_ratio"] = off["prefill_tokens_computed"] / on["prefill_tokens_computed"]
        _print_run(f"nanoflow ({kv_variant} off)", runs["compare"])
    if opts.compare is not None:
        if hasattr(llm, "set_plan"):
            llm.set_plan(opts.compare)
        else:
            llm = None  # free the first engine before building the second
            empty_cache(device)
            llm = _build_llm(opts, opts.compare)
        compared = _timed_run(llm, opts.compare, requests, warmup, opts, device, dtype)
        runs["compare"] = compared.metrics(num_params, num_gpus)
        runs["compare"]["ratio"] = runs["main"]["total_tokens_per_s"] / runs["compare"]["total_tokens_per_s"]
        runs["compare"]["ratio_means"] = f"total tokens/s of plan {opts.plan!r} / plan {opts.compare!r}"
        if runs["main"]["step_classes"] and runs["compare"]["step_classes"]:
            runs["compare"]["class_ratios"] = class_ratios(runs["main"]["step_classes"],
                                                           runs["compare"]["step_classes"])
        _print_run(f"nanoflow ({opts.compare})", runs["compare"])
    baseline = None
    if opts.baseline == "hf":
        weights = {name: t.detach().to("cpu") for name, t in llm.engine.model.export_hf_state_dict().items()}
        llm = None  # the engine's KV cache must go before transformers' model and cache come
        empty_cache(device)
        hf_requests = requests[:opts.hf_num_requests]
        baseline = run_hf_baseline(weights, model_config, device, dtype, hf_requests,
                                   opts.hf_batch_size, opts.temperature)
        del weights
        empty_cache(device)
        baseline["ratio"] = runs["main"]["total_tokens_per_s"] / baseline["total_tokens_per_s"]
        baseline["ratio_means"] = (f"nanoflow total tokens/s ({len(requests)} requests) / transformers "
                                   f"total tokens/s (first {len(hf_requests)} requests): a ratio of rates")
        _print_run("transformers", baseline)
    llm = None
    empty_cache(device)

    result = {
        "date": started.isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "transformers_version": _version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "command": opts.command or _api_command(kwargs),
        "model": opts.model,
        "load_format": opts.load_format,
        "dtype": str(dtype).removeprefix("torch."),
        "num_params": num_params,
        "workload": opts.workload,
        "workload_file": None if workload.path is None else str(workload.path),
        "seed": opts.seed,
        "temperature": opts.temperature,
        "engine_options": {"max_num_batched_tokens": opts.max_num_batched_tokens,
                           "max_num_seqs": opts.max_num_seqs, "max_model_len": max_len, **opts.engine_args},
        "warmup": {"requests": opts.warmup_requests, "max_output_tokens": WARMUP_MAX_OUTPUT_TOKENS,
                   "note": "untimed generate before each timed engine run, excluded from every figure"},
        **runs["main"],
        "compare": runs.get("compare"),
        "baseline": baseline,
    }
    print(format_table(result), flush=True)
    if opts.output_json:
        path = Path(opts.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] wrote {path}", flush=True)
    return result


def _build_llm(opts: ThroughputOptions, plan: str):
    from nanoflow import LLM  # imported here so `nanoflow --help` does not pay for the engine

    kwargs = dict(load_format=opts.load_format, dtype=opts.dtype, device=opts.device, seed=opts.seed,
                  plan=plan, **opts.engine_args)
    for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
        if getattr(opts, name) is not None:
            kwargs[name] = getattr(opts, name)
    print(f"[bench] building the engine: {opts.model} (load format {opts.load_format}, plan {plan!r}) ...",
          flush=True)
    t0 = time.perf_counter()
    llm = LLM(model=opts.model, **kwargs)
    print(f"[bench] engine ready in {time.perf_counter() - t0:.1f} s (plan {plan!r})", flush=True)
    return llm


def _max_model_len(llm, opts: ThroughputOptions) -> int:
    """The engine's context limit (EngineConfig: max_model_len, else the model's max_position_embeddings)."""
    engine_len = getattr(llm.engine, "max_model_len", None)
    if engine_len is not None:
        return int(engine_len)
    return opts.max_model_len or llm.model_config.max_position_embeddings


def _warmup_requests(workload: Workload, opts: ThroughputOptions, vocab_size: int,
                     max_len: int) -> list[BenchRequest]:
    if opts.warmup_requests == 0:
        return []
    if workload.kind == "multi-round":
        convs = sample_conversations(workload, opts.warmup_requests, opts.seed + WARMUP_SEED_OFFSET, vocab_size,
                                     max_len)
        cap = WARMUP_MAX_OUTPUT_TOKENS
        return [Conversation([ConversationTurn(t.user_token_ids, min(t.output_len, cap), t.answer_token_ids[:cap])
                              for t in c.turns]) for c in convs]
    sample = sample_requests(workload, opts.warmup_requests, opts.seed + WARMUP_SEED_OFFSET, vocab_size, max_len)
    return [dataclasses.replace(r, output_len=min(r.output_len, WARMUP_MAX_OUTPUT_TOKENS)) for r in sample]


def _generate_inputs(requests: list[BenchRequest], temperature: float) -> tuple[list[dict], list]:
    from nanoflow import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=temperature)
              for r in requests]
    return prompts, params


def _timed_run(llm, plan: str, requests: list[BenchRequest], warmup: list[BenchRequest],
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


def _kv_variant(opts: ThroughputOptions) -> str | None:
    if opts.compare_prefix_caching:
        return "prefix caching"
    return "host tier" if opts.compare_host_tier else None


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


def _model_dtype_device(llm) -> tuple[torch.dtype, torch.device]:
    """The engine's weight dtype and device (what the HF baseline must use too)."""
    weight = llm.engine.model.embed_tokens
    return weight.dtype, weight.device


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken on this machine
        return None


def _api_command(kwargs: dict) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"nanoflow.bench.throughput.run_throughput({args})"


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _print_run(label: str, run: dict) -> None:
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
            out.append(f"plan {run['plan']!r} ran on {run['plan_steps']} of {run['steps']['num_steps']} steps "
                       "(the others sequentially: min_attn_share)")
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


# ---- CLI ------------------------------------------------------------------------------------------
def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `nanoflow bench throughput` options to `parser`."""
    d = ThroughputOptions()
    from nanoflow.engine_args import add_engine_args, plan_help  # shared with `generate`

    parser.add_argument("--model", default=d.model,
                        help="model directory, dummy preset (llama-3-8b, ...) or 'default' (built-in tiny model)")
    parser.add_argument("--load-format", default=d.load_format, choices=["auto", "safetensors", "dummy"],
                        help="'auto' (safetensors from a directory, random weights for presets), 'safetensors' "
                             "or 'dummy' (random weights of the directory's shape)")
    parser.add_argument("--dtype", default=d.dtype, help="auto, bfloat16, float16 or float32")
    parser.add_argument("--device", default=d.device, help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--workload", default=d.workload,
                        help="constant:IN:OUT, splitwise, lmsys, sharegpt, a PATH.csv, shared-prefix:SYS:UNIQUE:OUT"
                             "[:GROUPS] or multi-round:TRACE[:ROUNDS] (default %(default)s)")
    parser.add_argument("--num-requests", type=int, default=d.num_requests,
                        help="timed requests; conversations for multi-round (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the requests and the engine")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of a dense batch (default: the engine's, 2048 on GPU, 512 on CPU)")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="most requests running at once (default: the engine's, 1024)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the model's max_position_embeddings)")
    parser.add_argument("--plan", default=d.plan, help=plan_help())
    parser.add_argument("--compare", metavar="PLAN", default=None,
                        help="also run the same requests with this plan (same process) and report the ratio")
    parser.add_argument("--compare-prefix-caching", action="store_true",
                        help="also run the same requests with prefix caching off (same engine) and report "
                             "the ratios of throughput and of prefill tokens computed")
    parser.add_argument("--compare-host-tier", action="store_true",
                        help="also run the same requests with the host KV tier off (needs --kv-host-gb)")
    parser.add_argument("--baseline", choices=["hf"], default=None,
                        help="also run transformers' static batched generate with the same weights")
    parser.add_argument("--hf-batch-size", type=int, default=d.hf_batch_size, help="requests per transformers generate call, left-padded (default %(default)s)")
    parser.add_argument("--hf-num-requests", type=int, default=d.hf_num_requests,
                        help="the HF baseline runs the first N requests; rates are compared (default %(default)s)")
    parser.add_argument("--warmup-requests", type=int, default=d.warmup_requests,
                        help="untimed warm-up requests before each timed run (default %(default)s)")
    parser.add_argument("--busy-share-requests", type=int, default=d.busy_share_requests,
                        help="with --compare on a GPU: untimed sample of this many requests after each timed "
                             "run, every 8th step profiled, for the GPU's busy share inside a step (0: none; "
                             "default %(default)s)")
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help="sampling temperature of every request, 0 = greedy (default %(default)s)")
    parser.add_argument("--output-json", default=None, metavar="PATH", help="write the result JSON here")
    parser.add_argument("--trace-dir", default=None,
                        help="folder of the trace CSVs (default: $NANOFLOW_TRACE_DIR, else the copies shipped "
                             "in the package)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    add_engine_args(parser, skip=_DEDICATED_ENGINE_FIELDS)
    return parser


def engine_args_from(args: argparse.Namespace) -> dict:
    """The EngineConfig fields without a dedicated benchmark flag that differ from their defaults."""
    out = {}
    for f in dataclasses.fields(EngineConfig):
        if f.name in _DEDICATED_ENGINE_FIELDS or not hasattr(args, f.name):
            continue
        if getattr(args, f.name) != f.default:
            out[f.name] = getattr(args, f.name)
    return out



def run_from_args(args: argparse.Namespace) -> int:
    """Runs the benchmark from parsed CLI args; 0 on success, 1 if output lengths were not exact, 2 on bad input."""
    try:
        result = run_throughput(
            model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
            workload=args.workload, num_requests=args.num_requests, seed=args.seed,
            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len, plan=args.plan, compare=args.compare, baseline=args.baseline,
            compare_prefix_caching=args.compare_prefix_caching, compare_host_tier=args.compare_host_tier,
            hf_batch_size=args.hf_batch_size, hf_num_requests=args.hf_num_requests,
            warmup_requests=args.warmup_requests, busy_share_requests=args.busy_share_requests,
            temperature=args.temperature, output_json=args.output_json,
            trace_dir=args.trace_dir, engine_args=engine_args_from(args),
            use_tqdm=not args.disable_tqdm, command=command_line())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [result, result.get("compare")]
    exact = all(r["exact_output_lengths"] for r in runs if r is not None)
    base = result.get("baseline")
    exact = exact and (base is None or base["exact_output_lengths"])
    return 0 if exact else 1


def command_line() -> str:
    """This process's command line, as typed (`nanoflow ...` or `python -m module ...`)."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name.removesuffix(".__main__")
        return shlex.join(["python", "-m", module, *argv[1:]])
    argv[0] = Path(argv[0]).name if argv else "nanoflow"
    return shlex.join(argv)
