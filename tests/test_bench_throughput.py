"""The offline throughput benchmark: GEMM peak, step statistics, options/CLI, and one end-to-end CPU run."""
from __future__ import annotations

import argparse
import json

import pytest

from nanoflow.bench.gemm_peak import measure_gemm_peak, measure_gemm_peak_tflops
from nanoflow.bench.step_stats import step_statistics
from nanoflow.bench.throughput import ThroughputOptions, add_cli_args, engine_args_from, run_from_args, run_throughput


# ---- GEMM peak ------------------------------------------------------------------------------------
def test_gemm_peak_on_cpu_is_small_and_flagged():
    peak = measure_gemm_peak("cpu", n=64)
    assert peak.tflops > 0 and peak.n == 64 and peak.iters == 10
    assert peak.illustrative and peak.device == "cpu" and peak.dtype == "bfloat16"
    assert measure_gemm_peak("cpu", n=8192, cpu_max_n=32).n == 32      # 8192^3 is capped on CPU
    assert measure_gemm_peak_tflops("cpu", n=32) > 0


def test_cpu_gemm_peak_in_the_model_dtype_within_seconds(capsys):
    """The CPU peak once took 38-60 s, silently, in bf16 against an fp32 model ('327% of optimal')."""
    import time

    import torch

    from nanoflow.bench.throughput_run import _gemm_peak
    t0 = time.perf_counter()
    peak = _gemm_peak(torch.device("cpu"), torch.float32)
    assert time.perf_counter() - t0 < 5.0
    assert peak.dtype == "float32" and peak.illustrative
    printed = capsys.readouterr().out
    assert "[bench] measuring the GEMM peak (float32" in printed and "[bench] GEMM peak" in printed
    # n halves until the matmuls fit the time budget
    assert measure_gemm_peak("cpu", n=1024, cpu_max_seconds=1e-9).n == 64


def test_host_load_meter_sees_other_processes():
    import subprocess
    import sys

    from nanoflow.bench.host_load import HostLoad, HostLoadMeter
    with HostLoadMeter() as meter:
        subprocess.run([sys.executable, "-c", "import time; t = time.process_time()\n"
                        "while time.process_time() - t < 0.5: pass"], check=True)
    if meter.result is None:
        pytest.skip("no /proc/stat here")
    assert meter.result.other_cpu_s >= 0.4  # the child is another process
    quiet = HostLoad(wall_s=10.0, own_cpu_s=20.0, other_cpu_s=0.5, num_cpus=2)
    busy = HostLoad(wall_s=10.0, own_cpu_s=12.0, other_cpu_s=9.0, num_cpus=2)
    assert not quiet.contended and quiet.warning("timed run") is None
    assert busy.contended and "45% of the 2 CPUs during the timed run" in busy.warning("timed run")


def test_gemm_peak_needs_ten_timed_matmuls():
    with pytest.raises(ValueError, match="iters"):
        measure_gemm_peak("cpu", n=32, iters=9)
    with pytest.raises(ValueError, match="n must be positive"):
        measure_gemm_peak("cpu", n=0)


# ---- step statistics ------------------------------------------------------------------------------
def test_step_statistics_middle_eighty_percent():
    # Ten 1 s steps of 100 tokens, 0.1 s apart: span 10.9 s, steady window [1.09, 9.81] by midpoint.
    steps = [(1.1 * i, 1.1 * i + 1.0, 100) for i in range(10)]
    stats = step_statistics(list(reversed(steps)))
    assert stats.num_steps == 10
    assert stats.span_s == pytest.approx(10.9)
    assert stats.busy_s == pytest.approx(10.0)
    assert stats.gap_s == pytest.approx(0.9) and stats.gap_fraction == pytest.approx(0.9 / 10.9)
    assert stats.steady_steps == 8                       # steps 1..8 (midpoints 1.6 .. 9.3)
    assert stats.steady_s == pytest.approx(9.8 - 1.1)
    assert stats.steady_tokens == 800
    assert stats.steady_tokens_per_s == pytest.approx(800 / 8.7)
    assert stats.mean_tokens_per_step == 100


def test_step_statistics_edge_cases():
    assert step_statistics([]) is None
    with pytest.raises(ValueError, match="middle"):
        step_statistics([(0.0, 1.0, 5)], middle=0.0)
    one = step_statistics([(0.0, 2.0, 7)])
    assert one.steady_tokens == 7 and one.steady_tokens_per_s == pytest.approx(3.5) and one.gap_s == 0.0


# ---- options and CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(num_requests=0), "num_requests"),
    (dict(hf_batch_size=0), "hf_batch_size"),
    (dict(hf_num_requests=-1), "hf_num_requests"),
    (dict(warmup_requests=-1), "warmup_requests"),
    (dict(baseline="vllm"), "baseline"),
    (dict(temperature=-0.5), "temperature"),
    (dict(engine_args={"plan": "auto"}), "plan"),
    (dict(engine_args={"no_such_field": 1}), "no_such_field"),
])
def test_option_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ThroughputOptions(**kwargs)


def _parse(argv: list[str]) -> argparse.Namespace:
    return add_cli_args(argparse.ArgumentParser()).parse_args(argv)


