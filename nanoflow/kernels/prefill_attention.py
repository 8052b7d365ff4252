"""Triton chunked-prefill attention over the paged KV cache (same function as
reference.paged_prefill_attention).

The new tokens of every request are already in the cache (rope_and_cache_write runs first); request
r's query rows query_start_loc[r]:query_start_loc[r+1] sit at the last positions of its seq_lens[r]
context and attend causally to all of it (earlier chunks + this chunk). Flash-attention (online
softmax, exp2) with GQA: a work item is (query tile, KV head); its M rows are BLOCK_Q tokens x the
G query heads of that KV head (G padded to a power of two), so each K / V tile gathered from the
cache is read once for all G heads. Keys below the tile's first query position need no causal mask
(first loop); the rest are masked (second loop).

Tile map without host metadata: tile i of the flat tile space belongs to the request r with
query_start_loc[r] // BLOCK_Q + r <= i < query_start_loc[r+1] // BLOCK_Q + r + 1, found on the device
by binary search. That space has T // BLOCK_Q + R tiles (host-known: T = q.shape[0], R =
seq_lens.shape[0]); a few tiles past a request's end are empty and exit at once. So nothing here
reads device values on the host and no per-step tile map (or host helper to build one) is needed:
the kernel is CUDA-graph safe as is. query_start_loc[0] may be > 0 (e.g. prefill rows after a batch's
decode rows, with q the whole batch): rows outside [query_start_loc[0], query_start_loc[R]) belong to
no request and are not written. query_start_loc[R] <= T is required.

`max_programs` caps the grid (persistent loop over work items, as in decode_attention). Work items are
visited last tile first, so the tiles with the longest causal span start first. A request with no
query rows is allowed. `out` may be given (e.g. a slice of a persistent [T, Hq, D] buffer).

FP8 KV cache (torch.float8_e4m3fn, scale 1.0): K / V tiles are loaded as fp8 and widened to q's
dtype in registers before the dot products (exact), a constexpr branch on the cache's element type;
16/32-bit caches compile to the same code as before. Tile sizes are q's.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Launch configuration. block_m rows = (block_m // G_pad) tokens x G_pad heads (at least one
    token: block_m grows to G_pad for very wide groups)."""

    block_m: int = 128
    block_n: int = 64     # keys per tile
    num_warps: int = 8
    num_stages: int = 3


def default_config(elem_size: int = 2) -> PrefillConfig:
    """128 x 64 tiles, 2 K/V tiles in flight for 16-bit types; fp32 (tests) gets half the keys and
    one stage less to fit in shared memory."""
    if elem_size >= 4:
        return PrefillConfig(block_n=32, num_stages=2)
    return PrefillConfig()


@triton.jit
def _find_request(qsl_ptr, tile, num_requests, BLOCK_Q: tl.constexpr):
    """Largest r in [0, R) with query_start_loc[r] // BLOCK_Q + r <= tile."""
    lo = 0
    hi = num_requests
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(acc, m_i, l_i, next_page, q, k_ptr, v_ptr, bt_row, kv_off, n0, kv_end, q_pos,
                 stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, d_mask, scale_log2,
                 CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One key tile [n0, n0 + BLOCK_N) of the online softmax. `next_page` holds this tile's
    block-table entries (loaded one tile ahead so the K/V loads pipeline); returns the next tile's."""
    pos = n0 + offs_n
    valid = pos < kv_end
    page = next_page.to(tl.int64)
    next_pos = pos + BLOCK_N
    next_page = tl.load(bt_row + next_pos // BLOCK_SIZE, mask=next_pos < kv_end, other=0)
    slot = pos % BLOCK_SIZE
    kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + (page * stride_kb + slot * stride_ks + kv_off)[:, None] + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if k_ptr.dtype.element_ty == tl.float8e4nv:  # fp8 cache: widen in registers
        k = k.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if CAUSAL:
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + (page * stride_vb + slot * stride_vs + kv_off)[:, None] + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if v_ptr.dtype.element_ty == tl.float8e4nv:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i, next_page


# Batch-dependent ints and row-sliced metadata pointers change every step: no re-compiles.
@triton.jit(do_not_specialize=['num_requests', 'num_work'],
            do_not_specialize_on_alignment=['num_requests', 'num_work', 'bt_ptr', 'qsl_ptr', 'lens_ptr'])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, lens_ptr, o_ptr,
    scale_log2, num_requests, num_work,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # BLOCK_M == BLOCK_Q * GROUP_PAD: row m is token m // GROUP_PAD, head m % GROUP_PAD of the group
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
        # r = -1 (clamped to 0, tile_start < 0) for tiles before the first request's rows, which
        # happens when query_start_loc[0] > 0 (rows of q that belong to no request).
        r = tl.maximum(_find_request(qsl_ptr, tile, num_requests, BLOCK_Q), 0)
        q_lo = tl.load(qsl_ptr + r)
        q_len = tl.load(qsl_ptr + r + 1) - q_lo
        tile_start = (tile - (q_lo // BLOCK_Q + r)) * BLOCK_Q
        if (tile_start >= 0) & (tile_start < q_len):
            seq_len = tl.load(lens_ptr + r)
            ctx_start = seq_len - q_len  # position of the request's first query row
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
            # Keys < full_end are <= every row's position: no mask. Key 0 is visible to every row,
            # so after the first tile m_i is finite and fully masked tiles contribute exactly 0.
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


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_programs: int | None = None,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """q [T, Hq, D]; caches [num_blocks, block_size, Hk, D]; block_tables [R, max_blocks] int32;
    query_start_loc [R+1]; seq_lens [R] (context incl. this chunk). Returns [T, Hq, D].

    max_programs: cap on the grid (persistent loop over (query tile, KV head) items).
    config: tile sizes / warps / stages; None = default_config(...)."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    num_requests = seq_lens.shape[0]
    if cache_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} / {tuple(v_cache.shape)} does not "
                         f"match q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num q heads {num_heads} is not a multiple of num kv heads {num_kv_heads}")
    if query_start_loc.shape != (num_requests + 1,):
        raise ValueError(f"query_start_loc must have shape ({num_requests + 1},), "
                         f"got {tuple(query_start_loc.shape)}")
    if max_programs is not None and max_programs < 1:
        raise ValueError(f"max_programs must be >= 1, got {max_programs}")
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q's shape and dtype with a contiguous head dim")
    if num_tokens == 0 or num_requests == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("KV cache head dim and block_tables rows must be contiguous")
    ok = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)
    if k_cache.dtype not in ok or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"unsupported KV cache dtypes {k_cache.dtype} / {v_cache.dtype}")
    group = num_heads // num_kv_heads
    cfg = config or default_config(q.element_size())
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, cfg.block_m // group_pad)
    num_tiles = num_tokens // block_q + num_requests
    num_work = num_tiles * num_kv_heads
    grid = (num_work if max_programs is None else min(num_work, max_programs),)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        scale * 1.4426950408889634, num_requests, num_work,
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
