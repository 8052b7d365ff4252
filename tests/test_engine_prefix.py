"""Prefix caching end to end on CPU (tiny checkpoint, fp32): cached and uncached runs give the same
greedy tokens for any budget (chunked prefill across a cached boundary), with n > 1, under
preemption, through the host tier, and across the turns of a conversation; the cache saves prefill."""
from __future__ import annotations

import random
import re

import pytest

from nanoflow import LLM, EngineConfig, SamplingParams
from nanoflow.engine.engine import EngineStats, LLMEngine
from nanoflow.engine_args import engine_config_from_args
from nanoflow.entrypoints.cli import build_parser
from nanoflow.entrypoints.metrics import ServerMetrics
from nanoflow.llm import prefix_grouped_order
from tests.tiny_checkpoints import make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
BASE = dict(dtype="float32", device="cpu", block_size=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("prefix"))


def _shared_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts that share a system prompt (some identical, one a prefix of another, lengths on and
    off block boundaries)."""
    rng = random.Random(seed)
    system = [rng.randrange(10, 500) for _ in range(22)]
    prompts = [system + [rng.randrange(10, 500) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    return prompts + [system[:16], system[:17], system, list(prompts[0]), system + prompts[1][22:] + [7]]


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.check_kv_invariant()
    return [o.outputs[0].token_ids for o in outs]


def _idle_and_clean(llm: LLM) -> None:
    llm.engine.kv.drain()
    llm.engine.check_kv_invariant()
    assert llm.engine.kv.pool.num_used == 0


@pytest.fixture(scope="module")
def reference(ckpt):
    llm = LLM(model=str(ckpt), num_kv_blocks=256, enable_prefix_caching=False, **BASE)
    out = _tokens(llm, _shared_prompts())
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits == 0 and stats.prefill_tokens_computed == stats.prefix_cache_queries
    return out, stats.prefill_tokens_computed


@pytest.mark.parametrize("engine_kw", [
    dict(),
    dict(max_num_batched_tokens=7),          # chunks cut across cached block boundaries
    dict(max_num_batched_tokens=1),          # token by token after the cached prefix
    dict(async_scheduling=False, max_num_batched_tokens=5),
])
def test_cached_runs_give_the_uncached_tokens(ckpt, reference, engine_kw):
    tokens, uncached_prefill = reference
    llm = LLM(model=str(ckpt), num_kv_blocks=256, **BASE, **engine_kw)
    assert _tokens(llm, _shared_prompts()) == tokens  # cold cache: shared within the batch
    cold = llm.engine.stats()
    assert cold.prefix_cache_hits > 0 and cold.prefill_tokens_computed < uncached_prefill
    assert cold.prefill_tokens_computed == uncached_prefill - cold.prefix_cache_hits
    assert _tokens(llm, _shared_prompts()) == tokens  # warm cache: every prompt but its last token
    warm = llm.engine.stats()
    assert warm.prefill_tokens_computed - cold.prefill_tokens_computed <= 4 * len(tokens)
    _idle_and_clean(llm)


def test_n_greater_than_one_computes_the_prompt_once(ckpt):
    prompt = _shared_prompts(1)[0] * 3
    off = LLM(model=str(ckpt), num_kv_blocks=256, enable_prefix_caching=False, **BASE)
    on = LLM(model=str(ckpt), num_kv_blocks=256, **BASE)
    greedy3 = SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True)
    seeded = SamplingParams(n=2, temperature=0.9, seed=5, max_tokens=6, ignore_eos=True)
    for params in (greedy3, seeded):
        ref = [c.token_ids for c in off.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs]
        got = [c.token_ids for c in on.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs]
        assert got == ref
    assert len({tuple(t) for t in ref}) >= 1
    stats = on.engine.stats()
    # First call: the prompt once plus the two other sequences' last partial block; second: only those.
    assert stats.prefill_tokens_computed < len(prompt) + 5 * 4
    _idle_and_clean(on)


def test_same_tokens_under_preemption_and_eviction(ckpt, reference):
    tokens, _ = reference
    llm = LLM(model=str(ckpt), num_kv_blocks=24, kv_admission_ratio=3.0, max_num_batched_tokens=16, **BASE)
    for _ in range(2):
        assert _tokens(llm, _shared_prompts()) == tokens
    assert llm.engine.stats().num_preemptions > 0
    _idle_and_clean(llm)


@pytest.mark.parametrize("num_kv_blocks, budget", [(40, 512), (30, 6)])
def test_host_tier_hits_copy_back_the_same_kv(ckpt, reference, num_kv_blocks, budget):
    tokens, _ = reference
    llm = LLM(model=str(ckpt), num_kv_blocks=num_kv_blocks, kv_host_gb=0.0002, kv_admission_ratio=2.0,
              max_num_batched_tokens=budget, **BASE)
    assert llm.engine.kv.host is not None and llm.engine.stats().kv_host_blocks_total > 0
    for _ in range(3):
        assert _tokens(llm, _shared_prompts()) == tokens
    stats = llm.engine.stats()
    assert stats.prefix_cache_host_hits > 0 and stats.kv_host_blocks_loaded > 0 and stats.kv_host_blocks_saved > 0
    _idle_and_clean(llm)


def test_conversation_turns_reuse_prompt_and_answer(ckpt):
    """Turn 2 carries turn 1's prompt and answer: all of it is cached but the answer's last token,
    whose KV was never computed (it was sampled, not fed back)."""
    prompt1 = _shared_prompts(2)[0]
    off = LLM(model=str(ckpt), num_kv_blocks=256, enable_prefix_caching=False, **BASE)
    on = LLM(model=str(ckpt), num_kv_blocks=256, **BASE)
    answer = _tokens(on, [prompt1])[0]
    assert answer == _tokens(off, [prompt1])[0]
    prompt2 = prompt1 + answer + [33, 34, 35]
    before = on.engine.stats()
    assert _tokens(on, [prompt2]) == _tokens(off, [prompt2])
    after = on.engine.stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits == (len(prompt1) + len(answer) - 1) // 4 * 4
    _idle_and_clean(on)


def test_abort_mid_prefill_releases_claims_and_blocks(ckpt):
    engine = LLMEngine(EngineConfig(model=str(ckpt), num_kv_blocks=64, max_num_batched_tokens=4, **BASE))
    prompt = _shared_prompts(3)[0]
    engine.add_request("a", prompt, GREEDY)
    engine.add_request("b", prompt, GREEDY)  # waits for a's blocks
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["a"]
    engine.abort_request("a")
    engine.check_kv_invariant()
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_kv_invariant()
    assert engine.kv.pool.num_used == 0


def test_prefix_grouped_order_groups_shared_prefixes():
    prompts = [[5, 1, 2], "b text", [3, 9], [5, 1, 1], "a text", [3, 9, 9]]
    order = prefix_grouped_order(prompts)
    assert [prompts[i] for i in order] == [[3, 9], [3, 9, 9], [5, 1, 1], [5, 1, 2], "a text", "b text"]


def test_config_and_cli_flags():
    cfg = engine_config_from_args(build_parser().parse_args(
        ["generate", "x", "--no-enable-prefix-caching", "--device", "cpu"]))
    assert cfg.enable_prefix_caching is False and EngineConfig().enable_prefix_caching is True
    cfg = engine_config_from_args(build_parser().parse_args(["generate", "x", "--kv-host-gb", "2.5"]))
    assert cfg.kv_host_gb == 2.5
    with pytest.raises(ValueError, match="kv_host_gb"):
        EngineConfig(kv_host_gb=-1)
    with pytest.raises(ValueError, match="prefix caching"):
        EngineConfig(kv_host_gb=1, enable_prefix_caching=False)


def test_prometheus_counters_in_tokens():
    stats = EngineStats(num_running=1, num_waiting=0, kv_blocks_used=3, kv_blocks_total=10,
                        last_step_time_s=0.0, num_steps=1, prefix_cache_queries=120, prefix_cache_hits=96)
    text = ServerMetrics("m", lambda: stats).render().decode()
    assert 'nanoflow:prefix_cache_queries_total{model_name="m"} 120.0' in text
    assert 'nanoflow:prefix_cache_hits_total{model_name="m"} 96.0' in text
    assert re.search(r"# TYPE nanoflow:prefix_cache_hits(_total)? counter", text)
    assert 'nanoflow:kv_host_cache_usage_perc{model_name="m"} 0.0' in text  # no host tier: no division by 0


def test_prometheus_host_and_disk_tier_metrics():
    stats = EngineStats(num_running=1, num_waiting=0, kv_blocks_used=3, kv_blocks_total=10,
                        last_step_time_s=0.0, num_steps=1, prefix_cache_queries=120, prefix_cache_hits=96,
                        prefix_cache_host_hits=32, prefix_cache_disk_hits=16, kv_host_blocks_used=3,
                        kv_host_blocks_total=4, kv_host_blocks_saved=7, kv_host_blocks_loaded=5,
                        kv_disk_blocks_used=1, kv_disk_blocks_total=8, kv_disk_blocks_written=2, kv_disk_blocks_read=1)
    text = ServerMetrics("m", lambda: stats).render().decode()
    for name, value in [("prefix_cache_host_hits_total", 32), ("prefix_cache_disk_hits_total", 16),
                        ("kv_host_blocks_saved_total", 7), ("kv_host_blocks_loaded_total", 5),
                        ("kv_disk_blocks_written_total", 2), ("kv_disk_blocks_read_total", 1),
                        ("kv_host_cache_usage_perc", 0.75), ("kv_disk_cache_usage_perc", 0.125)]:
        assert f'nanoflow:{name}{{model_name="m"}} {float(value)}' in text, name


def test_offline_batch_computes_each_shared_prefix_once(ckpt):
    """Three system prompts, requests interleaved: each system prompt is computed once, by the first
    request of its group; the others of the group (admitted in the same call) wait for it and reuse it."""
    rng = random.Random(4)
    systems = [[rng.randrange(10, 500) for _ in range(24)] for _ in range(3)]
    prompts = [systems[i % 3] + [rng.randrange(10, 500) for _ in range(5)] for i in range(9)]
    llm = LLM(model=str(ckpt), num_kv_blocks=256, **BASE)
    off = LLM(model=str(ckpt), num_kv_blocks=256, enable_prefix_caching=False, **BASE)
    assert _tokens(llm, prompts) == _tokens(off, prompts)
    assert llm.engine.stats().prefill_tokens_computed == 3 * 29 + 6 * 5
    _idle_and_clean(llm)
