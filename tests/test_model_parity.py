"""Logits and greedy tokens equal transformers' on tiny random checkpoints (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch
import transformers

from nanoflow import LLM, EngineConfig, SamplingParams
from nanoflow.engine.engine import LLMEngine
from tests.tiny_checkpoints import TINY_CONFIGS, make_checkpoint

# fp32 on CPU: our kernels and transformers' differ only in summation order.
LOGITS_ATOL = 2e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(name, root) for name in TINY_CONFIGS}


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n,), generator=g).tolist()


def _engine(path, **kw) -> LLMEngine:
    cfg = dict(model=str(path), dtype="float32", device="cpu", num_kv_blocks=128, block_size=8)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), stream_text=False)


def _all_position_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """Prefill the whole prompt in one step and return the logits of every position."""
    engine.add_request("p", prompt, SamplingParams(max_tokens=1))
    sched = engine.scheduler.schedule()
    batch = engine.runner.build_batch(sched)
    batch.logits_indices = torch.arange(len(prompt))
    return engine.runner.forward(batch)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_match_transformers(checkpoints, name):
    path = checkpoints[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    engine = _engine(path)
    prompt = _prompt(37, seed=1, vocab=engine.model_config.vocab_size)
    ours = _all_position_logits(engine, prompt)
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < LOGITS_ATOL


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_generation_matches_transformers(checkpoints, name):
    path = checkpoints[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    llm = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=128, block_size=8,
              max_num_batched_tokens=16)  # small budget: prompts are chunked across steps
    vocab = llm.model_config.vocab_size
    prompts = [_prompt(n, seed=n, vocab=vocab) for n in (5, 23, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()
        assert out.outputs[0].finish_reason == "length"