def test_cli_defaults_match_the_protocol():
    args = _parse([])
    assert (args.num_requests, args.warmup_requests, args.hf_batch_size, args.hf_num_requests) == (1000, 32, 64, 256)
    assert args.plan == "sequential" and args.compare is None and args.baseline is None


def test_cli_engine_flags_become_engine_args():
    assert engine_args_from(_parse([])) == {}
    args = _parse(["--enforce-eager", "--num-kv-blocks", "12", "--use-triton", "off", "--max-num-seqs", "64"])
    assert engine_args_from(args) == {"enforce_eager": True, "num_kv_blocks": 12, "use_triton": "off"}
    assert args.max_num_seqs == 64                      # a dedicated flag, not an engine_args entry


def test_cli_reports_a_bad_workload_before_building_anything(tmp_path, capsys):
    assert run_from_args(_parse(["--workload", "constant:12"])) == 2
    assert "constant:IN:OUT" in capsys.readouterr().err
    assert run_from_args(_parse(["--workload", "lmsys", "--trace-dir", str(tmp_path)])) == 2
    assert str(tmp_path) in capsys.readouterr().err


# ---- end to end on CPU (built-in default model) ----------------------------------------------------
def test_end_to_end_cpu_run_with_compare_and_hf_baseline(tmp_path):
    from nanoflow.models.presets import PRESETS

    out = tmp_path / "result.json"
    result = run_throughput(model="default", device="cpu", workload="constant:16:8", num_requests=8,
                            warmup_requests=2, compare="sequential", baseline="hf", hf_num_requests=4,
                            hf_batch_size=4, temperature=1.0, output_json=str(out), use_tqdm=False)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("date", "device_name", "torch_version", "triton_version", "transformers_version", "command",
                "model", "num_params", "workload", "requests", "input_tokens", "output_tokens", "wall_s",
                "total_tokens_per_s", "output_tokens_per_s", "requests_per_s", "steady_state_total_tokens_per_s",
                "gemm_peak_tflops", "optimal_tokens_per_s", "pct_of_optimal", "steady_state_pct_of_optimal",
                "plan", "compare", "baseline"):
        assert key in saved, key
    p = PRESETS["default"].num_parameters()
    assert saved["num_params"] == p
    assert (saved["requests"], saved["input_tokens"], saved["output_tokens"]) == (8, 8 * 16, 8 * 8)
    assert saved["exact_output_lengths"]
    assert saved["total_tokens_per_s"] == pytest.approx((128 + 64) / saved["wall_s"])
    assert saved["optimal_tokens_per_s"] == pytest.approx(saved["gemm_peak_tflops"] * 1e12 / (2 * p))
    assert saved["pct_of_optimal"] == pytest.approx(100 * saved["total_tokens_per_s"] / saved["optimal_tokens_per_s"])
    assert saved["gemm"]["illustrative"] is True and saved["gemm"]["dtype"] == "float32"  # the model's
    assert saved["host_load"]["own_cpu_s"] > 0 and saved["compare"]["host_load"] is not None
    # Only the timed run's steps are counted (not the warm-up's): each request feeds its prompt and all
    # but its last output token through the dense batch.
    assert saved["steps"]["num_steps"] > 0 and saved["steps"]["steady_steps"] > 0
    assert saved["steps"]["mean_tokens_per_step"] * saved["steps"]["num_steps"] == pytest.approx(128 + 8 * 7)
    assert saved["steady_state_total_tokens_per_s"] > 0
    compare = saved["compare"]
    assert compare["plan"] == "sequential" and compare["exact_output_lengths"]
    assert (compare["input_tokens"], compare["output_tokens"]) == (128, 64)
    assert compare["ratio"] == pytest.approx(saved["total_tokens_per_s"] / compare["total_tokens_per_s"])
    base = saved["baseline"]
    assert base["system"] == "transformers" and base["exact_output_lengths"] and base["same_weights"]
    assert (base["requests"], base["input_tokens"], base["output_tokens"], base["generated_tokens"]) == (4, 64, 32, 32)
    assert base["ratio"] == pytest.approx(saved["total_tokens_per_s"] / base["total_tokens_per_s"])
    assert "run_throughput(" in saved["command"]


def test_hf_baseline_model_holds_the_engine_weights():
    import torch

    from nanoflow import LLM, SamplingParams
    from nanoflow.bench.hf_baseline import build_hf_model
    from nanoflow.bench.workloads import parse_workload, sample_requests

    llm = LLM(model="default", device="cpu", dtype="float32")
    weights = {k: v.detach().to("cpu") for k, v in llm.engine.model.export_hf_state_dict().items()}
    reqs = sample_requests(parse_workload("constant:8:4"), 3, 0, llm.model_config.vocab_size, 2048)
    ours = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs],
                        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    hf = build_hf_model(weights, llm.model_config, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        ids = torch.tensor([r.prompt_token_ids for r in reqs])
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                          do_sample=False, pad_token_id=0)
    assert out[:, 8:].tolist() == [o.outputs[0].token_ids for o in ours]
    weights.pop("model.norm.weight")
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        build_hf_model(weights, llm.model_config, torch.device("cpu"), torch.float32)
