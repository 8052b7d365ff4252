"""Tensor parallelism over NCCL (skipped without 2 GPUs): TP=2 greedy tokens equal TP=1's on fp32
tiny checkpoints (Llama GQA; Mistral with one KV head, replicated over the ranks; Mixtral, experts
split), sequential, under the TP plan (tp-nano-4) and under a dense plan folded onto the TP layer
(overlap-2). CI checks the same over gloo on CPU (tests/test_tensor_parallel.py).
(The token checks of benchmarks/tp_gpu_check.py; the step timings on the 70B preset stay there.)"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")

ENGINE = dict(device="cuda", dtype="float32", num_kv_blocks=512, max_num_batched_tokens=64,
              gpu_memory_utilization=0.5)
PLANS = ("sequential", "tp-nano-4", "overlap-2")


def _tokens(llm, prompts) -> list[list[int]]:
    from nanoflow import SamplingParams
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("name", ["llama-gqa", "mistral", "mixtral"])
def test_tp2_equals_tp1(name, tmp_path):
    from nanoflow import LLM
    from tests.tiny_checkpoints import make_checkpoint
    path = str(make_checkpoint(name, tmp_path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 4000, (int(n),), generator=g).tolist() for n in (3, 17, 70, 150)]
    tp1 = LLM(model=path, **ENGINE)
    want = _tokens(tp1, prompts)
    tp1.engine.shutdown()
    llm = LLM(model=path, tensor_parallel_size=2, **ENGINE)
    try:
        for plan in PLANS:
            llm.set_plan(plan)
            assert _tokens(llm, prompts) == want, f"TP=2 under {plan} differs from TP=1"
    finally:
        llm.engine.shutdown()
