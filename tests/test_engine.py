"""Engine behaviour end to end on CPU: greedy tokens do not depend on budget, chunking, batch
composition, arrival order or preemption; requests finish, abort and free their KV blocks."""
from __future__ import annotations

import random

import pytest
import torch

from nanoflow import LLM, EngineConfig, SamplingParams
from nanoflow.engine.engine import LLMEngine, QueueFullError
from nanoflow.entrypoints.cli import main as cli_main
from tests.greedy import greedy_tokens
from tests.tiny_checkpoints import make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("engine"))


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(rng.randrange(1, 45))] for _ in range(count)]


def _greedy(ckpt, prompts, **engine_kw) -> list[list[int]]:
    return greedy_tokens(ckpt, prompts, GREEDY.max_tokens, **engine_kw)


def test_same_tokens_for_any_budget_and_batch(ckpt):
    prompts = _prompts(9)
    alone = [_greedy(ckpt, [p])[0] for p in prompts[:3]]
    reference = _greedy(ckpt, prompts, max_num_batched_tokens=512)
    assert reference[:3] == alone
    for budget in (1, 7, 33):  # budget 1: every prompt chunked token by token
        assert _greedy(ckpt, prompts, max_num_batched_tokens=budget) == reference
    assert _greedy(ckpt, prompts, max_num_seqs=2) == reference
    assert _greedy(ckpt, prompts, async_scheduling=False, max_num_batched_tokens=20) == reference
    shuffled = list(range(len(prompts)))
    random.Random(3).shuffle(shuffled)
    out = _greedy(ckpt, [prompts[i] for i in shuffled], max_num_batched_tokens=20)
    assert [out[shuffled.index(i)] for i in range(len(prompts))] == reference


def test_async_and_sync_agree_with_penalties_and_seeds(ckpt):
    """Penalties force synchronous steps inside an async engine; seeded sampling is reproducible."""
    prompts = _prompts(5, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.5, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=11, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=12, max_tokens=8, frequency_penalty=1.0, ignore_eos=True),
              GREEDY, GREEDY]
    runs = []
    for async_scheduling in (True, False):
        llm = LLM(model=str(ckpt), dtype="float32", device="cpu", num_kv_blocks=256,
                  async_scheduling=async_scheduling, max_num_batched_tokens=24)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
    assert runs[0] == runs[1]


def test_same_tokens_under_preemption(ckpt):
    prompts = _prompts(6, seed=1)
    reference = _greedy(ckpt, prompts)
    # 24 blocks of 4 tokens for 6 requests of up to 54 tokens, admitted 3x over: preemption happens.
    llm = LLM(model=str(ckpt), dtype="float32", device="cpu", block_size=4, num_kv_blocks=24,
              kv_admission_ratio=3.0, max_num_batched_tokens=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert llm.engine.kv.pool.num_used == 0


def test_peak_admission_same_tokens_more_requests_at_once(ckpt):
    """kv_admission='peak' changes which requests share a step, never their tokens; with staggered
    lengths it runs more of them at once than 'reserve' (and with exact lengths preempts none)."""
    prompts = _prompts(6, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (4, 30, 6, 28, 8, 26)]
    runs, peaks = [], []
    for admission in ("reserve", "peak"):
        llm = LLM(model=str(ckpt), dtype="float32", device="cpu", block_size=4, num_kv_blocks=40,
                  kv_admission=admission, max_num_batched_tokens=64)
        engine = llm.engine
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), p, sp)
        most, finished = 0, {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.outputs[0].token_ids
            most = max(most, len(engine.scheduler.running))
        assert engine.scheduler.stats.num_preemptions == 0
        assert engine.kv.pool.num_used == 0
        runs.append([finished[str(i)] for i in range(len(prompts))])
        peaks.append(most)
    assert runs[0] == runs[1]
    assert peaks[1] > peaks[0], peaks


def test_abort_frees_blocks_and_stream_outputs(ckpt):
    engine = LLMEngine(EngineConfig(model=str(ckpt), dtype="float32", device="cpu", num_kv_blocks=64))
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [9, 10], SamplingParams(max_tokens=3, ignore_eos=True, n=2))
    seen = []
    for _ in range(3):
        seen += engine.step()
    engine.abort_request("a")
    engine.check_kv_invariant()
    while engine.has_unfinished_requests():
        seen += engine.step()
    final_b = [o for o in seen if o.request_id == "b" and o.finished][-1]
    assert [len(c.token_ids) for c in final_b.outputs] == [3, 3]
    assert all(c.finish_reason == "length" for c in final_b.outputs)
    assert engine.kv.pool.num_used == 0
    engine.check_kv_invariant()


def test_request_validation(ckpt):
    engine = LLMEngine(EngineConfig(model=str(ckpt), dtype="float32", device="cpu", num_kv_blocks=64,
                                    max_model_len=64, max_waiting_requests=1))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("x", [], SamplingParams())
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("x", list(range(10, 80)), SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("x", [10**7], SamplingParams())
    engine.add_request("x", [10, 11], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", [10, 11], SamplingParams())
    with pytest.raises(QueueFullError):
        engine.add_request("y", [10, 11], SamplingParams())
    # max_tokens beyond the context is clamped, and the request ends with "length"
    engine.abort_request("x")
    engine.config.max_waiting_requests = 10
    engine.add_request("z", list(range(10, 60)), SamplingParams(max_tokens=100, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs[-1].outputs[0].token_ids) == 14 and outs[-1].outputs[0].finish_reason == "length"


def test_stop_string_and_eos_through_engine(ckpt):
    llm = LLM(model=str(ckpt), dtype="float32", device="cpu", num_kv_blocks=64)
    tok = llm.get_tokenizer()
    free = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert free.text == tok.decode(free.token_ids, skip_special_tokens=True)
    # Stop at a piece of the text the model produces anyway; the returned text ends before it.
    piece = next(free.text[i:i + 3] for i in range(3, len(free.text) - 2) if free.text[i:i + 3].strip())
    stopped = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=12, stop=[piece]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == piece
    assert stopped.text == free.text[:free.text.find(piece)]
    # A stop token id ends generation at its first occurrence.
    first = free.token_ids[4]
    out = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[first]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[:free.token_ids.index(first) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == first


def test_cli_generate_default_model(capsys):
    assert cli_main(["generate", "Hello", "--max-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Prompt:     'Hello'\nCompletion: ")


def test_fp8_kv_cache_quarter_bytes_and_close_logits(ckpt):
    base = dict(model=str(ckpt), dtype="float32", device="cpu", cpu_kv_cache_gb=0.01, block_size=4)
    full = LLMEngine(EngineConfig(**base), stream_text=False)
    fp8 = LLMEngine(EngineConfig(**base, kv_cache_dtype="fp8"), stream_text=False)
    assert fp8.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert abs(fp8.kv.pool.num_blocks - 4 * full.kv.pool.num_blocks) <= 4  # 1 byte per element, not 4
    prompt = _prompts(1, seed=5)[0] * 3
    logits = []
    for engine in (full, fp8):
        engine.add_request("p", prompt, SamplingParams(max_tokens=1))
        batch = engine.runner.build_batch(engine.scheduler.schedule())
        batch.logits_indices = torch.arange(len(prompt))
        logits.append(engine.runner.forward(batch))
    # e4m3 keeps 3 mantissa bits: logits move a little, the ranking of the top tokens mostly not.
    assert (logits[0] - logits[1]).abs().max() < 0.1 * logits[0].abs().max()
    agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean()
    assert agree > 0.8
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")
