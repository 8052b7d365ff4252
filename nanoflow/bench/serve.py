"""Serving benchmark client (`nanoflow bench serve`): replays a workload against an OpenAI-compatible
server with Poisson arrivals and reports what `vllm bench serve` reports, in the same format.

Each request is a streamed `/v1/completions` call whose prompt is a list of token ids, with
`max_tokens` = the workload's output length and `ignore_eos`, so every request generates exactly the
planned tokens (the server's usage report gives the exact count). The same client works against vLLM
(pass --vocab-size and --max-model-len there: only nanoflow's /v1/models reports them).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from nanoflow.bench.workloads import BenchRequest, Conversation, parse_workload, sample_conversations, sample_requests

_TIMEOUT = httpx.Timeout(6 * 3600.0, connect=30.0)
_METRICS = (("ttft", "TTFT", "Time to First Token"),
            ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
            ("itl", "ITL", "Inter-token Latency"),
            ("e2el", "E2EL", "End-to-end Latency"))


@dataclass
class RequestResult:
    """What one request measured (times in seconds; starts relative to the benchmark start)."""
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    error: str = ""
    token_ids: list[int] = field(default_factory=list)
    """Generated ids, when the server returns them (vLLM's return_token_ids; multi-round runs ask)."""


@dataclass(frozen=True)
class ServerInfo:
    """What the client needs to know about the served model."""
    model: str
    max_model_len: int | None
    vocab_size: int | None


# ---- talking to the server ------------------------------------------------------------------------
def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def fetch_server_info(base_url: str, api_key: str | None = None) -> ServerInfo:
    """The first model of GET /v1/models; ValueError when the server does not answer properly."""
    try:
        r = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=_headers(api_key), timeout=30.0)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {base_url}: {exc}") from None
    if r.status_code != 200:
        raise ValueError(f"GET {base_url}/v1/models answered {r.status_code}: {r.text[:300]}")
    cards = r.json().get("data") or []
    if not cards:
        raise ValueError(f"{base_url}/v1/models lists no model")
    card = cards[0]
    return ServerInfo(card["id"], card.get("max_model_len"), card.get("vocab_size"))


