"""Offline throughput benchmark (`nanoflow bench throughput`), following ../shared/BENCHMARKING.md.

One process: build the engine, warm up (excluded), measure the GEMM peak right before the timed run,
time `llm.generate` over all requests, then optionally the same requests under another plan
(`--compare`), with prefix caching or the host tier off (`--compare-prefix-caching`,
`--compare-host-tier`), under the other KV admission rule (`--compare-kv-admission`), and through transformers' static batched `generate` with the same weights
(`--baseline hf`). Every timed run starts with an empty prefix cache; multi-round workloads run their
conversations closed-loop (bench/conversations.py).

Here: run_throughput and the command line. The options and the record of a run are in
throughput_options.py, one timed run in throughput_run.py, what is printed in throughput_report.py.
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
from datetime import datetime, timezone
from pathlib import Path

import torch

from nanoflow.bench.gemm_peak import device_name
from nanoflow.bench.hf_baseline import empty_cache, run_hf_baseline
from nanoflow.bench.step_stats import class_ratios
from nanoflow.bench.throughput_options import (DEDICATED_ENGINE_FIELDS, WARMUP_MAX_OUTPUT_TOKENS, WARMUP_SEED_OFFSET,
                                               ThroughputOptions)
from nanoflow.bench.throughput_report import format_table, print_run
from nanoflow.bench.throughput_run import timed_run
from nanoflow.bench.workloads import (BenchRequest, Conversation, ConversationTurn, Workload, parse_workload,
                                      sample_conversations, sample_requests)
from nanoflow.config import EngineConfig


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
    main = timed_run(llm, opts.plan, requests, warmup, opts, device, dtype)
    main.variant = kv_variant and kv_variant[1]
    runs = {"main": main.metrics(num_params, num_gpus)}
    print_run("nanoflow", runs["main"])
    if kv_variant is not None:
        if opts.compare_prefix_caching:
            llm.engine.kv.set_prefix_caching(False)
        elif opts.compare_host_tier:
            llm.engine.kv.set_host_tier_enabled(False)
        else:
            llm.engine.set_kv_admission(_other_admission(opts))
        compared = timed_run(llm, opts.plan, requests, warmup, opts, device, dtype)
        compared.variant = kv_variant[2]
        runs["compare"] = compared.metrics(num_params, num_gpus)
        runs["compare"]["ratio"] = runs["main"]["total_tokens_per_s"] / runs["compare"]["total_tokens_per_s"]
        runs["compare"]["ratio_means"] = f"total tokens/s, {kv_variant[1]} / {kv_variant[2]}"
        on, off = runs["main"]["kv"], runs["compare"]["kv"]
        if on and off and on["prefill_tokens_computed"]:
            runs["compare"]["prefill_ratio"] = off["prefill_tokens_computed"] / on["prefill_tokens_computed"]
        print_run(f"nanoflow ({kv_variant[2]})", runs["compare"])
    if opts.compare is not None:
        if hasattr(llm, "set_plan"):
            llm.set_plan(opts.compare)
        else:
            llm = None  # free the first engine before building the second
            empty_cache(device)
            llm = _build_llm(opts, opts.compare)
        compared = timed_run(llm, opts.compare, requests, warmup, opts, device, dtype)
        runs["compare"] = compared.metrics(num_params, num_gpus)
        runs["compare"]["ratio"] = runs["main"]["total_tokens_per_s"] / runs["compare"]["total_tokens_per_s"]
        runs["compare"]["ratio_means"] = f"total tokens/s of plan {opts.plan!r} / plan {opts.compare!r}"
        if runs["main"]["step_classes"] and runs["compare"]["step_classes"]:
            runs["compare"]["class_ratios"] = class_ratios(runs["main"]["step_classes"],
                                                           runs["compare"]["step_classes"])
        print_run(f"nanoflow ({opts.compare})", runs["compare"])
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
        print_run("transformers", baseline)
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


def _kv_variant(opts: ThroughputOptions) -> tuple[str, str, str] | None:
    """(what is compared, the main run's label, the compared run's label), or None."""
    if opts.compare_prefix_caching:
        return "prefix caching", "prefix caching on", "prefix caching off"
    if opts.compare_host_tier:
        return "host tier", "host tier on", "host tier off"
    if opts.compare_kv_admission:
        main = opts.engine_args.get("kv_admission", "reserve")
        return "kv admission", f"kv admission {main}", f"kv admission {_other_admission(opts)}"
    return None


def _other_admission(opts: ThroughputOptions) -> str:
    return "reserve" if opts.engine_args.get("kv_admission", "reserve") == "peak" else "peak"


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
                        help="also run the same requests with the host KV tier off, and with it the disk tier "
                             "behind it (needs --kv-host-gb)")
    parser.add_argument("--compare-kv-admission", action="store_true",
                        help="also run the same requests under the other KV admission rule (same engine): "
                             "'peak' against the default 'reserve', or 'reserve' with --kv-admission peak")
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
    add_engine_args(parser, skip=DEDICATED_ENGINE_FIELDS)
    return parser


def engine_args_from(args: argparse.Namespace) -> dict:
    """The EngineConfig fields without a dedicated benchmark flag that differ from their defaults."""
    out = {}
    for f in dataclasses.fields(EngineConfig):
        if f.name in DEDICATED_ENGINE_FIELDS or not hasattr(args, f.name):
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
            compare_kv_admission=args.compare_kv_admission, hf_batch_size=args.hf_batch_size, hf_num_requests=args.hf_num_requests,
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
