"""The Triton kernels (TRITON_INTERPRET=1 without a GPU) on the Qwen models: the q/k norm of
rope_kv_write in place on the strided qkv heads, and whole greedy runs of tiny Qwen3 / Qwen3-MoE /
Qwen2-MoE checkpoints giving the reference kernels' tokens and logits."""
from __future__ import annotations

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from nanoflow import EngineConfig
from nanoflow.models.loader import load_model
from tests.greedy import greedy_tokens
from tests.test_model_parity import LOGITS_ATOL, _all_position_logits, _engine
from tests.test_qwen import expected_rope_outputs, rope_op_outputs
from tests.tiny_checkpoints import make_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_triton")
    return {name: make_checkpoint(name, root, num_layers=1) for name in ("qwen3", "qwen3-moe", "qwen2-moe")}


def test_triton_rope_kv_write_normalises_the_heads_in_place(ckpts):
    model, _ = load_model(EngineConfig(model=str(ckpts["qwen3"]), use_triton="on"), CPU, torch.float32)
    assert model.kernels.name == "triton"
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, model.layers[0].qkv_weight.shape[0], generator=g) * 2
    positions = torch.tensor([0, 3, 4, 17, 60, 200])
    for got, want in zip(rope_op_outputs(model, positions, qkv), expected_rope_outputs(model, positions, qkv)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3", "qwen3-moe", "qwen2-moe"])
def test_triton_greedy_tokens_equal_the_reference_kernels(ckpts, name):
    prompts = [[11, 12, 400, 13], list(range(30, 49)), [7]]
    kw = dict(max_num_batched_tokens=16)
    reference = greedy_tokens(ckpts[name], prompts, 4, use_triton="off", **kw)
    assert greedy_tokens(ckpts[name], prompts, 4, use_triton="on", **kw) == reference
    prompt = list(range(100, 123))  # every position's logits of one prefill, fp32: the parity bound
    ours = _all_position_logits(_engine(ckpts[name], use_triton="on"), prompt)
    ref = _all_position_logits(_engine(ckpts[name], use_triton="off"), prompt)
    assert (ours - ref).abs().max().item() < LOGITS_ATOL


def test_triton_moe_op_with_an_sm_budget_gives_the_same_tokens(ckpts, tmp_path):
    """The moe op cut into nano-batches on an SM budget: the grouped GEMM and the shared expert's
    GEMMs on the persistent kernels (that many programs) give the sequential tokens."""
    import json
    from nanoflow.pipeline.plan import load_plan
    d = load_plan("overlap-2").to_dict()
    for op in ("gate_up_gemm", "act", "down_gemm"):
        d["ops"].pop(op)
    d["ops"]["moe"] = {"stream": "compute", "cuts": [{"of": "tokens", "at": 0.5}], "sm_budget": 3}
    d.pop("order")
    d["min_attn_share"] = 0.0
    plan = tmp_path / "moe-budget.json"
    plan.write_text(json.dumps(d))
    prompts = [[11, 12, 400, 13], list(range(30, 45))]
    reference = greedy_tokens(ckpts["qwen2-moe"], prompts, 3, use_triton="off", max_num_batched_tokens=16)
    got = greedy_tokens(ckpts["qwen2-moe"], prompts, 3, use_triton="on", max_num_batched_tokens=16, plan=str(plan))
    assert got == reference