async def _send(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str,
                req: BenchRequest, temperature: float, t0: float, want_ids: bool = False) -> RequestResult:
    payload = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len,
               "ignore_eos": True, "temperature": temperature, "stream": True,
               "stream_options": {"include_usage": True}}
    if want_ids:
        payload["return_token_ids"] = True
    res = RequestResult(prompt_len=len(req.prompt_token_ids))
    start = time.perf_counter()
    res.start = start - t0
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message", chunk["error"]))
                    return res
                now = time.perf_counter()
                if chunk.get("choices"):
                    ids = chunk["choices"][0].get("token_ids") if want_ids else None
                    if ids:
                        res.token_ids.extend(int(t) for t in ids)
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    res.chunk_times.append(now - t0)
                    last = now
                    chunks += 1
                if chunk.get("usage"):
                    res.output_tokens = int(chunk["usage"]["completion_tokens"])
        res.latency = last - start
        res.output_tokens = res.output_tokens or chunks
        res.success = chunks > 0
        if not res.success:
            res.error = "the stream ended without any output"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def arrival_offsets(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send times (s after the start) of a Poisson process at `request_rate` (all 0 for inf)."""
    if request_rate <= 0 or math.isnan(request_rate):
        raise ValueError(f"request rate must be positive (or inf), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests)
    gaps[0] = 0.0  # the first request goes out at once
    return np.cumsum(gaps).tolist()


async def run_serving_benchmark(base_url: str, requests: Sequence[BenchRequest], request_rate: float = math.inf,
                                *, model: str | None = None, api_key: str | None = None, seed: int = 0,
                                max_concurrency: int | None = None, temperature: float = 0.0,
                                warmup: bool = True, use_tqdm: bool = False) -> dict[str, Any]:
    """Replays `requests` against `base_url` and returns the metrics (see `compute_metrics`);
    use_tqdm: a progress bar of finished requests (on stderr)."""
    if not requests:
        raise ValueError("no requests to send")
    if max_concurrency is not None and max_concurrency <= 0:
        raise ValueError(f"max_concurrency must be positive, got {max_concurrency}")
    offsets = arrival_offsets(len(requests), request_rate, seed)
    url = f"{base_url.rstrip('/')}/v1/completions"
    headers = _headers(api_key)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=_TIMEOUT, limits=limits) as client:
        if model is None:
            model = (await _fetch_model(client, base_url, headers))
        if warmup:  # vLLM's "initial single prompt test run": fail early, and keep cold start out
            probe = await _send(client, url, headers, model, requests[0], temperature, time.perf_counter())
            if not probe.success:
                raise ValueError(f"the test request failed: {probe.error}")
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), desc="requests", unit="req", dynamic_ncols=True, disable=not use_tqdm)
        failed = 0
        t0 = time.perf_counter()

        async def one(req: BenchRequest, offset: float) -> RequestResult:
            nonlocal failed
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                res = await _send(client, url, headers, model, req, temperature, t0)
            else:
                async with gate:
                    res = await _send(client, url, headers, model, req, temperature, t0)
            failed += not res.success
            if failed:
                bar.set_postfix_str(f"{failed} failed", refresh=False)
            bar.update(1)
            return res

        try:
            results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
        finally:
            bar.close()
        duration = time.perf_counter() - t0
    metrics = compute_metrics(results, duration)
    metrics.update(request_rate=request_rate, max_concurrency=max_concurrency, model=model,
                   base_url=base_url, num_requests=len(requests))
    return metrics


async def run_conversation_benchmark(base_url: str, conversations: Sequence[Conversation],
                                     request_rate: float = math.inf, *, model: str | None = None,
                                     api_key: str | None = None, seed: int = 0, max_concurrency: int | None = None,
                                     temperature: float = 0.0) -> dict[str, Any]:
    """Multi-round conversations, closed-loop: conversations start at Poisson times (`request_rate`
    conversations/s), each sends its turns one after the other, turn k+1's prompt being turn k's prompt,
    its answer and the next user tokens. The answer is the ids the server generated when it returns
    them (`return_token_ids`, as vLLM does), else the workload's stand-in answer of the same length (then
    only the earlier prompts, not the answers, can hit the server's prefix cache). Metrics are per turn."""
    if not conversations:
        raise ValueError("no conversations to run")
    if max_concurrency is not None and max_concurrency <= 0:
        raise ValueError(f"max_concurrency must be positive, got {max_concurrency}")
    offsets = arrival_offsets(len(conversations), request_rate, seed)
    url = f"{base_url.rstrip('/')}/v1/completions"
    headers = _headers(api_key)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    served_answers = [0]
    async with httpx.AsyncClient(timeout=_TIMEOUT, limits=limits) as client:
        if model is None:
            model = await _fetch_model(client, base_url, headers)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        t0 = time.perf_counter()

        async def one(conv: Conversation, offset: float) -> list[RequestResult]:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            results, prompt = [], []
            for turn in conv.turns:
                prompt = prompt + list(turn.user_token_ids)
                req = BenchRequest(prompt_token_ids=prompt, output_len=turn.output_len)
                if gate is None:
                    res = await _send(client, url, headers, model, req, temperature, t0, want_ids=True)
                else:
                    async with gate:
                        res = await _send(client, url, headers, model, req, temperature, t0, want_ids=True)
                results.append(res)
                if not res.success:
                    break  # the conversation cannot go on without this answer
                served = len(res.token_ids) == res.output_tokens
                served_answers[0] += served
                prompt = prompt + (res.token_ids if served else list(turn.answer_token_ids))
            return results

        per_conv = await asyncio.gather(*(one(c, o) for c, o in zip(conversations, offsets)))
        duration = time.perf_counter() - t0
    results = [r for rs in per_conv for r in rs]
    metrics = compute_metrics(results, duration)
    metrics.update(request_rate=request_rate, max_concurrency=max_concurrency, model=model, base_url=base_url,
                   num_requests=len(results), num_conversations=len(conversations),
                   planned_turns=sum(len(c.turns) for c in conversations), answers_from_server=served_answers[0])
    return metrics


async def _fetch_model(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> str:
    r = await client.get(f"{base_url.rstrip('/')}/v1/models", headers=headers)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


# ---- metrics ----------------------------------------------------------------------------------------
def _summary(values: Sequence[float], name: str) -> dict[str, float]:
    ms = np.asarray(values, dtype=np.float64) * 1000.0 if len(values) else np.zeros(1)
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(ms.std()), f"p99_{name}_ms": float(np.percentile(ms, 99))}


def compute_metrics(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM's serving metrics (same names as its result JSON), plus input throughput and NanoFlow's
    normalized latency (end-to-end latency / output tokens, per request)."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    norm = [r.latency / r.output_tokens for r in ok if r.output_tokens > 0]
    out: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "input_throughput": total_in / duration,
        "output_throughput": total_out / duration, "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": _peak_per_second([t for r in ok for t in r.chunk_times]),
        "max_concurrent_requests": _peak_concurrency(ok),
        "errors": sorted({r.error for r in results if not r.success})[:5],
    }
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpots), ("itl", itls),
                         ("e2el", [r.latency for r in ok]), ("normalized_latency", norm)):
        out.update(_summary(values, name))
    return out


