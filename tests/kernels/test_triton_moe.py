"""The Triton grouped MoE GEMM against the torch reference (interpreter on CPU, small shapes): uneven
expert loads, experts with no tokens, one expert taking every token, ragged N / K, SM budgets, out=."""
import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import DEVICE, TOLERANCES, randn

from nanoflow.kernels import moe_gemm as mg
from nanoflow.kernels import moe_reference as ref

# Small tiles keep the interpreter fast; group_m=2 so the grouped order has several groups.
SMALL = mg.MoeGemmConfig(16, 16, 16, group_m=2, num_warps=4, num_stages=2)
WIDE_K = mg.MoeGemmConfig(16, 32, 32, group_m=1, num_warps=4, num_stages=2)
# The TMA path (moe_gemm_tma): persistent programs, descriptor loads that clip at the operands' edges.
# Tested in fp32 / fp16 only: the interpreter's descriptor loads misread bf16 (Triton 3.9; the dense
# TMA GEMM of gemm_persistent shows the same), so bf16 is checked on the GPU (benchmarks/moe_gpu.py).
SMALL_TMA = mg.MoeGemmConfig(16, 16, 16, group_m=2, num_warps=4, num_stages=2, tma=True)
WIDE_TMA = mg.MoeGemmConfig(16, 32, 32, group_m=1, num_warps=4, num_stages=2, tma=True)


def _weights(gen, experts, hidden, inter, dtype):
    # scaled so outputs stay O(1) in fp16
    w13 = (randn(gen, experts, 2 * inter, hidden) * hidden ** -0.5).to(dtype)
    w2 = (randn(gen, experts, hidden, inter) * inter ** -0.5).to(dtype)
    return w13, w2


