import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import DEVICE, FP8, TOLERANCES, attention_dtypes, make_paged_cache, randn

from nanoflow.kernels import prefill_attention, reference

# (cached context before this step, new tokens this step): fresh prompts, continued chunks that
# start mid-block, a one-token chunk (decode-like), chunks longer than one query tile, and chunks
# whose first query sits just before / at a key-tile boundary (64), where the unmasked loop ends.
CHUNKS = [(0, 5), (20, 7), (3, 33), (0, 1), (45, 16), (17, 1), (62, 3), (63, 2)]


def run_case(gen, *, hq, hk, head_dim, block_size, dtype, chunks=CHUNKS, first_row=0,
             cache_dtype=None, **kwargs):
    """first_row > 0: rows of q before query_start_loc[0] belong to no request (left untouched).
    cache_dtype: the KV cache's dtype (None: q's; FP8: the reference reads the same fp8 cache)."""
    seq_lens = [c + n for c, n in chunks]
    k_cache, v_cache, table = make_paged_cache(gen, seq_lens, block_size, hk, head_dim,
                                               cache_dtype or dtype)
    starts = [first_row]
    for _, n in chunks:
        starts.append(starts[-1] + n)
    q = randn(gen, starts[-1], hq, head_dim, dtype=dtype)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    got = prefill_attention.paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, scale,
                                                    out=out, **kwargs)
    assert got is out
    want = reference.paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, scale)
    torch.testing.assert_close(got[first_row:], want[first_row:], **TOLERANCES[dtype])
    assert got[:first_row].isnan().all()


@pytest.mark.parametrize("hq,hk", [(2, 2), (4, 2), (8, 2), (6, 2)])  # GQA 1, 2, 4 and a padded 3
def test_prefill_gqa(gen, hq, hk):
    run_case(gen, hq=hq, hk=hk, head_dim=32, block_size=16, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,head_dim", [(8, 64), (16, 128), (16, 48)])
def test_prefill_block_sizes_and_dtypes(gen, dtype, block_size, head_dim):
    run_case(gen, hq=4, hk=1, head_dim=head_dim, block_size=block_size, dtype=dtype,
             chunks=[(70, 9), (0, 20)])


@pytest.mark.parametrize("first_row", [5, 150])  # 150 > block_q: whole tiles before row 0 of r=0
def test_prefill_rows_before_first_request(gen, first_row):
    """query_start_loc need not start at 0 (e.g. the prefill rows follow a batch's decode rows)."""
    run_case(gen, hq=4, hk=2, head_dim=32, block_size=16, dtype=torch.float32,
             chunks=[(10, 20), (0, 3)], first_row=first_row)


def test_prefill_long_chunk_and_empty_request(gen):
    """Query tiles beyond the first (several unmasked key tiles), and a request with no rows."""
    run_case(gen, hq=2, hk=2, head_dim=16, block_size=16, dtype=torch.float32,
             chunks=[(130, 70), (5, 0), (0, 3)])


@pytest.mark.parametrize("max_programs", [1, 7])
def test_prefill_capped_grid(gen, max_programs):
    run_case(gen, hq=4, hk=2, head_dim=32, block_size=16, dtype=torch.float32,
             chunks=[(10, 20), (0, 12), (33, 1)], max_programs=max_programs)


def test_prefill_rejects_bad_query_start_loc(gen):
    k_cache, v_cache, table = make_paged_cache(gen, [4], 16, 2, 32, torch.float32)
    lens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="query_start_loc"):
        prefill_attention.paged_prefill_attention(randn(gen, 4, 2, 32), k_cache, v_cache, table,
                                                  torch.tensor([0], device=DEVICE), lens, 1.0)


@pytest.mark.parametrize("dtype", attention_dtypes())
@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 2)])
def test_prefill_fp8_cache(gen, dtype, hq, hk):
    """float8_e4m3fn caches: K / V widened to q's dtype in the kernel; the same function as the
    reference on the same fp8 cache, to q's dtype's tolerance."""
    run_case(gen, hq=hq, hk=hk, head_dim=32, block_size=16, dtype=dtype, cache_dtype=FP8,
             chunks=[(0, 5), (20, 7), (62, 3), (3, 33)])


def test_prefill_fp8_cache_capped_grid(gen):
    run_case(gen, hq=4, hk=1, head_dim=64, block_size=8, dtype=torch.float16, cache_dtype=FP8,
             chunks=[(70, 9), (0, 20)], max_programs=3)