def _peak_per_second(times: Sequence[float]) -> float:
    """Most output chunks in any one-second bucket (vLLM's 'peak output token throughput')."""
    if not times:
        return 0.0
    return float(np.bincount(np.floor(np.asarray(times)).astype(np.int64)).max())


def _peak_concurrency(results: Sequence[RequestResult]) -> int:
    events = sorted([(r.start, 1) for r in results] + [(r.start + r.latency, -1) for r in results],
                    key=lambda e: (e[0], e[1]))
    peak = running = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def format_results(m: dict[str, Any]) -> str:
    """The `vllm bench serve` result block (plus an input-throughput row)."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "<10.2f") -> None:
        lines.append("{:<40} {:{fmt}}".format(label, value, fmt=fmt))

    row("Successful requests:", m["completed"], "<10")
    row("Failed requests:", m["failed"], "<10")
    if m.get("max_concurrency") is not None:
        row("Maximum request concurrency:", m["max_concurrency"], "<10")
    if m.get("request_rate") is not None and math.isfinite(m["request_rate"]):
        row("Request rate configured (RPS):", m["request_rate"])
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"], "<10")
    row("Total generated tokens:", m["total_output_tokens"], "<10")
    row("Request throughput (req/s):", m["request_throughput"])
    row("Input token throughput (tok/s):", m["input_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"])
    row("Peak concurrent requests:", m["max_concurrent_requests"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    for key, name, header in _METRICS:
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {name} (ms):", m[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", m[f"median_{key}_ms"])
        row(f"P99 {name} (ms):", m[f"p99_{key}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


def format_sweep(runs: Sequence[dict[str, Any]]) -> str:
    """One line per request rate: throughput and normalized latency."""
    head = f"{'rate (req/s)':>12} {'req/s':>8} {'total tok/s':>12} {'norm lat mean':>14} {'norm lat p99':>13} " \
           f"{'TTFT mean':>10} {'TPOT mean':>10}  (latencies in ms, normalized = ms/output token)"
    lines = [head]
    for m in runs:
        lines.append(f"{m['request_rate']:>12.2f} {m['request_throughput']:>8.2f} {m['total_token_throughput']:>12.1f} "
                     f"{m['mean_normalized_latency_ms']:>14.2f} {m['p99_normalized_latency_ms']:>13.2f} "
                     f"{m['mean_ttft_ms']:>10.2f} {m['mean_tpot_ms']:>10.2f}")
    return "\n".join(lines)


# ---- CLI --------------------------------------------------------------------------------------------
def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"request rate must be a number or inf, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"request rate must be positive, got {text!r}")
    return value


def _rates(text: str) -> list[float]:
    return [_rate(part) for part in text.split(",") if part.strip()]


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `nanoflow bench serve` options to `parser`."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--workload", default="constant:512:512",
                        help="constant:IN:OUT, splitwise, lmsys, sharegpt, a PATH.csv, shared-prefix:SYS:UNIQUE:OUT"
                             "[:GROUPS], or multi-round:TRACE[:ROUNDS] (closed-loop conversations; --request-rate "
                             "and --num-requests then count conversations) (default %(default)s)")
    parser.add_argument("--request-rate", type=_rate, default=math.inf,
                        help="Poisson arrival rate in requests/s; inf sends all at once (default %(default)s)")
    parser.add_argument("--sweep", type=_rates, default=None, metavar="R1,R2,...",
                        help="run once per request rate (same requests) instead of --request-rate")
    parser.add_argument("--num-requests", type=int, default=200, help="requests to send (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default greedy)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="prompt ids are drawn below this (default: the server's vocab_size)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="drop trace rows longer than this (default: the server's max_model_len)")
    parser.add_argument("--trace-dir", default=None,
                        help="folder of the trace CSVs (default: $NANOFLOW_TRACE_DIR, else the copies shipped "
                             "in the package)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed test request")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--label", default=None, help="this run's name in plots (default: the model name)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="with --sweep: normalized latency vs rate")
    parser.add_argument("--plot-compare", action="append", default=[], metavar="JSON",
                        help="also draw the sweep saved in this --output-json file (repeatable)")
    parser.add_argument("--output-json", default=None, metavar="PATH", help="write the results here ('-': stdout)")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the benchmark; 0 when every request succeeded, 1 when some failed, 2 on bad input."""
    try:
        result = _run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = result.get("runs", [result])
    return 0 if all(r["failed"] == 0 for r in runs) else 1


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.plot and not args.sweep:
        raise ValueError("--plot needs --sweep")
    info = fetch_server_info(args.base_url, args.api_key)
    vocab = args.vocab_size or info.vocab_size
    if vocab is None:
        raise ValueError("the server does not report vocab_size: pass --vocab-size")
    workload = parse_workload(args.workload, args.trace_dir)
    max_len = args.max_model_len or info.max_model_len
    if workload.kind == "multi-round":
        requests = sample_conversations(workload, args.num_requests, args.seed, vocab, max_len)
        what = "conversations"
    else:
        requests = sample_requests(workload, args.num_requests, args.seed, vocab, max_len)
        what = "requests"
    model = args.model or info.model
    label = args.label or model
    rates = args.sweep or [args.request_rate]
    runs = []
    for rate in rates:
        print(f"Traffic request rate: {rate}  ({len(requests)} {what} of {workload.describe()})", flush=True)
        if workload.kind == "multi-round":
            m = asyncio.run(run_conversation_benchmark(
                args.base_url, requests, rate, model=model, api_key=args.api_key, seed=args.seed,
                max_concurrency=args.max_concurrency, temperature=args.temperature))
            print(f"multi-round: {m['num_requests']} of {m['planned_turns']} turns sent, "
                  f"{m['answers_from_server']} next prompts carried the server's own answer ids", flush=True)
        else:
            m = asyncio.run(run_serving_benchmark(
                args.base_url, requests, rate, model=model, api_key=args.api_key, seed=args.seed,
                max_concurrency=args.max_concurrency, temperature=args.temperature, warmup=not args.no_warmup,
                use_tqdm=not args.disable_tqdm))
        m.update(workload=args.workload, seed=args.seed, label=label)
        print(format_results(m), flush=True)
        for error in m["errors"]:
            print(f"error: {error}", file=sys.stderr)
        runs.append(m)
    result: dict[str, Any] = runs[0] if not args.sweep else {"label": label, "workload": args.workload, "runs": runs}
    if args.sweep:
        print(format_sweep(runs))
    if args.plot:
        _plot(label, runs, args.plot_compare, args.plot, args.workload)
        print(f"plot written to {args.plot}")
    if args.output_json:
        text = json.dumps(result, indent=2)  # a rate of inf is written as Infinity, as json.loads reads it
        if args.output_json == "-":
            print(text)
        else:
            Path(args.output_json).write_text(text + "\n")
    return result


def _plot(label: str, runs: list[dict[str, Any]], compare: list[str], path: str, workload: str) -> None:
    from nanoflow.bench.plot import plot_latency_vs_rate
    sweeps = [(label, runs)]
    for file in compare:
        saved = json.loads(Path(file).read_text())
        if "runs" not in saved:
            raise ValueError(f"{file} holds no sweep (write one with --sweep ... --output-json)")
        sweeps.append((saved.get("label") or file, saved["runs"]))
    series, groups, dashed = {}, {}, []
    for name, sweep in sweeps:
        for stat in ("mean", "p99"):
            key = f"{name} ({stat})"
            series[key] = [(m["request_rate"], m[f"{stat}_normalized_latency_ms"]) for m in sweep]
            groups[key] = name
        dashed.append(f"{name} (p99)")
    plot_latency_vs_rate(series, path, title=f"Normalized latency vs request rate, {workload}",
                         dashed=dashed, groups=groups)
