"""Triton kernels of the persistent stream-K paged decode attention: the work split helpers, the "tm"
and "hm" main kernels and the merge of cut items. decode_attention_persistent.py describes the design
and holds the host side (config, launch)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tiles_of(lens, TILE_N: tl.constexpr):
    """Tiles per (request, head group): an empty context still gets one (fully masked) tile, so
    every output row is written and the tile count is strictly increasing over requests."""
    return tl.maximum(tl.cdiv(lens, TILE_N), 1)


@triton.jit
def _locate(lens_ptr, num_requests, tile, NUM_GROUPS: tl.constexpr, TILE_N: tl.constexpr,
            SCAN: tl.constexpr):
    """Request r and tile offset u inside r's NUM_GROUPS * n_r tiles for a global tile index."""
    base = 0     # tiles per group before the current scan chunk
    count = 0    # requests whose first tile is <= tile
    first = 0    # first tile (per group) of the last such request
    for r0 in range(0, num_requests, SCAN):
        idx = r0 + tl.arange(0, SCAN)
        inb = idx < num_requests
        n = tl.where(inb, _tiles_of(tl.load(lens_ptr + idx, mask=inb, other=0), TILE_N), 0)
        excl = tl.cumsum(n, 0) - n + base
        ok = inb & (excl * NUM_GROUPS <= tile)
        count += tl.sum(ok.to(tl.int32), 0)
        first = tl.maximum(first, tl.max(tl.where(ok, excl, 0), 0))
        base += tl.sum(n, 0)
    r = tl.maximum(count - 1, 0)
    return r, tile - first * NUM_GROUPS


@triton.jit
def _total_tiles(lens_ptr, num_requests, TILE_N: tl.constexpr, SCAN: tl.constexpr):
    total = 0
    for r0 in range(0, num_requests, SCAN):
        idx = r0 + tl.arange(0, SCAN)
        inb = idx < num_requests
        total += tl.sum(tl.where(inb, _tiles_of(tl.load(lens_ptr + idx, mask=inb, other=0), TILE_N), 0), 0)
    return total


