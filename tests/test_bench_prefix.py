"""Prefix-sharing workloads (shared-prefix, multi-round), the closed-loop conversation run, and the
KV-reuse figures of `bench throughput` and `bench serve` (tiny CPU runs)."""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow import LLM
from nanoflow.bench.conversations import run_conversations
from nanoflow.bench.serve import add_cli_args as serve_cli_args
from nanoflow.bench.serve import run_conversation_benchmark
from nanoflow.bench.serve import run_from_args as serve_from_args
from nanoflow.bench.throughput import ThroughputOptions, add_cli_args, run_throughput
from nanoflow.bench.workloads import (
    DEFAULT_ROUNDS,
    TOKEN_ID_MARGIN,
    parse_workload,
    sample_conversations,
    sample_requests,
)

VOCAB = 1000


def _trace(tmp_path: Path, rows: list[tuple[int, int]]) -> Path:
    path = tmp_path / "turns.csv"
    path.write_text("ContextTokens,GeneratedTokens\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


# ---- specs and sampling -----------------------------------------------------------------------------
def test_shared_prefix_requests_share_one_system_prompt_per_group():
    w = parse_workload("shared-prefix:32:8:5")
    assert (w.kind, w.prefix_len, w.input_len, w.output_len, w.num_groups) == ("shared-prefix", 32, 8, 5, 1)
    reqs = sample_requests(w, 5, 0, VOCAB, 100)
    assert all(len(r.prompt_token_ids) == 40 and r.output_len == 5 for r in reqs)
    assert len({tuple(r.prompt_token_ids[:32]) for r in reqs}) == 1
    assert len({tuple(r.prompt_token_ids[32:]) for r in reqs}) == 5
    grouped = sample_requests(parse_workload("shared-prefix:32:8:5:2"), 4, 0, VOCAB, 100)
    firsts = [tuple(r.prompt_token_ids[:32]) for r in grouped]
    assert firsts[0] == firsts[2] != firsts[1] == firsts[3]  # interleaved round-robin
    assert sample_requests(w, 5, 0, VOCAB, 100) == reqs
    with pytest.raises(ValueError, match="max_model_len"):
        sample_requests(w, 5, 0, VOCAB, 44)


@pytest.mark.parametrize("spec, fragment", [
    ("shared-prefix:1024:128", "shared-prefix:SYS:UNIQUE:OUT"),
    ("shared-prefix:0:1:1", "SYS must be at least 1"),
    ("shared-prefix:8:x:1", "UNIQUE must be an integer"),
    ("shared-prefix:8:1:1:0", "GROUPS must be at least 1"),
    ("multi-round", "multi-round:TRACE"),
    ("multi-round:constant:4:4", "TRACE must be"),
])
def test_malformed_prefix_specs(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_workload(spec)


def test_multi_round_spec_and_conversations(tmp_path):
    path = _trace(tmp_path, [(20, 4), (6, 3), (5000, 2), (9, 7)])  # the 5000-token row is filtered
    w = parse_workload(f"multi-round:{path}:3")
    assert (w.kind, w.rounds, w.path) == ("multi-round", 3, path)
    assert parse_workload(f"multi-round:{path}").rounds == DEFAULT_ROUNDS
    convs = sample_conversations(w, 6, 1, VOCAB, 200)
    assert convs == sample_conversations(w, 6, 1, VOCAB, 200)
    for conv in convs:
        assert len(conv.turns) == 3
        lens, history = conv.prompt_lens(), 0
        for turn, n in zip(conv.turns, lens):
            assert (len(turn.user_token_ids), turn.output_len) in {(20, 4), (6, 3), (9, 7)}
            assert len(turn.answer_token_ids) == turn.output_len
            assert n == history + len(turn.user_token_ids)
            history = n + turn.output_len
        assert all(TOKEN_ID_MARGIN <= t < VOCAB - TOKEN_ID_MARGIN for turn in conv.turns for t in turn.user_token_ids)
    short = sample_conversations(w, 6, 1, VOCAB, 30)  # a turn that would pass 30 tokens ends it
    assert all(1 <= len(c.turns) and c.prompt_lens()[-1] + c.turns[-1].output_len <= 30 for c in short)
    with pytest.raises(ValueError, match="sample_conversations"):
        sample_requests(w, 2, 0, VOCAB, 200)
    with pytest.raises(ValueError, match="not multi-round"):
        sample_conversations(parse_workload("constant:4:4"), 2, 0, VOCAB, 200)


@settings(max_examples=40, deadline=None)
@given(spec=st.text(alphabet="shared-prefixmultiround:0123456789abc.-", max_size=30))
def test_prefix_specs_fuzz_raise_only_clear_errors(spec):
    try:
        w = parse_workload(spec)
    except (ValueError, FileNotFoundError):
        return
    assert w.kind in ("constant", "shared-prefix", "trace", "multi-round")


# ---- closed-loop runs ---------------------------------------------------------------------------------
def test_conversations_carry_the_generated_answers(tmp_path):
    convs = sample_conversations(parse_workload(f"multi-round:{_trace(tmp_path, [(18, 5), (7, 3)])}:3"),
                                 3, 0, 500, 512)
    llm = LLM(model="default", device="cpu", block_size=4, num_kv_blocks=256)
    run = run_conversations(llm.engine, convs, temperature=0.0)
    assert run.requests == 9 and run.output_tokens == run.expected_output_tokens
    assert run.input_tokens == sum(sum(c.prompt_lens()) for c in convs)
    stats = llm.engine.stats()
    # A later turn reuses its whole history (whole blocks) but the last answer token of the turn
    # before, whose KV was never computed.
    expected = sum((n - len(turn.user_token_ids) - 1) // 4 * 4
                   for c in convs for n, turn in list(zip(c.prompt_lens(), c.turns))[1:])
    assert stats.prefix_cache_hits == expected
    assert stats.prefill_tokens_computed == run.input_tokens - stats.prefix_cache_hits
    llm.engine.check_kv_invariant()


def test_throughput_compares_prefix_caching_in_one_process(tmp_path):
    out = tmp_path / "r.json"
    result = run_throughput(model="default", device="cpu", workload="shared-prefix:40:4:3", num_requests=6,
                            warmup_requests=1, compare_prefix_caching=True, use_tqdm=False,
                            engine_args={"block_size": 4}, output_json=str(out))
    on, off = result["kv"], result["compare"]["kv"]
    assert result["variant"] == "prefix caching on" and result["compare"]["variant"] == "prefix caching off"
    assert on["prompt_tokens"] == off["prompt_tokens"] == result["input_tokens"] == 6 * 44
    assert off["prefill_tokens_computed"] == 6 * 44 and off["prefix_cache_hits"] == 0
    assert on["prefill_tokens_computed"] == 40 + 6 * 4  # the system prompt once (timed runs start cold)
    ratio = off["prefill_tokens_computed"] / on["prefill_tokens_computed"]
    assert result["compare"]["prefill_ratio"] == pytest.approx(ratio)
    assert result["exact_output_lengths"] and result["compare"]["exact_output_lengths"]
    assert json.loads(out.read_text())["compare"]["variant"] == "prefix caching off"


def test_throughput_multi_round_with_host_tier(tmp_path, capsys):
    path = _trace(tmp_path, [(18, 5), (9, 3)])
    result = run_throughput(model="default", device="cpu", workload=f"multi-round:{path}:3", num_requests=2,
                            warmup_requests=1, compare_host_tier=True, use_tqdm=False,
                            engine_args={"block_size": 4, "num_kv_blocks": 24, "kv_host_gb": 0.001})
    printed = capsys.readouterr().out
    assert result["requests"] == 6 and result["compare"]["variant"] == "host tier off"
    assert result["kv"]["prefix_cache_hits"] > 0 and result["kv"]["kv_host_blocks_saved"] > 0
    assert result["compare"]["kv"]["kv_host_blocks_saved"] == 0
    assert "prefill tokens computed" in printed and "host tier" in printed


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(compare="sequential", compare_prefix_caching=True), "choose one comparison"),
    (dict(compare_host_tier=True), "kv-host-gb"),
    (dict(compare_prefix_caching=True, engine_args={"enable_prefix_caching": False}), "drop --no-enable"),
])
def test_comparison_options_are_checked(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ThroughputOptions(**kwargs)


def test_cli_flags():
    args = add_cli_args(argparse.ArgumentParser()).parse_args(
        ["--compare-prefix-caching", "--kv-host-gb", "8", "--no-enable-prefix-caching"])
    assert args.compare_prefix_caching and args.kv_host_gb == 8.0 and args.enable_prefix_caching is False


def test_serve_multi_round_runs_turns_closed_loop(tmp_path, capsys):
    from nanoflow.config import EngineConfig
    from nanoflow.engine.engine import LLMEngine
    from nanoflow.entrypoints.async_engine import AsyncEngine
    from nanoflow.entrypoints.openai_server import ServerThread, build_app

    path = _trace(tmp_path, [(20, 4), (18, 3)])
    engine = AsyncEngine(LLMEngine(EngineConfig(model="default", device="cpu", num_kv_blocks=256))).start()
    try:
        with ServerThread(build_app(engine, "default")) as server:
            convs = sample_conversations(parse_workload(f"multi-round:{path}:2"), 3, 0, 500, 512)
            m = asyncio.run(run_conversation_benchmark(server.url, convs, temperature=0.0, max_concurrency=2))
            assert m["completed"] == m["planned_turns"] == 6 and m["failed"] == 0
            assert m["total_input_tokens"] == sum(sum(c.prompt_lens()) for c in convs)
            assert engine.engine.stats().prefix_cache_hits >= 3 * 16  # turn 2 reuses turn 1's first block
            out = tmp_path / "serve.json"
            rc = serve_from_args(serve_cli_args(argparse.ArgumentParser()).parse_args(
                ["--base-url", server.url, "--workload", f"multi-round:{path}:2", "--num-requests", "2",
                 "--output-json", str(out)]))
            assert rc == 0 and json.loads(out.read_text())["num_conversations"] == 2
            assert "multi-round: 4 of 4 turns sent" in capsys.readouterr().out
    finally:
        engine.shutdown()


def test_throughput_compares_kv_admission_rules_in_one_engine(tmp_path, capsys):
    # A pool of 32 blocks of 4 holds one long request (68 tokens: 17 blocks) at its largest: 'reserve'
    # runs the long ones one after another, 'peak' starts the next while the first is still short.
    path = tmp_path / "mix.csv"
    path.write_text("ContextTokens,GeneratedTokens\n" + "".join(f"{a},{b}\n" for a, b in [(8, 60), (4, 2)] * 6))
    result = run_throughput(model="default", device="cpu", workload=str(path), num_requests=12,
                            warmup_requests=1, compare_kv_admission=True, use_tqdm=False, temperature=0.0,
                            engine_args={"block_size": 4, "num_kv_blocks": 32})
    printed = capsys.readouterr().out
    assert result["variant"] == "kv admission reserve" and result["compare"]["variant"] == "kv admission peak"
    assert result["exact_output_lengths"] and result["compare"]["exact_output_lengths"]
    assert result["compare"]["steps"]["num_steps"] < result["steps"]["num_steps"]
    assert result["compare"]["kv"]["num_preemptions"] == 0
    assert "kv admission reserve / kv admission peak" in printed


def test_compare_kv_admission_is_one_comparison_of_one():
    with pytest.raises(ValueError, match="choose one comparison"):
        run_throughput(model="default", device="cpu", compare_kv_admission=True, compare="overlap-2")
