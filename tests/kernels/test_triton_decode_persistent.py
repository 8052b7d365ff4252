import os

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import DEVICE, FP8, TOLERANCES, attention_dtypes, make_paged_cache, randn

from nanoflow.kernels import decode_attention_persistent as dap
from nanoflow.kernels import reference

# Ragged contexts: 1 token, partial first block, exact block multiples, several blocks + partial.
SEQ_LENS = [1, 7, 16, 33, 70, 128]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def small(variant, tile_n=16, heads_per_item=None):
    return dap.PersistentDecodeConfig(tile_n=tile_n, heads_per_item=heads_per_item, num_warps=4,
                                      num_stages=2, variant=variant)


def run_case(gen, *, hq, hk, head_dim=32, block_size=16, dtype=torch.float32, seq_lens=SEQ_LENS,
             num_programs=4, config=None, cache_dtype=None):
    """config None: default_config(...). cache_dtype None: q's; FP8: the reference reads the same
    fp8 cache."""
    k_cache, v_cache, table = make_paged_cache(gen, seq_lens, block_size, hk, head_dim,
                                               cache_dtype or dtype)
    q = randn(gen, len(seq_lens), hq, head_dim, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))  # every row must be written
    got = dap.paged_decode_attention(q, k_cache, v_cache, table, lens, scale, out=out,
                                     num_programs=num_programs, config=config)
    assert got is out
    want = reference.paged_decode_attention(q, k_cache, v_cache, table, lens, scale)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("variant", dap.VARIANTS)
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (8, 2)])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("heads_per_item", [1, None])     # one KV head per item, all KV heads
def test_gqa_and_heads_per_item(gen, variant, hq, hk, heads_per_item):
    run_case(gen, hq=hq, hk=hk, config=small(variant, heads_per_item=heads_per_item))


# 1 program: one range cut nowhere. 3 / 7: cuts inside items (partials + merge). 40: more programs
# than the 19 tiles (empty ranges between non-empty ones).
@pytest.mark.parametrize("variant", dap.VARIANTS)
@pytest.mark.parametrize("num_programs", [1, 3, 7, 40])
def test_num_programs(gen, variant, num_programs):
    run_case(gen, hq=8, hk=2, num_programs=num_programs, config=small(variant))


@pytest.mark.parametrize("variant", dap.VARIANTS)
def test_item_cut_across_many_programs(gen, variant):
    """One long request over many programs: the owner merges more partials than one merge step."""
    run_case(gen, hq=4, hk=1, seq_lens=[700], num_programs=40, config=small(variant, heads_per_item=1))


@pytest.mark.parametrize("variant", dap.VARIANTS)
@pytest.mark.parametrize("block_size,tile_n", [(8, 32), (32, 16), (16, 64)])
def test_tiles_across_and_inside_blocks(gen, variant, block_size, tile_n):
    """A tile spans several cache blocks, lies inside one block, or is longer than most contexts."""
    run_case(gen, hq=4, hk=2, block_size=block_size, num_programs=5,
             config=small(variant, tile_n=tile_n, heads_per_item=2))


def test_gqa_group_not_pow2(gen):
    """G = 3 query heads per KV head: "tm" columns h * 3 + g of a 16-wide padded query block."""
    run_case(gen, hq=6, hk=2, num_programs=3, config=small("tm", heads_per_item=2))


def test_more_query_columns_than_16(gen):
    """"tm" with HB * G = 32 query columns (HB = 4 KV heads of G = 8)."""
    run_case(gen, hq=32, hk=4, seq_lens=[3, 40, 17], num_programs=2, config=small("tm"))


# Triton's interpreter multiplies bf16 dot operands as raw integers: bf16 is checked on the GPU only.
HALF = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="bf16 tl.dot is wrong in the interpreter"))]


@pytest.mark.parametrize("dtype", HALF)
def test_half_dtypes_and_default_config(gen, dtype):
    run_case(gen, hq=8, hk=2, head_dim=64, dtype=dtype, num_programs=3, config=None)


@pytest.mark.parametrize("config", dap.CONFIGS, ids=lambda c: c.describe().replace(" ", "_"))
def test_benchmark_configs(gen, config):
    """Every CONFIGS entry (the GPU sweep's candidates) at a small head dim, fp16, 2 cuts."""
    run_case(gen, hq=16, hk=4, head_dim=32, dtype=torch.float16, seq_lens=[5, 130, 300, 64],
             num_programs=3, config=config)


@pytest.mark.parametrize("variant", dap.VARIANTS)
def test_empty_context_and_head_dim_not_pow2(gen, variant):
    """seq_len 0 gives zeros (as the reference); D=48 pads to 64 lanes."""
    run_case(gen, hq=4, hk=2, head_dim=48, seq_lens=[0, 3, 0, 40], num_programs=3,
             config=small(variant))


@pytest.mark.parametrize("variant", dap.VARIANTS)
@pytest.mark.parametrize("dtype", attention_dtypes())
@pytest.mark.parametrize("num_programs", [1, 3])
def test_fp8_cache(gen, variant, dtype, num_programs):
    """float8_e4m3fn caches (K / V widened to q's dtype in the kernel), with items cut across
    programs, GQA 4 and two heads per item."""
    run_case(gen, hq=8, hk=2, dtype=dtype, cache_dtype=FP8, num_programs=num_programs,
             config=small(variant, heads_per_item=None))


@pytest.mark.parametrize("dtype", attention_dtypes())
def test_fp8_cache_default_config(gen, dtype):
    run_case(gen, hq=8, hk=2, head_dim=64, dtype=dtype, cache_dtype=FP8, num_programs=3, config=None)


def test_default_config_sizes():
    cfg = dap.default_config(head_dim=128, elem_size=2)
    assert cfg.variant == "tm" and cfg.heads_per_item == 1
    assert cfg.tile_n * 128 * 2 * 2 == 65536   # 64 KB of K+V per tile
    assert dap.default_config(head_dim=64, elem_size=4).tile_n == 64


def test_rejects_bad_arguments(gen):
    k_cache, v_cache, table = make_paged_cache(gen, [4], 16, 2, 32, torch.float32)
    lens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    q = randn(gen, 1, 4, 32)
    with pytest.raises(ValueError, match="num_programs"):
        dap.paged_decode_attention(q, k_cache, v_cache, table, lens, 1.0, num_programs=0)
    with pytest.raises(ValueError, match="multiple"):
        dap.paged_decode_attention(randn(gen, 1, 3, 32), k_cache, v_cache, table, lens, 1.0,
                                   num_programs=2)
    with pytest.raises(ValueError, match="divide"):
        dap.paged_decode_attention(q, k_cache, v_cache, table, lens, 1.0, num_programs=2,
                                   config=dap.PersistentDecodeConfig(heads_per_item=3))
    with pytest.raises(ValueError, match="tile_n"):
        dap.PersistentDecodeConfig(tile_n=24)
    with pytest.raises(ValueError, match="variant"):
        dap.PersistentDecodeConfig(variant="xx")
