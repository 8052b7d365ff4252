"""Chunked-prefill attention whose launch depends on no batch value (CUDA graphs): the same function
as reference.paged_prefill_attention, for the requests a device-side range selects.

The eager kernel (prefill_attention.py) gets its request range from host slices (rows of the prefill
requests, their block tables) and sizes its grid from the host's row and request counts. Inside a
CUDA graph captured for a padded token count those change every step, so here the arguments are the
whole batch's fixed-size buffers (q of all rows, block tables / seq lens of up to R requests,
query_start_loc of R + 1 entries) and two int32 device scalars say which requests to compute:
[first_request, num_requests) (the engine passes the batch's decode count and request count; decode
requests, one row each, are decode attention's). The grid is a fixed number of persistent programs;
each loops over the work items (query tile, KV head) of the selected requests, counted on the device:
request r's tiles start at (qsl[r] - qsl[first]) // BLOCK_Q + (r - first) (the eager kernel's tile map
shifted to the first selected request), found by binary search. Rows outside the selected requests
(decode rows, padding) are not written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoflow.kernels.prefill_attention import PrefillConfig, _attend_tile, default_config


@triton.jit
def _find_request(qsl_ptr, tile, first, end, base, BLOCK_Q: tl.constexpr):
    """Largest r in [first, end) with (qsl[r] - base) // BLOCK_Q + (r - first) <= tile."""
    lo = first
    hi = end
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = (tl.load(qsl_ptr + mid) - base) // BLOCK_Q + (mid - first)
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["max_requests"])
def _prefill_rows_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, lens_ptr, o_ptr, first_ptr, count_ptr,
    scale_log2, max_requests,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    end = tl.minimum(tl.maximum(tl.load(count_ptr), 0), max_requests)
    first = tl.minimum(tl.maximum(tl.load(first_ptr), 0), end)
    base = tl.load(qsl_ptr + first)
    num_tiles = (tl.load(qsl_ptr + end) - base) // BLOCK_Q + (end - first)
    num_work = num_tiles * NUM_KV_HEADS
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tok = offs_m // GROUP_PAD
    hg = offs_m % GROUP_PAD
    for w in range(tl.program_id(0), num_work, tl.num_programs(0)):
        item = num_work - 1 - w  # last tiles (longest causal span) first
        kvh = item % NUM_KV_HEADS
        tile = item // NUM_KV_HEADS
        r = tl.maximum(_find_request(qsl_ptr, tile, first, end, base, BLOCK_Q), first)
        q_lo = tl.load(qsl_ptr + r)
        q_len = tl.load(qsl_ptr + r + 1) - q_lo
        tile_start = (tile - ((q_lo - base) // BLOCK_Q + (r - first))) * BLOCK_Q
        if (tile_start >= 0) & (tile_start < q_len):
            seq_len = tl.load(lens_ptr + r)
            ctx_start = seq_len - q_len
            q_row = tile_start + tok
            row_mask = (q_row < q_len) & (hg < GROUP)
            q_pos = ctx_start + q_row
            heads = kvh * GROUP + hg
            q_off = (q_lo + q_row).to(tl.int64) * stride_qt + heads * stride_qh
            q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            bt_row = bt_ptr + r.to(tl.int64) * stride_bt
            first_pos = ctx_start + tile_start
            last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
            full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
            kv_end = last_pos + 1
            next_page = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=offs_n < kv_end, other=0)
            for n0 in range(0, full_end, BLOCK_N):
                acc, m_i, l_i, next_page = _attend_tile(
                    acc, m_i, l_i, next_page, q, k_ptr, v_ptr, bt_row, kvh * stride_kh, n0, kv_end,
                    q_pos, stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, d_mask, scale_log2,
                    False, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)
            for n0 in range(full_end, kv_end, BLOCK_N):
                acc, m_i, l_i, next_page = _attend_tile(
                    acc, m_i, l_i, next_page, q, k_ptr, v_ptr, bt_row, kvh * stride_kh, n0, kv_end,
                    q_pos, stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, d_mask, scale_log2,
                    True, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)
            out = acc / l_i[:, None]
            o_off = (q_lo + q_row).to(tl.int64) * stride_ot + heads * stride_oh
            tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & d_mask[None, :])


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small grids
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_prefill_attention_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    first_request: torch.Tensor,
    num_requests: torch.Tensor,
    out: torch.Tensor,
    max_programs: int | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] (every row of the batch); block_tables [R, max_blocks] int32; query_start_loc
    [R + 1] (entries past the batch's last request repeat its end); seq_lens [R]. Computes requests
    first_request[0] <= r < num_requests[0] (int32 device scalars) into their rows of `out`
    [T, Hq, D]; other rows are not written. max_programs: the persistent grid (default 2 per SM)."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    max_requests = seq_lens.shape[0]
    if cache_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not match q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num q heads {num_heads} is not a multiple of num kv heads {num_kv_heads}")
    if query_start_loc.shape != (max_requests + 1,) or block_tables.shape[0] != max_requests:
        raise ValueError("query_start_loc must have R + 1 entries and block_tables R rows (R = len(seq_lens))")
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q's shape and dtype with a contiguous head dim")
    for name, t in (("first_request", first_request), ("num_requests", num_requests)):
        if t.dtype != torch.int32 or t.numel() < 1 or t.device != q.device:
            raise ValueError(f"{name} must be an int32 tensor on q's device")
    if max_programs is not None and max_programs < 1:
        raise ValueError(f"max_programs must be >= 1, got {max_programs}")
    if num_tokens == 0 or max_requests == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("KV cache head dim and block_tables rows must be contiguous")
    group = num_heads // num_kv_heads
    cfg = config or default_config(q.element_size())
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, cfg.block_m // group_pad)
    grid = (max_programs or 2 * _num_sms(q.device),)
    _prefill_rows_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, first_request, num_requests,
        scale * 1.4426950408889634, max_requests,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_Q=block_q, BLOCK_M=block_q * group_pad,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=cfg.block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