def _routing(gen, tokens, experts, top_k, skew: str):
    logits = randn(gen, tokens, experts)
    if skew == "zero-experts":          # experts 0 and the last never chosen
        logits[:, 0] = logits[:, -1] = -1e4
    elif skew == "one-hot":             # every token's first choice is expert 1
        logits[:, 1] = 1e4
    elif skew == "uneven":              # expert 2 gets most tokens
        logits[: tokens * 3 // 4, 2] += 5.0
    return ref.route(logits, top_k)


def check(x, w, ids, w13, w2, configs=(SMALL, SMALL), sm_budget=None, out=None):
    got = mg.moe_experts(x, w, ids, w13, w2, configs=configs, sm_budget=sm_budget, out=out)
    want = ref.moe_experts(x.cpu(), w.cpu(), ids.cpu(), w13.cpu(), w2.cpu())
    torch.testing.assert_close(got.cpu(), want, **TOLERANCES[x.dtype])
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("skew", ["uniform", "zero-experts", "one-hot", "uneven"])
def test_grouped_gemm_matches_reference(gen, dtype, skew):
    tokens, hidden, inter, experts, top_k = 21, 48, 40, 6, 2   # N and K not multiples of the tiles
    x = randn(gen, tokens, hidden).to(dtype)
    w13, w2 = _weights(gen, experts, hidden, inter, dtype)
    w, ids = _routing(gen, tokens, experts, top_k, skew)
    counts = torch.bincount(ids.flatten().cpu(), minlength=experts)
    if skew == "zero-experts":
        assert counts[0] == counts[-1] == 0
    check(x, w, ids, w13, w2)


@pytest.mark.parametrize("tokens, top_k, configs", [(1, 2, (SMALL, SMALL)), (2, 1, (SMALL, WIDE_K)),
                                                     (33, 3, (WIDE_K, SMALL)), (40, 2, (WIDE_K, WIDE_K))])
def test_token_counts_top_k_and_configs(gen, tokens, top_k, configs):
    hidden, inter, experts = 64, 32, 5
    x = randn(gen, tokens, hidden)
    w13, w2 = _weights(gen, experts, hidden, inter, torch.float32)
    w, ids = _routing(gen, tokens, experts, top_k, "uneven")
    check(x, w, ids, w13, w2, configs=configs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("skew", ["uniform", "zero-experts", "one-hot"])
@pytest.mark.parametrize("configs", [(SMALL_TMA, SMALL_TMA), (WIDE_TMA, SMALL_TMA), (SMALL, WIDE_TMA)])
def test_tma_path_matches_reference(gen, dtype, skew, configs):
    """N = 40 and K = 48 are not multiples of the tiles: a tile past an expert's last weight row reads
    the next expert's rows (or zeros past the last), which must land only in clipped columns."""
    tokens, hidden, inter, experts, top_k = 21, 48, 40, 6, 2
    x = randn(gen, tokens, hidden).to(dtype)
    w13, w2 = _weights(gen, experts, hidden, inter, dtype)
    w, ids = _routing(gen, tokens, experts, top_k, skew)
    check(x, w, ids, w13, w2, configs=configs)


@pytest.mark.parametrize("sm_budget", [1, 3, 1000])
def test_tma_path_is_the_same_on_any_sm_budget(gen, sm_budget):
    tokens, hidden, inter, experts = 19, 32, 24, 4
    x = randn(gen, tokens, hidden, dtype=torch.float16)
    w13, w2 = _weights(gen, experts, hidden, inter, torch.float16)
    w, ids = _routing(gen, tokens, experts, 2, "uneven")
    whole = mg.moe_experts(x, w, ids, w13, w2, configs=(SMALL_TMA, SMALL_TMA))
    got = check(x, w, ids, w13, w2, configs=(SMALL_TMA, SMALL_TMA), sm_budget=sm_budget)
    assert torch.equal(got, whole)


def test_tma_path_is_chosen_by_config_or_environment(gen, monkeypatch):
    x = randn(gen, 4, 32)
    w13, _ = _weights(gen, 2, 32, 16, torch.float32)
    assert mg.use_tma(SMALL_TMA, x, w13)
    assert not mg.use_tma(mg.MoeGemmConfig(16, 16, 16, tma=False), x, w13)
    monkeypatch.delenv("NANOFLOW_MOE_TMA", raising=False)
    assert not mg.use_tma(SMALL, x, w13)  # off by default until measured on the GPU
    monkeypatch.setenv("NANOFLOW_MOE_TMA", "1")
    # tma=None takes it only on an sm_90+ GPU, never in the interpreter
    assert mg.use_tma(SMALL, x, w13) == (DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] >= 9)
    with pytest.raises(ValueError, match="16-byte aligned"):
        mg.use_tma(SMALL_TMA, randn(gen, 4, 33)[:, :32], w13)


@pytest.mark.parametrize("sm_budget", [1, 3, 1000])
def test_sm_budget_is_a_persistent_grid_with_the_same_result(gen, sm_budget):
    tokens, hidden, inter, experts = 19, 32, 24, 4
    x = randn(gen, tokens, hidden, dtype=torch.float16)
    w13, w2 = _weights(gen, experts, hidden, inter, torch.float16)
    w, ids = _routing(gen, tokens, experts, 2, "uneven")
    unbudgeted = mg.moe_experts(x, w, ids, w13, w2, configs=(SMALL, SMALL))
    got = check(x, w, ids, w13, w2, sm_budget=sm_budget)
    assert torch.equal(got, unbudgeted)  # same tiles, same sums: only the program count differs


def test_out_row_slice_and_strided_input(gen):
    """x and out are row slices of bigger buffers (as the step workspace gives them): neighbours untouched."""
    tokens, hidden, inter, experts = 12, 32, 16, 4
    big = randn(gen, tokens + 6, hidden)
    x = big[3:3 + tokens]
    w13, w2 = _weights(gen, experts, hidden, inter, torch.float32)
    w, ids = _routing(gen, tokens, experts, 2, "uniform")
    buf = torch.full((tokens + 8, hidden), float("nan"), device=DEVICE)
    out = buf[4:4 + tokens]
    got = check(x, w, ids, w13, w2, out=out)
    assert got is out and buf[:4].isnan().all() and buf[4 + tokens:].isnan().all()


def test_no_tokens_and_bad_arguments(gen):
    w13, w2 = _weights(gen, 4, 16, 8, torch.float32)
    x = randn(gen, 0, 16)
    empty = mg.moe_experts(x, torch.zeros(0, 2, device=DEVICE), torch.zeros(0, 2, dtype=torch.long, device=DEVICE),
                           w13, w2)
    assert empty.shape == (0, 16)
    x = randn(gen, 3, 16)
    w, ids = _routing(gen, 3, 4, 2, "uniform")
    with pytest.raises(ValueError, match="do not fit hidden size"):
        mg.moe_experts(randn(gen, 3, 12), w, ids, w13, w2)
    with pytest.raises(ValueError, match="share block_m"):
        mg.moe_experts(x, w, ids, w13, w2, configs=(SMALL, mg.MoeGemmConfig(32, 16, 16)))
    with pytest.raises(ValueError, match="sm_budget"):
        mg.moe_experts(x, w, ids, w13, w2, sm_budget=0)
    with pytest.raises(ValueError, match="topk_ids / topk_weights"):
        mg.moe_experts(x, w[:2], ids, w13, w2)
    with pytest.raises(ValueError, match="power of two"):
        mg.MoeGemmConfig(block_m=24)


def test_default_configs_agree_on_block_m():
    for rows in (1, 8, 16, 17, 48, 200, 512, 513, 4096):
        up, down = mg.choose_configs(rows)
        assert up.block_m == down.block_m
    assert mg.choose_configs(2)[0].block_m < mg.choose_configs(2048)[0].block_m


def test_the_moe_op_dispatches_to_the_grouped_gemm(gen):
    """The model's `moe` op on the Triton kernel set equals it on the references, for a nano-batch."""
    import dataclasses

    from nanoflow.kernels import REFERENCE_KERNELS, select_kernels
    from nanoflow.models.llama import StepState
    from nanoflow.models.loader import init_dummy_weights
    from nanoflow.models.mixtral import MixtralForCausalLM
    from nanoflow.models.presets import PRESETS

    cfg = dataclasses.replace(PRESETS["mixtral-8x7b"], vocab_size=64, hidden_size=32, intermediate_size=24,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=4)
    normed = randn(gen, 16, 32)
    results = []
    for kernels in (select_kernels("on", DEVICE), REFERENCE_KERNELS):
        model = MixtralForCausalLM(cfg, torch.float32, DEVICE, kernels=kernels)
        init_dummy_weights(model, seed=1)  # the same weights for both kernel sets
        ws = model.new_workspace(16)
        ws.normed.copy_(normed)
        op = model.layers[0].ops[-1]
        ws.hidden.fill_(float("nan"))
        op.fn(StepState(None, ws, []), 3, 13)
        results.append(ws.hidden.clone())
    assert results[0][:3].isnan().all() and results[0][13:].isnan().all()
    torch.testing.assert_close(results[0][3:13], results[1][3:13], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("config", mg.CANDIDATES)
@pytest.mark.parametrize("element_bytes,weight_tiles", [(2, 2), (2, 1), (4, 2), (4, 1)])
def test_fit_shared_memory_keeps_tiles_within_the_limit(config, element_bytes, weight_tiles):
    """fp32 doubles a tile's bytes: the fitted config's stages fit (the fp32 tiny Mixtral once failed
    on an H100 with 240 KB asked of 227), block_m stays (gate_up and down must agree), and a config that
    already fits is returned unchanged (bf16 at real shapes keeps its measured tiles)."""
    fitted = mg.fit_shared_memory(config, element_bytes, weight_tiles)
    stage = (fitted.block_m + weight_tiles * fitted.block_n) * fitted.block_k * element_bytes
    assert fitted.num_stages * stage <= mg.SHARED_MEMORY_LIMIT - 16384
    assert (fitted.block_m, fitted.block_n) == (config.block_m, config.block_n)
    before = (config.block_m + weight_tiles * config.block_n) * config.block_k * element_bytes
    if config.num_stages * before <= mg.SHARED_MEMORY_LIMIT - 16384:
        assert fitted == config
    else:
        assert fitted != config and fitted.num_stages >= 2


def test_fit_shared_memory_of_the_failing_fp32_tile():
    tile = mg.MoeGemmConfig(16, 64, 128, num_warps=4, num_stages=4)
    assert mg.fit_shared_memory(tile, 4, 2) == mg.MoeGemmConfig(16, 64, 128, num_warps=4, num_stages=2)
    assert mg.fit_shared_memory(tile, 2, 2) == tile
