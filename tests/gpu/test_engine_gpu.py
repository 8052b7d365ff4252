"""The engine on a GPU (skipped without CUDA), fp32 tiny checkpoints (Llama GQA, Qwen2):
- greedy tokens of the Triton kernels equal those of the torch reference path;
- every built-in plan (overlap-2, nano-4, overlap-split on a green-context SM split, each on every
  step) gives eager sequential's tokens, and Qwen2 under overlap-2 in CUDA graphs too (Llama's graph
  forms of every plan: test_graphs_gpu.py);
- llama-3-8b with dummy weights starts with CUDA graphs and generates exactly the tokens asked for.
(Formerly benchmarks/gpu_engine_check.py.)"""
from __future__ import annotations

import gc

import pytest
import torch

from tests.greedy import greedy_tokens, plan_on_every_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ENGINE = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=512, max_num_batched_tokens=64,
              gpu_memory_utilization=0.5, enforce_eager=True)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from tests.tiny_checkpoints import make_checkpoint
    root = tmp_path_factory.mktemp("engine_gpu")
    return {name: make_checkpoint(name, root) for name in ("llama-gqa", "qwen2")}


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 4000, (int(n),), generator=g).tolist() for n in (3, 17, 70, 150)]


@pytest.fixture(scope="module")
def sequential(ckpts, prompts):
    """Eager sequential tokens on the Triton path, per checkpoint."""
    return {name: greedy_tokens(path, prompts, MAX_TOKENS, use_triton="on", **ENGINE) for name, path in ckpts.items()}


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_triton_path_equals_torch_path(ckpts, prompts, sequential, name):
    torch_path = greedy_tokens(ckpts[name], prompts, MAX_TOKENS, use_triton="off", **ENGINE)
    assert sequential[name] == torch_path


@pytest.mark.parametrize("plan", ["overlap-2", "nano-4", "overlap-split"])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_plans_equal_sequential(ckpts, prompts, sequential, name, plan, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path / "no-profile"))  # no tuned plan choice
    got = greedy_tokens(ckpts[name], prompts, MAX_TOKENS, use_triton="on",
                        **{**ENGINE, "plan": plan_on_every_step(plan, tmp_path)})
    assert got == sequential[name]


def test_qwen2_overlap_in_cuda_graphs_equals_sequential(ckpts, prompts, sequential, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path / "no-profile"))
    got = greedy_tokens(ckpts["qwen2"], prompts, MAX_TOKENS, use_triton="on",
                        **{**ENGINE, "enforce_eager": False, "plan": plan_on_every_step("overlap-2", tmp_path)})
    assert got == sequential["qwen2"]


def test_llama_3_8b_dummy_generates_with_graphs():
    from nanoflow import LLM, SamplingParams
    gc.collect()  # the tiny engines of earlier tests: their KV caches go before the 8B sizes its own
    torch.cuda.empty_cache()
    llm = LLM(model="llama-3-8b", load_format="dummy")  # CUDA graphs captured at start-up
    try:
        outs = llm.generate([{"prompt_token_ids": list(range(100, 100 + n))} for n in (5, 300, 1000)],
                            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [32, 32, 32]
        vocab = llm.model_config.vocab_size
        assert all(0 <= t < vocab for o in outs for t in o.outputs[0].token_ids)
        llm.engine.check_kv_invariant()
    finally:
        llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache()
