"""The grouped MoE GEMM on a GPU (skipped without CUDA) in bf16, which the interpreter tests cannot cover
on the TMA path: the pointer kernels and the TMA path against the torch reference (rel err < 1e-2),
bit-equal under an SM budget; the fused expert sort bit-equal to the torch sort through the whole op.
Mixtral's expert shapes with 4 of its 8 experts (weights ~1 GB)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HIDDEN, INTER, EXPERTS, TOP_K = 4096, 14336, 4, 2
DEV, DT, TOL = "cuda", torch.bfloat16, 1e-2


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator(device=DEV).manual_seed(0)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=DEV, generator=g) * HIDDEN ** -0.5).to(DT)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, device=DEV, generator=g) * INTER ** -0.5).to(DT)
    return w13, w2


def problem(tokens: int, skewed: bool):
    from nanoflow.kernels import moe_reference as ref
    g = torch.Generator(device=DEV).manual_seed(tokens)
    x = torch.randn(tokens, HIDDEN, device=DEV, generator=g).to(DT)
    logits = torch.randn(tokens, EXPERTS, device=DEV, generator=g)
    if skewed:
        logits[:, 0] = -1e4  # an expert with no token
    w, ids = ref.route(logits, TOP_K)
    return x, w, ids


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("tokens, skewed", [(7, False), (300, True), (1500, False)])
def test_grouped_gemm_paths_match_the_reference(weights, tokens, skewed, tma):
    from nanoflow.kernels import moe_gemm as mg
    from nanoflow.kernels import moe_reference as ref
    if tma and (not mg.moe_gemm_tma.available() or torch.cuda.get_device_capability()[0] < 9):
        pytest.skip("the TMA path needs sm_90+ and triton tensor descriptors")
    w13, w2 = weights
    x, w, ids = problem(tokens, skewed)
    configs = tuple(dataclasses.replace(c, tma=tma) for c in mg.choose_configs(tokens * TOP_K / EXPERTS))
    got = mg.moe_experts(x, w, ids, w13, w2, configs=configs)
    err = rel(got, ref.moe_experts(x, w, ids, w13, w2))
    assert err < TOL, f"rel err {err:.2e}"
    assert torch.equal(mg.moe_experts(x, w, ids, w13, w2, configs=configs, sm_budget=40), got)


@pytest.mark.parametrize("tokens", [5, 700])
def test_fused_sort_gives_the_same_bits_as_the_torch_sort(weights, tokens):
    from nanoflow.kernels import moe_gemm as mg
    from nanoflow.kernels import moe_reference as ref
    w13, w2 = weights
    x, w, ids = problem(tokens, False)
    up, down = (dataclasses.replace(c, tma=False) for c in mg.choose_configs(tokens * TOP_K / EXPERTS))
    fused = mg.moe_experts(x, w, ids, w13, w2, configs=(up, down))
    sorted_ids, block_expert = ref.moe_align(ids, EXPERTS, up.block_m)
    h = mg.grouped_gate_up_silu(x, w13, sorted_ids, block_expert, TOP_K, mg.fit_shared_memory(up, 2, 2))
    y = mg.grouped_down(h, w2, sorted_ids, block_expert, tokens * TOP_K, mg.fit_shared_memory(down, 2, 1))
    assert torch.equal(mg.combine(y, w, torch.empty_like(x)), fused)
