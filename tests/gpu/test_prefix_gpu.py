"""Prefix caching and the host KV tier on a GPU (skipped without CUDA), fp32 tiny Llama (GQA):
greedy tokens with caching on equal caching off, cold and warm (the same prompts again), with a
small device cache and a host tier (copies on the copy stream, ordered by events; the run must
really load blocks back), with CUDA graphs and with sync scheduling; a 3-turn conversation with
caching and the host tier equals caching off; the host tier's copies round-trip KV bytes exactly.
(Formerly benchmarks/prefix_gpu_check.py; its copy bandwidth is benchmarks/host_tier_bandwidth.py.)"""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ENGINE = dict(device="cuda", dtype="float32", use_triton="on", block_size=16, num_kv_blocks=512,
              max_num_batched_tokens=128, gpu_memory_utilization=0.5, enforce_eager=True)


def shared_prompts(seed: int = 0) -> list[list[int]]:
    """12 prompts behind one 150-token system prompt, plus a prefix of it, all of it, and a repeat."""
    rng = random.Random(seed)
    system = [rng.randrange(10, 4000) for _ in range(150)]
    prompts = [system + [rng.randrange(10, 4000) for _ in range(rng.randrange(1, 60))] for _ in range(12)]
    return prompts + [system[:64], system, list(prompts[0])]


def _greedy():
    from nanoflow import SamplingParams
    return SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _rounds(path, rounds: int, **kw):
    """Tokens of `rounds` generate calls of the same prompts on one engine, and the engine's stats."""
    from nanoflow import LLM
    llm = LLM(model=str(path), **{**ENGINE, **kw})
    outs = []
    for _ in range(rounds):
        res = llm.generate([{"prompt_token_ids": p} for p in shared_prompts()], _greedy(), use_tqdm=False)
        outs.append([list(o.outputs[0].token_ids) for o in res])
    llm.engine.kv.drain()
    llm.engine.check_kv_invariant()
    stats = llm.engine.stats()
    llm.engine.shutdown()
    return outs, stats


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.tiny_checkpoints import make_checkpoint
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("prefix_gpu"))


@pytest.fixture(scope="module")
def caching_off(ckpt):
    return _rounds(ckpt, 1, enable_prefix_caching=False)[0][0]


VARIANTS = {
    "caching": dict(),
    "host-tier": dict(num_kv_blocks=48, kv_host_gb=0.05, kv_admission_ratio=2.0),
    "graphs": dict(enforce_eager=False),
    "sync": dict(async_scheduling=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefix_caching_same_tokens(ckpt, caching_off, variant):
    (cold, warm), stats = _rounds(ckpt, 2, **VARIANTS[variant])
    assert cold == caching_off
    assert warm == caching_off
    assert stats.prefix_cache_hits > 0
    if variant == "host-tier":  # the small device cache must have pushed blocks out and read them back
        assert stats.kv_host_blocks_saved > 0 and stats.kv_host_blocks_loaded > 0, stats


def _conversation(path, **kw) -> list[list[int]]:
    from nanoflow import LLM
    llm = LLM(model=str(path), **{**ENGINE, **kw})
    prompt, answers = shared_prompts(1)[0], []
    for turn in range(3):
        answer = list(llm.generate({"prompt_token_ids": prompt}, _greedy(), use_tqdm=False)[0].outputs[0].token_ids)
        answers.append(answer)
        prompt = prompt + answer + [11 + turn] * 20
    llm.engine.shutdown()
    return answers


def test_conversation_with_host_tier_equals_caching_off(ckpt):
    off = _conversation(ckpt, enable_prefix_caching=False)
    on = _conversation(ckpt, kv_host_gb=0.05, num_kv_blocks=64)
    assert on == off


def test_host_tier_round_trip_is_bytewise_exact():
    """Save 256 blocks into shuffled host slots on the copy stream, wipe them on the device, load
    them back into other blocks: the bytes arrive unchanged (any bf16 bit pattern, NaNs included)."""
    from nanoflow.engine.kv_host_tier import HostKVTier
    kv = torch.empty((4, 2, 600, 16, 8, 128), dtype=torch.bfloat16, device="cuda")
    kv.view(torch.uint8).random_(0, 256)
    tier = HostKVTier(kv, 300)
    try:
        rng = random.Random(0)
        blocks = rng.sample(range(300), 256)
        slots = rng.sample(range(300), 256)
        before = kv[:, :, blocks].clone()
        tier.save(blocks, slots).wait()
        kv[:, :, blocks] = 0
        targets = [300 + b for b in blocks]
        tier.load(slots, targets)
        torch.cuda.synchronize()
        assert torch.equal(kv[:, :, targets].view(torch.uint8), before.view(torch.uint8))
        assert not kv[:, :, blocks].view(torch.uint8).any()  # the wiped blocks were not written
    finally:
        tier.close()
