import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import DEVICE, FP8, TOLERANCES, attention_dtypes, make_paged_cache, randn

from nanoflow.kernels import decode_attention, reference

# Ragged contexts: 1 token, partial first block, exact block multiples, several blocks + partial.
SEQ_LENS = [1, 7, 16, 33, 70, 128]


def run_case(gen, *, hq, hk, head_dim, block_size, dtype, seq_lens=SEQ_LENS, cache_dtype=None,
             **kwargs):
    """cache_dtype: the KV cache's dtype (None: q's; FP8: the reference reads the same fp8 cache)."""
    k_cache, v_cache, table = make_paged_cache(gen, seq_lens, block_size, hk, head_dim,
                                               cache_dtype or dtype)
    q = randn(gen, len(seq_lens), hq, head_dim, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    got = decode_attention.paged_decode_attention(q, k_cache, v_cache, table, lens, scale, out=out,
                                                  **kwargs)
    assert got is out
    want = reference.paged_decode_attention(q, k_cache, v_cache, table, lens, scale)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (8, 2)])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_gqa_and_splits(gen, hq, hk, num_splits):
    run_case(gen, hq=hq, hk=hk, head_dim=64, block_size=16, dtype=torch.float32,
             num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,head_dim", [(8, 128), (16, 64), (32, 32), (16, 48)])
def test_decode_block_sizes_and_dtypes(gen, dtype, block_size, head_dim):
    # block_n 16 < block_size 32 checks tiles inside a block; default block_n spans several blocks.
    run_case(gen, hq=4, hk=2, head_dim=head_dim, block_size=block_size, dtype=dtype, num_splits=2,
             config=decode_attention.DecodeConfig(block_n=16) if block_size == 32 else None)


@pytest.mark.parametrize("max_programs", [1, 5])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("block_n", [16, None])  # None: the capped-grid default (one large tile)
def test_decode_capped_grid(gen, max_programs, num_splits, block_n):
    """A persistent grid smaller than the work (each program loops) gives the same result."""
    config = decode_attention.DecodeConfig(block_n=16, num_stages=2) if block_n else None
    run_case(gen, hq=4, hk=2, head_dim=32, block_size=16, dtype=torch.float32,
             num_splits=num_splits, max_programs=max_programs, config=config)


def test_decode_heuristic_splits_and_empty_context(gen):
    """num_splits=None (heuristic) on contexts where some splits, and one request, are empty."""
    run_case(gen, hq=4, hk=1, head_dim=32, block_size=16, dtype=torch.float32,
             seq_lens=[0, 3, 200], max_seq_len=200)


def test_choose_num_splits():
    assert decode_attention.choose_num_splits(256, 8, 132) == 1          # plenty of (r, head) pairs
    assert decode_attention.choose_num_splits(4, 8, 132) == 17           # 2 waves of 264 slots
    assert decode_attention.choose_num_splits(4, 8, 132, max_programs=32) == 2
    assert decode_attention.choose_num_splits(1, 8, 132, max_seq_len=300) == 2   # >= 256 per split
    assert decode_attention.choose_num_splits(1, 1, 132) == 64           # capped


def test_decode_rejects_bad_arguments(gen):
    k_cache, v_cache, table = make_paged_cache(gen, [4], 16, 2, 32, torch.float32)
    lens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention.paged_decode_attention(randn(gen, 1, 3, 32), k_cache, v_cache, table, lens, 1.0)
    with pytest.raises(ValueError, match="max_programs"):
        decode_attention.paged_decode_attention(randn(gen, 1, 4, 32), k_cache, v_cache, table, lens, 1.0,
                                                max_programs=0)


@pytest.mark.parametrize("dtype", attention_dtypes())
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("max_programs", [None, 5])
def test_decode_fp8_cache(gen, dtype, num_splits, max_programs):
    """float8_e4m3fn caches: K / V widened to q's dtype in the kernel; the same function as the
    reference on the same fp8 cache, to q's dtype's tolerance."""
    run_case(gen, hq=8, hk=2, head_dim=64, block_size=16, dtype=dtype, cache_dtype=FP8,
             num_splits=num_splits, max_programs=max_programs)


def test_decode_fp8_cache_block_n_16(gen):
    run_case(gen, hq=4, hk=2, head_dim=32, block_size=32, dtype=torch.float16, cache_dtype=FP8,
             num_splits=2, config=decode_attention.DecodeConfig(block_n=16))


def test_decode_register_cap_config(gen):
    """max_registers only changes the launch (maxnreg), not the function."""
    run_case(gen, hq=8, hk=2, head_dim=32, block_size=16, dtype=torch.float32, num_splits=2,
             config=decode_attention.DecodeConfig(block_n=16, num_stages=2, max_registers=128))


def test_decode_rejects_fp8_e5m2_cache(gen):
    k_cache, v_cache, table = make_paged_cache(gen, [4], 16, 2, 32, torch.float8_e5m2)
    lens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cache dtype"):
        decode_attention.paged_decode_attention(randn(gen, 1, 4, 32), k_cache, v_cache, table, lens, 1.0)
