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

from nanoflow.kernels.decode_attention import check_decode_args
from nanoflow.kernels.decode_attention_persistent_kernels import (_decode_hm_kernel, _decode_merge_kernel,
                                                              _decode_tm_kernel)

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


# Candidates for docs/research/overlap-budgeted-kernels/overlap_gpu.py (bf16 D=128 Hk=8); benchmarks/decode_sweep_gpu.py sweeps
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
