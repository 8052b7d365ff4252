"""The serving benchmark client: against a real server (default model, CPU) and its pure parts."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from nanoflow.bench.plot import plot_latency_vs_rate
from nanoflow.bench.serve import (
    RequestResult, add_cli_args, arrival_offsets, compute_metrics, format_results, run_from_args)
from nanoflow.config import EngineConfig
from nanoflow.engine.engine import LLMEngine
from nanoflow.entrypoints.async_engine import AsyncEngine
from nanoflow.entrypoints.openai_server import ServerThread, build_app

VLLM_ROWS = [
    "============ Serving Benchmark Result ============",
    "Successful requests:", "Failed requests:", "Benchmark duration (s):", "Total input tokens:",
    "Total generated tokens:", "Request throughput (req/s):", "Output token throughput (tok/s):",
    "Peak output token throughput (tok/s):", "Peak concurrent requests:", "Total token throughput (tok/s):",
    "---------------Time to First Token----------------", "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):",
    "-----Time per Output Token (excl. 1st token)------", "Mean TPOT (ms):", "Median TPOT (ms):", "P99 TPOT (ms):",
    "---------------Inter-token Latency----------------", "Mean ITL (ms):", "Median ITL (ms):", "P99 ITL (ms):",
    "----------------End-to-end Latency----------------", "Mean E2EL (ms):", "Median E2EL (ms):",
    "P99 E2EL (ms):", "=" * 50,
]


@pytest.fixture(scope="module")
def server_url():
    engine = AsyncEngine(LLMEngine(EngineConfig(model="default", device="cpu", num_kv_blocks=512))).start()
    with ServerThread(build_app(engine, "default")) as server:
        yield server.url
    engine.shutdown()


def _args(*argv: str) -> argparse.Namespace:
    return add_cli_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_bench_against_server_prints_vllm_rows(server_url, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = run_from_args(_args("--base-url", server_url, "--workload", "constant:12:4", "--num-requests", "6",
                             "--request-rate", "inf", "--seed", "1", "--output-json", str(out)))
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0
    assert "requests: 100%" in captured.err and "6/6" in captured.err  # the progress bar (stderr)
    lines = printed.splitlines()
    position = [next(i for i, line in enumerate(lines) if line.startswith(row)) for row in VLLM_ROWS]
    assert position == sorted(position)  # every row, in vLLM's order
    assert "Input token throughput (tok/s):" in printed
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_input_tokens"] == 6 * 12 and result["total_output_tokens"] == 6 * 4
    assert f"{'Total generated tokens:':<40} 24" in printed
    assert result["mean_ttft_ms"] > 0 and result["mean_e2el_ms"] >= result["mean_ttft_ms"]


def test_sweep_writes_plot(server_url, tmp_path, capsys):
    png = tmp_path / "fig8.png"
    out = tmp_path / "sweep.json"
    rc = run_from_args(_args("--base-url", server_url, "--workload", "constant:8:3", "--num-requests", "4",
                             "--sweep", "20,50", "--plot", str(png), "--output-json", str(out), "--no-warmup"))
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.count("Serving Benchmark Result") == 2
    assert "Request rate configured (RPS):           20.00" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [20.0, 50.0]
    # A saved sweep can be drawn beside a new one (e.g. another server's).
    png2 = tmp_path / "compare.png"
    rc = run_from_args(_args("--base-url", server_url, "--workload", "constant:8:3", "--num-requests", "2",
                             "--sweep", "30", "--plot", str(png2), "--plot-compare", str(out), "--no-warmup"))
    assert rc == 0 and png2.stat().st_size > 0


def test_bad_input_is_exit_code_2(server_url, capsys):
    assert run_from_args(_args("--base-url", server_url, "--workload", "constant:0:3")) == 2
    assert run_from_args(_args("--base-url", "http://127.0.0.1:9", "--num-requests", "1")) == 2
    assert run_from_args(_args("--base-url", server_url, "--plot", "x.png")) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args("--request-rate", "-1")


def test_failed_requests_are_counted(server_url, capsys):
    # 100 prompt tokens + 3000 output tokens exceed the model's 2048: the server answers 400 to each.
    rc = run_from_args(_args("--base-url", server_url, "--workload", "constant:100:3000", "--num-requests", "2",
                             "--max-model-len", "4096", "--no-warmup"))
    assert rc == 1
    assert "Failed requests:                         2" in capsys.readouterr().out


# ---- pure parts -----------------------------------------------------------------------------------
def test_poisson_arrivals():
    assert arrival_offsets(5, math.inf, 0) == [0.0] * 5
    a = arrival_offsets(20000, 50.0, seed=3)
    assert a == arrival_offsets(20000, 50.0, seed=3) and a != arrival_offsets(20000, 50.0, seed=4)
    gaps = np.diff(a)
    assert a[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 50.0, rel=0.05)  # exponential: std == mean
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, 0)


def test_metrics_follow_vllm_definitions():
    a = RequestResult(prompt_len=10, success=True, output_tokens=5, ttft=0.1, latency=0.5,
                      itl=[0.1, 0.1, 0.1, 0.1], start=0.0, chunk_times=[0.1, 0.2, 0.3, 0.4, 0.5])
    b = RequestResult(prompt_len=20, success=True, output_tokens=3, ttft=0.2, latency=1.2,
                      itl=[0.5, 0.5], start=0.3, chunk_times=[0.5, 1.0, 1.5])
    failed = RequestResult(prompt_len=7, error="HTTP 400: too long")
    m = compute_metrics([a, b, failed], duration=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 8)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 4.0
    assert m["input_throughput"] == 15.0 and m["total_token_throughput"] == 19.0
    assert m["mean_tpot_ms"] == pytest.approx((100.0 + 500.0) / 2)        # (0.5-0.1)/4, (1.2-0.2)/2
    assert m["mean_itl_ms"] == pytest.approx(1000 * 1.4 / 6)
    assert m["mean_e2el_ms"] == pytest.approx(850.0)
    assert m["mean_normalized_latency_ms"] == pytest.approx((100.0 + 400.0) / 2)
    assert m["max_output_tokens_per_s"] == 6 and m["max_concurrent_requests"] == 2
    assert m["errors"] == ["HTTP 400: too long"]
    text = format_results({**m, "request_rate": math.inf, "max_concurrency": None})
    assert "Request rate configured" not in text and "Mean TPOT (ms):                          300.00" in text


def test_plot_needs_a_finite_point(tmp_path):
    with pytest.raises(ValueError):
        plot_latency_vs_rate({"x": [(math.inf, 1.0)]}, tmp_path / "p.png")
    path = plot_latency_vs_rate({"mean": [(1.0, 2.0), (2.0, 3.0), (math.inf, 9.0)]}, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
