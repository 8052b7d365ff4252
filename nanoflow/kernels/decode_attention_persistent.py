"""Persistent stream-K paged decode attention for a capped grid (an SM budget).

Same function as reference.paged_decode_attention; the grid is exactly `num_programs` programs, so
decode attention can run beside GEMMs on a share of the SMs (NanoFlow's execution-unit scheduling).

Work split (both kernel variants):
* Work is the flattened sequence of KV *tiles* over (request r, KV-head group g, tile j): request r
  has n_r = max(1, cdiv(seq_len_r, TILE_N)) tiles per group. Program p takes the contiguous tile range
  [p*W/P, (p+1)*W/P) of the W tiles (stream-K: balanced by tiles, so ragged lengths do not unbalance
  programs). The split is computed on the device from seq_lens (each program scans them), so nothing
  syncs with the host and the launch can be captured in a CUDA graph.
* Each program runs ONE loop over its tiles. At an item boundary the online-softmax state is reset
  by selects, not by leaving the loop, so Triton's software pipeline (num_stages) keeps streaming
  across items. Block-table entries and the next request's length are loaded one iteration ahead
  (loop-carried), so tile addresses never wait on a load of the same iteration and the pipeliner
  keeps the next tiles in flight: K, V and the item's query rows, staged in shared memory by cp.async
  (K/V with an L2 evict-first hint: read once, while a GEMM beside us wants the L2).
* A work item holds HB KV heads (config.heads_per_item) with all their GQA query heads.
* An item fully inside one program's range is written normalized to `out`. An item cut by a range
  boundary leaves unnormalized partials (acc, m, l): the program where it starts ("owner") writes slot
  1, each later program covering it writes slot 0; a second small kernel (grid P x HB) merges them.

Variants (config.variant), the same function:
* "tm" (tokens as M; default): per tile the K rows of the item's HB heads form one [TILE_N, HB*D]
  matrix (a token's HB heads are adjacent in the cache row) and the queries a block-diagonal
  [HB*D, NP] matrix Q^T (column h*G + g holds q[h, g] in rows h*D..h*D+D-1, zeros elsewhere; NP = HB*G
  padded to >= 16). S^T = K . Q^T is [TILE_N, NP]: the tokens are the dot's M dimension, so with
  TILE_N >= 64 per warpgroup it is a Hopper wgmma that reads K straight from the cp.async buffer in
  shared memory (no register staging, no 16-row query padding). Then acc^T [HB*D, NP] += V^T . P^T
  (V^T: a transposed view of the V buffer; P^T: [TILE_N, NP], tiny), of which the diagonal blocks
  are the output. The zeros cost HB x the tensor work, which is far below the tensor cores' rate.
  On one CTA per SM the kernel is bound by issued instructions per byte (round 4: ~165 warp
  instructions per KB of K+V for "hm"), so the addressing is lean: slot / column offsets are
  loop-invariant, a token adds one int32 block offset (64-bit only if a cache passes 2**31
  elements), V reuses K's offsets, K rows past the context read block 0 unmasked (their scores are
  masked); ~60-80 warp instructions per KB at tile 128 (SASS of triton 3.6 for sm_90).
* "hm" (heads as M; the round-4 kernel): [HB, 16, D] query rows (G real rows padded to 16), batched
  dots with K / V loaded from shared memory into registers (mma.sync).

FP8 KV cache (torch.float8_e4m3fn, scale 1.0), both variants: K / V tiles are staged as fp8 (half
the bytes) and widened to q's dtype in registers before the dots (exact, so the same function as the
reference on the same cache). For "tm" that means the wgmma no longer reads K / V^T straight from the
cp.async buffer: Triton stages the widened tiles (registers, and shared memory for the wgmma operand
it wants there), correctness first; a native fp8 wgmma (q cast to e4m3) would change the function.
The widening is a constexpr branch on the cache's element type: 16/32-bit caches compile as before.
Default tile sizes are q's (fp8: the same tokens per tile, half the staged bytes).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nanoflow.kernels.decode_attention import check_decode_args

_SCAN = 1024          # requests per vector step of the in-kernel length scan
_MERGE_PROGRAMS = 16  # partials combined per vector step of the merge kernel
VARIANTS = ("tm", "hm")


@dataclasses.dataclass(frozen=True)
class PersistentDecodeConfig:
    """tile_n: tokens per tile. heads_per_item (HB): KV heads per work item (None = all KV heads, at
    most 8; must divide the KV head count). variant: "tm" (tokens as the dot's M, wgmma) or "hm"
    (heads as M, the round-4 kernel).

    Shared memory per pipeline buffer: K + V tiles, 2 * tile_n * HB * D * elem_size, plus the query
    tile ("tm": HB * D * 16 * elem_size; "hm": HB * 16 * D * elem_size). Triton allocates num_stages
    buffers when the dot reads them from shared memory (wgmma, "tm" on sm_90) and num_stages - 1 when
    it loads them to registers first ("hm"); sm_90 has 227 KB per SM. At D=128 bf16: "tm" tile 64 x
    HB 1 = 36 KB per buffer (st <= 6), tile 128 x HB 1 or tile 64 x HB 2 = 68-72 KB (st <= 3)."""

    tile_n: int = 128
    heads_per_item: int | None = 1
    num_warps: int = 8
    num_stages: int = 3
    variant: str = "tm"

    def __post_init__(self):
        if self.tile_n < 16 or self.tile_n & (self.tile_n - 1):
            raise ValueError(f"tile_n must be a power of two >= 16, got {self.tile_n}")
        if self.heads_per_item is not None and self.heads_per_item < 1:
            raise ValueError(f"heads_per_item must be >= 1, got {self.heads_per_item}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    def describe(self) -> str:
        return (f"{self.variant} tile={self.tile_n} heads={self.heads_per_item or 'all'} "
                f"w={self.num_warps} st={self.num_stages}")


# Candidates for benchmarks/overlap_gpu.py (bf16 D=128 Hk=8); benchmarks/decode_sweep_gpu.py sweeps
# more. Compiled for sm_90 with triton 3.6 (ptxas -v, no spills): shared memory / registers per
# thread / SASS instructions of the main loop per warp, and warp-instructions per KB of K+V:
#   tm 128/1/8/3   217 KB / 144 / 620 (~78 per KB)     tm 128/1/16/3  217 KB / 128 / 557
#   tm 64/2/4/3    229 KB / 218 / 980 (~61 per KB)     tm 64/1/4/6    229 KB / 168 / 702 (~88)
#   hm 32/4/8/3    197 KB / 255 + 68 B spilled / 1319 (~165 per KB; the round-4 best, 1.25 TB/s at 44)
CONFIGS = (
    PersistentDecodeConfig(tile_n=128, heads_per_item=1, num_warps=8, num_stages=3, variant="tm"),
    PersistentDecodeConfig(tile_n=64, heads_per_item=2, num_warps=4, num_stages=3, variant="tm"),
    PersistentDecodeConfig(tile_n=64, heads_per_item=1, num_warps=4, num_stages=6, variant="tm"),
    PersistentDecodeConfig(tile_n=32, heads_per_item=4, num_warps=8, num_stages=3, variant="hm"),
)


def default_config(head_dim: int, elem_size: int) -> PersistentDecodeConfig:
    """"tm", one KV head per item, 32 KB K + 32 KB V per tile, three buffers, 4 warps (217 KB of
    shared memory at D=128 bf16). The H200 sweep (benchmarks/results/decode_sweep_round7.txt) ranked
    it first at every budget (1462 / 1997 / 2968 / 4298 GB/s on 32 / 44 / 66 / 132 SMs; 8 warps within
    1%). fp32 (tests, no wgmma) gets 16 KB tiles."""
    row = triton.next_power_of_2(head_dim) * elem_size
    if elem_size >= 4:
        return PersistentDecodeConfig(tile_n=max(16, min(128, triton.next_power_of_2(max(1, 16384 // row)))),
                                      heads_per_item=1, num_warps=4, num_stages=3, variant="tm")
    tile_n = max(16, min(256, triton.next_power_of_2(max(1, 32768 // row))))
    return PersistentDecodeConfig(tile_n=tile_n, heads_per_item=1, num_warps=4, num_stages=3, variant="tm")


def _fits_int32(t: torch.Tensor) -> bool:
    """Every element offset of t (from its data pointer) fits in int32."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) < 2**31 - 1


def _heads_per_item(requested: int | None, num_kv_heads: int) -> int:
    if requested is None:  # all KV heads, capped at 8 (acc is HB x 16 x D fp32 in registers)
        requested = next(h for h in (8, 4, 2, 1) if num_kv_heads % h == 0)
    if num_kv_heads % requested:
        raise ValueError(f"heads_per_item {requested} does not divide num kv heads {num_kv_heads}")
    return requested


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


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_programs: int,
    out: torch.Tensor | None = None,
    config: PersistentDecodeConfig | None = None,
) -> torch.Tensor:
    """q [R, Hq, D]; caches [num_blocks, block_size, Hk, D]; block_tables [R, max_blocks] int32;
    seq_lens [R] (context incl. the current token; 0 gives zeros). Returns [R, Hq, D].

    num_programs: the grid of the main kernel (the SM budget; at most the SM count, since a program
    takes a whole SM's shared memory and more would run in waves). The merge kernel's grid is
    num_programs x heads_per_item; its programs without a cut item exit at once.
    config: variant / tile / heads / warps / stages; None = default_config(...).
    """
    return _run(q, k_cache, v_cache, block_tables, seq_lens, scale, num_programs, out, config, None, 0)


