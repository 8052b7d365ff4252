"""The CUDA-graph forms of the attention kernels: which rows / requests they compute comes from int32
device scalars, and rows outside that range are left untouched (on the GPU, and through Triton's
interpreter on CPU). Each is checked against its torch reference and against the eager reference on
the selected rows."""
import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import DEVICE, TOLERANCES, make_paged_cache, randn

from nanoflow.kernels import decode_attention_persistent as dap
from nanoflow.kernels import prefill_attention_graph as pag
from nanoflow.kernels import reference

SEQ_LENS = [1, 7, 16, 33, 70, 5, 128, 20]


def _scalar(v: int) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("num_decode,row0", [(8, 0), (5, 0), (6, 2), (2, 3), (0, 0), (11, 1)])
@pytest.mark.parametrize("num_programs", [1, 3, 16])
def test_decode_rows_compute_only_the_counted_rows(gen, num_decode, row0, num_programs):
    hq, hk, d, bs = 8, 2, 32, 16
    k_cache, v_cache, table = make_paged_cache(gen, SEQ_LENS, bs, hk, d, torch.float32)
    lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=DEVICE)
    q = randn(gen, len(SEQ_LENS), hq, d)
    sentinel = 12345.0
    out = torch.full_like(q, sentinel)
    cfg = dap.PersistentDecodeConfig(tile_n=16, heads_per_item=None, num_warps=4, num_stages=2)
    sl = slice(row0, None)
    dap.paged_decode_attention_rows(q[sl], k_cache, v_cache, table[sl], lens[sl], d ** -0.5,
                                    num_rows=_scalar(num_decode), row0=row0, num_programs=num_programs,
                                    out=out[sl], config=cfg)
    want = torch.full_like(q, sentinel)
    reference.paged_decode_attention_rows(q[sl], k_cache, v_cache, table[sl], lens[sl], d ** -0.5,
                                          num_rows=_scalar(num_decode), row0=row0, out=want[sl])
    n = max(0, min(num_decode - row0, len(SEQ_LENS) - row0))
    assert (want[row0 + n:] == sentinel).all() and (want[:row0] == sentinel).all()
    if n:
        eager = reference.paged_decode_attention(q[row0:row0 + n], k_cache, v_cache, table[row0:row0 + n],
                                                 lens[row0:row0 + n], d ** -0.5)
        torch.testing.assert_close(want[row0:row0 + n], eager, atol=0, rtol=0)
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float32])


def test_decode_rows_needs_int32_device_count(gen):
    q = randn(gen, 2, 4, 32)
    k_cache, v_cache, table = make_paged_cache(gen, [3, 4], 16, 2, 32, torch.float32)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        dap.paged_decode_attention_rows(q, k_cache, v_cache, table, lens, 1.0, num_rows=torch.tensor([2.0]),
                                        row0=0, num_programs=2, out=torch.empty_like(q))


def _batch(gen, decode_lens, chunks, hq, hk, d, bs, pad_requests):
    """Decode requests (one row each) then prefill chunks (new, context) and `pad_requests` empty
    requests after them (query_start_loc repeating the end), like the graph's fixed buffers."""
    lens = list(decode_lens) + [ctx + new for new, ctx in chunks]
    k_cache, v_cache, table = make_paged_cache(gen, lens + [0] * pad_requests, bs, hk, d, torch.float32)
    rows = [1] * len(decode_lens) + [new for new, _ in chunks]
    qsl = [0]
    for n in rows:
        qsl.append(qsl[-1] + n)
    qsl += [qsl[-1]] * pad_requests
    total = qsl[-1] + 5  # padding rows after the last request
    q = randn(gen, total, hq, d)
    lens_t = torch.tensor(lens + [0] * pad_requests, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, table, torch.tensor(qsl, dtype=torch.int32, device=DEVICE), lens_t, len(lens)


@pytest.mark.parametrize("decode_lens,chunks", [
    ([5, 9, 1], [(7, 0), (20, 13), (1, 40)]),   # mixed
    ([], [(33, 3), (2, 0)]),                     # prefill only
    ([4, 4], []),                                # decode only: nothing to compute
])
@pytest.mark.parametrize("max_programs", [1, 5, None])
def test_prefill_rows_compute_only_the_prefill_requests(gen, decode_lens, chunks, max_programs):
    hq, hk, d, bs = 4, 2, 32, 8
    q, kc, vc, table, qsl, lens, num_reqs = _batch(gen, decode_lens, chunks, hq, hk, d, bs, pad_requests=3)
    first, count = _scalar(len(decode_lens)), _scalar(num_reqs)
    sentinel = -777.0
    out = torch.full_like(q, sentinel)
    pag.paged_prefill_attention_rows(q, kc, vc, table, qsl, lens, d ** -0.5, first_request=first,
                                     num_requests=count, out=out, max_programs=max_programs,
                                     config=pag.PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2))
    want = torch.full_like(q, sentinel)
    reference.paged_prefill_attention_rows(q, kc, vc, table, qsl, lens, d ** -0.5, first_request=first,
                                           num_requests=count, out=want)
    lo = len(decode_lens)
    hi = int(qsl[num_reqs])
    assert (want[:lo] == sentinel).all() and (want[hi:] == sentinel).all()
    if hi > lo:
        eager = reference.paged_prefill_attention(q[lo:hi], kc, vc, table[lo:num_reqs], qsl[lo:num_reqs + 1] - lo,
                                                  lens[lo:num_reqs], d ** -0.5)
        torch.testing.assert_close(want[lo:hi], eager, atol=0, rtol=0)
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float32])