@triton.jit
def _range_of(pid, num_programs, total):
    """Tile range [start, end) of a program; int64 products (total * P may pass 2**31)."""
    start = (pid.to(tl.int64) * total // num_programs).to(tl.int32)
    end = ((pid + 1).to(tl.int64) * total // num_programs).to(tl.int32)
    return start, end


@triton.jit
def _next_tile(r, g, j, n, seq_len, next_len, NUM_GROUPS: tl.constexpr, TILE_N: tl.constexpr):
    """Tile after (r, g, j): the next tile of the item, else the next head group, else the next
    request (whose length next_len was loaded one iteration ahead)."""
    j += 1
    next_item = j == n
    j = tl.where(next_item, 0, j)
    g = tl.where(next_item, g + 1, g)
    next_req = g == NUM_GROUPS
    g = tl.where(next_req, 0, g)
    r = tl.where(next_req, r + 1, r)
    seq_len = tl.where(next_req, next_len, seq_len)
    n = _tiles_of(seq_len, TILE_N)
    return r, g, j, n, seq_len


@triton.jit
def _pages(bt_ptr, r, stride_bt, j, offs_t, seq_len, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
           OFF32: tl.constexpr):
    """Cache block of each token of tile j of request r (0 past the context)."""
    pos = j * TILE_N + offs_t
    if TILE_N % BLOCK_SIZE == 0:
        blk = j * (TILE_N // BLOCK_SIZE) + offs_t // BLOCK_SIZE   # offs_t // BLOCK_SIZE: loop-invariant
    else:
        blk = pos // BLOCK_SIZE
    if OFF32:
        row = bt_ptr + r * stride_bt
    else:
        row = bt_ptr + r.to(tl.int64) * stride_bt
    return tl.load(row + blk, mask=pos < seq_len, other=0)


# The batch size and row-sliced metadata pointers change every step: no re-compiles for them.
@triton.jit(do_not_specialize=["num_requests", "row0"],
            do_not_specialize_on_alignment=["num_requests", "bt_ptr", "lens_ptr", "row0"])
def _decode_tm_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, pacc_ptr, pml_ptr, meta_ptr,
    scale_log2, num_requests,
    stride_qr, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_or, stride_oh,
    nrows_ptr, row0,
    NUM_GROUPS: tl.constexpr, HB: tl.constexpr, GROUP: tl.constexpr, NP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
    SCAN: tl.constexpr, DOT_PRECISION: tl.constexpr, OFF32: tl.constexpr, SAME_KV: tl.constexpr,
    ROWS_FROM_DEVICE: tl.constexpr,
):
    """Variant "tm": S^T [TILE_N, NP] = K [TILE_N, HB*D] . Q^T [HB*D, NP] (block-diagonal), then
    acc^T [HB*D, NP] += V^T . P^T; output (h, g, d) = acc^T[h*D + d, h*G + g].

    ROWS_FROM_DEVICE (CUDA graphs): only the first clamp(*nrows_ptr - row0, 0, num_requests) rows
    are computed (the batch's decode rows, counted on the device); the others are not touched."""
    if ROWS_FROM_DEVICE:
        num_requests = tl.minimum(tl.maximum(tl.load(nrows_ptr) - row0, 0), num_requests)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    total = NUM_GROUPS * _total_tiles(lens_ptr, num_requests, TILE_N, SCAN)
    start, end = _range_of(pid, num_programs, total)

    HBD: tl.constexpr = HB * BLOCK_D
    offs_t = tl.arange(0, TILE_N)
    offs_c = tl.arange(0, HBD)            # K / V column: head c // BLOCK_D of the item, dim c % BLOCK_D
    c_head = offs_c // BLOCK_D
    c_d = offs_c % BLOCK_D
    col_ok = c_d < HEAD_DIM
    # Loop-invariant parts of the K / V element offsets (tile-relative slot and column); per tile only
    # a per-token block offset is added. A tile spans whole blocks when TILE_N % BLOCK_SIZE == 0.
    # OFF32: every cache offset fits in int32 (one IMAD per address instead of 64-bit arithmetic);
    # SAME_KV: K and V caches have the same strides (V reuses K's offsets).
    if TILE_N % BLOCK_SIZE == 0:
        k_inner = ((offs_t % BLOCK_SIZE) * stride_ks)[:, None] + (c_head * stride_kh + c_d)[None, :]
        v_inner = ((offs_t % BLOCK_SIZE) * stride_vs)[:, None] + (c_head * stride_vh + c_d)[None, :]
    else:
        k_inner = (c_head * stride_kh + c_d)[None, :]
        v_inner = (c_head * stride_vh + c_d)[None, :]
    offs_n = tl.arange(0, NP)             # query column: q head n of the item (KV head n // GROUP)
    n_ok = offs_n < HB * GROUP
    # The block diagonal of [HB*D, NP]: where Q^T is non-zero and where acc^T holds outputs.
    diag = (c_head[:, None] == (offs_n // GROUP)[None, :]) & n_ok[None, :] & col_ok[:, None]
    qt_off = offs_n[None, :] * stride_qh + c_d[:, None]       # + (g * HB * GROUP) * stride_qh
    o_off = offs_n[None, :] * stride_oh + c_d[:, None]
    part_off = offs_n[None, :] * HEAD_DIM + c_d[:, None]      # partial acc [P, 2, HB * GROUP, HEAD_DIM]

    # State of the first tile: request r, head group g, tile j of n, and what it needs loaded.
    r, u = _locate(lens_ptr, num_requests, start, NUM_GROUPS, TILE_N, SCAN)
    seq_len = tl.load(lens_ptr + r).to(tl.int32)
    n = _tiles_of(seq_len, TILE_N)
    g = u // n
    j = u % n
    page = _pages(bt_ptr, r, stride_bt, j, offs_t, seq_len, TILE_N, BLOCK_SIZE, OFF32)
    next_len = tl.load(lens_ptr + r + 1, mask=r + 1 < num_requests, other=0).to(tl.int32)

    m_i = tl.full([NP], float("-inf"), tl.float32)
    l_t = tl.zeros([TILE_N, NP], tl.float32)  # softmax denominators per token row: summed at the end
    acc = tl.zeros([HBD, NP], tl.float32)
    own_item = -1   # item this program starts but does not finish (its merge is ours)
    own_end = 0
    for t in range(start, end):
        # ---- the current tile (r, g, j): K / V addresses come from loop-carried values only.
        pos = j * TILE_N + offs_t
        tok_ok = pos < seq_len
        head0 = g * HB
        # Rows past the context read block 0 (page is 0 there): harmless for K (its scores are
        # masked below) but V is zero-filled (0 * garbage could be NaN).
        if OFF32:
            pg = page
        else:
            pg = page.to(tl.int64)
        if TILE_N % BLOCK_SIZE == 0:
            k_row = pg * stride_kb + head0 * stride_kh
            v_row = pg * stride_vb + head0 * stride_vh
        else:
            k_row = pg * stride_kb + (pos % BLOCK_SIZE) * stride_ks + head0 * stride_kh
            v_row = pg * stride_vb + (pos % BLOCK_SIZE) * stride_vs + head0 * stride_vh
        k_off = k_row[:, None] + k_inner
        if SAME_KV:
            v_off = k_off
        else:
            v_off = v_row[:, None] + v_inner
        if HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptr + k_off, eviction_policy="evict_first")
            v = tl.load(v_ptr + v_off, mask=tok_ok[:, None], other=0.0, eviction_policy="evict_first")
        else:
            k = tl.load(k_ptr + k_off, mask=col_ok[None, :], other=0.0, eviction_policy="evict_first")
            v = tl.load(v_ptr + v_off, mask=tok_ok[:, None] & col_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
        if k_ptr.dtype.element_ty == tl.float8e4nv:  # fp8 cache: widen in registers (see module doc)
            k = k.to(q_ptr.dtype.element_ty)
            v = v.to(q_ptr.dtype.element_ty)
        if OFF32:
            q_item = r * stride_qr + head0 * GROUP * stride_qh
        else:
            q_item = r.to(tl.int64) * stride_qr + head0 * GROUP * stride_qh
        qt = tl.load(q_ptr + (q_item + qt_off), mask=diag, other=0.0)
        # A new item starts from an empty softmax state (selects, not alpha = 0: a non-finite value
        # of one item must not leak into the next).
        fresh = j == 0
        m_i = tl.where(fresh, float("-inf"), m_i)
        l_t = tl.where(fresh, 0.0, l_t)
        acc = tl.where(fresh, 0.0, acc)
        s = tl.dot(k, qt, input_precision=DOT_PRECISION) * scale_log2           # [TILE_N, NP]
        s = tl.where(tok_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))   # the one cross-warp reduction of a tile
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked tile (empty context)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[None, :])
        l_t = l_t * alpha[None, :] + p
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

        # ---- leaving the item (its last tile, or this program's last tile): write it.
        item_start = t - j
        item_end = item_start + n
        if (j == n - 1) | (t == end - 1):
            l_i = tl.sum(l_t, 0)
            if (item_start >= start) & (item_end <= end):
                o = acc / tl.where(l_i > 0.0, l_i, 1.0)[None, :]
                tl.store(o_ptr + r.to(tl.int64) * stride_or + head0 * GROUP * stride_oh + o_off,
                         o.to(o_ptr.dtype.element_ty), mask=diag)
            else:
                part = pid * 2 + (item_start >= start).to(tl.int32)   # slot 1: the owner's
                tl.store(pacc_ptr + part.to(tl.int64) * (HB * GROUP * HEAD_DIM) + part_off, acc,
                         mask=diag)
                tl.store(pml_ptr + part * (2 * HB * GROUP) + offs_n, m_i, mask=n_ok)
                tl.store(pml_ptr + part * (2 * HB * GROUP) + HB * GROUP + offs_n, l_i, mask=n_ok)
        owner = (t == end - 1) & (item_start >= start) & (item_end > end)
        own_item = tl.where(owner, r * NUM_GROUPS + g, own_item)
        own_end = tl.where(owner, item_end, own_end)

        # ---- advance to the next tile; its loads are consumed by the next iteration.
        r, g, j, n, seq_len = _next_tile(r, g, j, n, seq_len, next_len, NUM_GROUPS, TILE_N)
        r_in = tl.minimum(r, num_requests - 1)  # past the last tile r may run off the end
        page = _pages(bt_ptr, r_in, stride_bt, j, offs_t, seq_len, TILE_N, BLOCK_SIZE, OFF32)
        next_len = tl.load(lens_ptr + r_in + 1, mask=r_in + 1 < num_requests, other=0).to(tl.int32)
    tl.store(meta_ptr + pid * 3, own_item)
    tl.store(meta_ptr + pid * 3 + 1, own_end)
    tl.store(meta_ptr + pid * 3 + 2, total)


# The batch size and row-sliced metadata pointers change every step: no re-compiles for them.
@triton.jit(do_not_specialize=["num_requests"],
            do_not_specialize_on_alignment=["num_requests", "bt_ptr", "lens_ptr"])
def _decode_hm_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, pacc_ptr, pml_ptr, meta_ptr,
    scale_log2, num_requests,
    stride_qr, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_or, stride_oh,
    NUM_GROUPS: tl.constexpr, HB: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
    SCAN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Variant "hm": [HB, BLOCK_H, D] query rows (G real) . [HB, D, TILE_N] K, batched dots."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    total = NUM_GROUPS * _total_tiles(lens_ptr, num_requests, TILE_N, SCAN)
    start, end = _range_of(pid, num_programs, total)

    # [HB, BLOCK_H, BLOCK_D] query / output rows; [HB, TILE_N, BLOCK_D] K / V rows.
    hb3 = tl.arange(0, HB)[:, None, None]
    h3 = tl.arange(0, BLOCK_H)[None, :, None]
    d3 = tl.arange(0, BLOCK_D)[None, None, :]
    offs_t = tl.arange(0, TILE_N)
    row_mask = (h3 < GROUP) & (d3 < HEAD_DIM)
    d_mask = d3 < HEAD_DIM
    q_rows = (hb3 * GROUP + h3) * stride_qh + d3          # + (g * HB * GROUP) * stride_qh
    o_rows = (hb3 * GROUP + h3) * stride_oh + d3
    k_cols = hb3 * stride_kh + d3                           # + g * HB * stride_kh
    v_cols = hb3 * stride_vh + d3
    part_rows = (hb3 * GROUP + h3) * HEAD_DIM + d3          # partial acc [P, 2, HB * GROUP, HEAD_DIM]
    h2 = tl.arange(0, BLOCK_H)[None, :]
    ml_rows = tl.arange(0, HB)[:, None] * GROUP + h2         # partial m, l [P, 2, 2, HB * GROUP]

    # State of the first tile: request r, head group g, tile j of n, and what it needs loaded.
    r, u = _locate(lens_ptr, num_requests, start, NUM_GROUPS, TILE_N, SCAN)
    seq_len = tl.load(lens_ptr + r).to(tl.int32)
    n = _tiles_of(seq_len, TILE_N)
    g = u // n
    j = u % n
    pos = j * TILE_N + offs_t
    page = tl.load(bt_ptr + r.to(tl.int64) * stride_bt + pos // BLOCK_SIZE, mask=pos < seq_len, other=0)
    next_len = tl.load(lens_ptr + r + 1, mask=r + 1 < num_requests, other=0).to(tl.int32)

    m_i = tl.full([HB, BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([HB, BLOCK_H], tl.float32)
    acc = tl.zeros([HB, BLOCK_H, BLOCK_D], tl.float32)
    own_item = -1   # item this program starts but does not finish (its merge is ours)
    own_end = 0
    for t in range(start, end):
        # ---- the current tile (r, g, j): K / V addresses come from loop-carried values only.
        pos = j * TILE_N + offs_t
        valid = (pos < seq_len)[None, None, :]
        slot = (pos % BLOCK_SIZE)[None, :, None]
        page3 = page.to(tl.int64)[None, :, None]
        kv_mask = (pos < seq_len)[None, :, None] & d_mask
        head0 = g * HB
        k = tl.load(k_ptr + page3 * stride_kb + slot * stride_ks + head0 * stride_kh + k_cols,
                    mask=kv_mask, other=0.0, eviction_policy="evict_first")
        v = tl.load(v_ptr + page3 * stride_vb + slot * stride_vs + head0 * stride_vh + v_cols,
                    mask=kv_mask, other=0.0, eviction_policy="evict_first")
        if k_ptr.dtype.element_ty == tl.float8e4nv:  # fp8 cache: widen in registers
            k = k.to(q_ptr.dtype.element_ty)
            v = v.to(q_ptr.dtype.element_ty)
        q = tl.load(q_ptr + r.to(tl.int64) * stride_qr + head0 * GROUP * stride_qh + q_rows,
                    mask=row_mask, other=0.0)
        # A new item starts from an empty softmax state.
        fresh = j == 0
        m_i = tl.where(fresh, float("-inf"), m_i)
        l_i = tl.where(fresh, 0.0, l_i)
        acc = tl.where(fresh, 0.0, acc)
        s = tl.dot(q, tl.trans(k, 0, 2, 1), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked tile (empty context)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

        # ---- leaving the item (its last tile, or this program's last tile): write it.
        item_start = t - j
        item_end = item_start + n
        if (j == n - 1) | (t == end - 1):
            if (item_start >= start) & (item_end <= end):
                o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, :, None]
                tl.store(o_ptr + r.to(tl.int64) * stride_or + head0 * GROUP * stride_oh + o_rows,
                         o.to(o_ptr.dtype.element_ty), mask=row_mask)
            else:
                part = pid * 2 + (item_start >= start).to(tl.int32)   # slot 1: the owner's
                tl.store(pacc_ptr + part.to(tl.int64) * (HB * GROUP * HEAD_DIM) + part_rows, acc,
                         mask=row_mask)
                ml_mask = h2 < GROUP
                tl.store(pml_ptr + part * (2 * HB * GROUP) + ml_rows, m_i, mask=ml_mask)
                tl.store(pml_ptr + part * (2 * HB * GROUP) + HB * GROUP + ml_rows, l_i, mask=ml_mask)
        owner = (t == end - 1) & (item_start >= start) & (item_end > end)
        own_item = tl.where(owner, r * NUM_GROUPS + g, own_item)
        own_end = tl.where(owner, item_end, own_end)

        # ---- advance to the next tile; its loads are consumed by the next iteration.
        r, g, j, n, seq_len = _next_tile(r, g, j, n, seq_len, next_len, NUM_GROUPS, TILE_N)
        r_in = tl.minimum(r, num_requests - 1)  # past the last tile r may run off the end
        pos = j * TILE_N + offs_t
        page = tl.load(bt_ptr + r_in.to(tl.int64) * stride_bt + pos // BLOCK_SIZE, mask=pos < seq_len,
                       other=0)
        next_len = tl.load(lens_ptr + r_in + 1, mask=r_in + 1 < num_requests, other=0).to(tl.int32)
    tl.store(meta_ptr + pid * 3, own_item)
    tl.store(meta_ptr + pid * 3 + 1, own_end)
    tl.store(meta_ptr + pid * 3 + 2, total)


@triton.jit
def _decode_merge_kernel(
    pacc_ptr, pml_ptr, meta_ptr, o_ptr, stride_or, stride_oh,
    NUM_GROUPS: tl.constexpr, HB: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program (q, hb): if program q of the main kernel owns a cut item, combine its slot-1 partial
    with the slot-0 partials of the later programs covering the item, for KV head hb of the item."""
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    num_programs = tl.num_programs(0)
    item = tl.load(meta_ptr + pid * 3)
    if item >= 0:
        item_end = tl.load(meta_ptr + pid * 3 + 1)
        total = tl.load(meta_ptr + pid * 3 + 2)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < GROUP
        rows = hb * GROUP + offs_g
        gd_mask = g_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        own = pid * 2 + 1
        m_run = tl.load(pml_ptr + own * (2 * HB * GROUP) + rows, mask=g_mask, other=0.0)
        l_run = tl.load(pml_ptr + own * (2 * HB * GROUP) + HB * GROUP + rows, mask=g_mask, other=0.0)
        acc = tl.load(pacc_ptr + own.to(tl.int64) * (HB * GROUP * HEAD_DIM) + rows[:, None] * HEAD_DIM
                      + offs_d[None, :], mask=gd_mask, other=0.0)
        offs_p = tl.arange(0, BLOCK_P)
        p0 = pid + 1
        p0_start, _ = _range_of(p0, num_programs, total)
        while (p0 < num_programs) & (p0_start < item_end):
            progs = p0 + offs_p
            lo = (progs.to(tl.int64) * total // num_programs).to(tl.int32)
            hi = ((progs + 1).to(tl.int64) * total // num_programs).to(tl.int32)
            take = (progs < num_programs) & (lo < item_end) & (hi > lo)   # covers the item, non-empty
            part = progs * 2                                              # slot 0
            pm = tl.load(pml_ptr + part[:, None] * (2 * HB * GROUP) + rows[None, :],
                         mask=take[:, None] & g_mask[None, :], other=float("-inf"))
            pl = tl.load(pml_ptr + part[:, None] * (2 * HB * GROUP) + HB * GROUP + rows[None, :],
                         mask=take[:, None] & g_mask[None, :], other=0.0)
            pa = tl.load(pacc_ptr + part.to(tl.int64)[:, None, None] * (HB * GROUP * HEAD_DIM)
                         + rows[None, :, None] * HEAD_DIM + offs_d[None, None, :],
                         mask=take[:, None, None] & gd_mask[None, :, :], other=0.0)
            m_new = tl.maximum(m_run, tl.max(pm, 0))
            alpha = tl.exp2(m_run - m_new)
            w = tl.exp2(pm - m_new[None, :])                               # taken-out partials: 0
            l_run = l_run * alpha + tl.sum(pl * w, 0)
            acc = acc * alpha[:, None] + tl.sum(pa * w[:, :, None], 0)
            m_run = m_new
            p0 += BLOCK_P
            p0_start, _ = _range_of(p0, num_programs, total)
        r = item // NUM_GROUPS
        heads = (item % NUM_GROUPS) * (HB * GROUP) + rows
        out = acc / tl.where(l_run > 0.0, l_run, 1.0)[:, None]
        tl.store(o_ptr + r.to(tl.int64) * stride_or + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=gd_mask)