def paged_decode_attention_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_rows: torch.Tensor,
    row0: int,
    num_programs: int,
    out: torch.Tensor,
    config: PersistentDecodeConfig | None = None,
) -> torch.Tensor:
    """The same function on the rows a device-side count selects, for CUDA graphs: the arguments
    cover R rows (rows row0 .. row0 + R - 1 of the batch), of which only those below num_rows[0]
    (an int32 device tensor: the batch's decode rows) are computed; `out` rows of the others are
    left untouched. The launch (grid, arguments) depends on no device value. "tm" variant only."""
    if num_rows.dtype != torch.int32 or num_rows.numel() < 1 or num_rows.device != q.device:
        raise ValueError("num_rows must be an int32 tensor on q's device")
    if row0 < 0:
        raise ValueError(f"row0 must be >= 0, got {row0}")
    return _run(q, k_cache, v_cache, block_tables, seq_lens, scale, num_programs, out, config, num_rows, row0)


def _run(q, k_cache, v_cache, block_tables, seq_lens, scale, num_programs, out, config, num_rows, row0):
    if num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    q, out = check_decode_args(q, k_cache, v_cache, block_tables, out)
    num_requests, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if num_requests == 0:
        return out
    if seq_lens.stride(0) != 1:
        seq_lens = seq_lens.contiguous()
    ok = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)
    if k_cache.dtype not in ok or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"unsupported KV cache dtypes {k_cache.dtype} / {v_cache.dtype}")
    cfg = config or default_config(head_dim, q.element_size())
    if num_rows is not None and cfg.variant != "tm":
        raise ValueError('a device-side row count needs the "tm" variant')
    hb = _heads_per_item(cfg.heads_per_item, num_kv_heads)
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    # Partials: two slots per program, the real query rows of one item each.
    pacc = torch.empty((num_programs, 2, hb * group, head_dim), dtype=torch.float32, device=q.device)
    pml = torch.empty((num_programs, 2, 2, hb * group), dtype=torch.float32, device=q.device)
    meta = torch.empty((num_programs, 3), dtype=torch.int32, device=q.device)
    args = (q, k_cache, v_cache, block_tables, seq_lens, out, pacc, pml, meta,
            scale * 1.4426950408889634, num_requests,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1))
    common = dict(NUM_GROUPS=num_kv_heads // hb, HB=hb, GROUP=group, BLOCK_SIZE=block_size,
                  HEAD_DIM=head_dim, BLOCK_D=block_d, TILE_N=cfg.tile_n, SCAN=_SCAN,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.variant == "tm":
        rows = (num_rows, row0) if num_rows is not None else (meta, 0)  # meta: any int32 tensor, unread
        _decode_tm_kernel[(num_programs,)](*args, *rows, NP=max(16, triton.next_power_of_2(hb * group)),
                                           OFF32=all(map(_fits_int32, (q, k_cache, v_cache, block_tables,
                                                                       out))),
                                           SAME_KV=k_cache.stride() == v_cache.stride(),
                                           ROWS_FROM_DEVICE=num_rows is not None, **common)
    else:
        _decode_hm_kernel[(num_programs,)](*args, BLOCK_H=max(16, triton.next_power_of_2(group)),
                                           **common)
    _decode_merge_kernel[(num_programs, hb)](
        pacc, pml, meta, out, out.stride(0), out.stride(1),
        NUM_GROUPS=num_kv_heads // hb, HB=hb, GROUP=group, BLOCK_G=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=_MERGE_PROGRAMS, num_warps=4,
    )
    return out
