"""Triton paged decode attention (same function as reference.paged_decode_attention).

Flash-decoding with GQA:
* A work item is (request r, KV head h, split s). It loads the G = Hq / Hk query heads of KV head h
  as one [BLOCK_H, D] tile (BLOCK_H = max(16, next_pow2(G)) rows, so both products run on tensor
  cores), and streams split s of the request's context through it: each K / V row of the cache is
  read once for all G heads. Tiles of BLOCK_N tokens gather their rows through the block table
  (tokens of one tile may sit in different cache blocks; any block_size works).
* Split s covers a BLOCK_N-aligned chunk of ceil(seq_len / num_splits) tokens, computed on the device
  from seq_lens, so no host value depends on device data (CUDA-graph safe). With num_splits == 1 the
  kernel writes the normalized output directly; otherwise it writes per-split (o, log2-sum-exp) to an
  fp32 workspace and a second kernel merges the splits.

SM budget (NanoFlow's execution-unit scheduling): both kernels are persistent. `max_programs` caps
the launch grid; each program loops over work items pid, pid + grid, ... So `max_programs=44`
occupies at most 44 CTAs (the hardware places them on distinct SMs when SMs are free; nothing pins
them). None launches one program per work item.

`num_splits=None` picks splits so there are at least ~2 work items per program slot (see
`choose_num_splits`); the optional host hint `max_seq_len` stops it from splitting short contexts
into empty pieces. seq_len 0 yields zeros (as the reference). `out` may be given (e.g. a slice of
a persistent [R, Hq, D] buffer).

FP8 KV cache (torch.float8_e4m3fn, scale 1.0): K / V tiles are loaded as fp8 (half the bytes) and
widened to q's dtype in registers before the dot products (exact: every e4m3 value is a bf16 / fp16
/ fp32 value), so the result is the reference's on the same cache. The widening is a constexpr branch
on the cache's element type: 16/32-bit caches compile to the same code as before. The default tile
size is q's (fp8: the same keys per tile, half the bytes; a larger block_n may pay off, see
benchmarks/kernels_gpu.py, but the widened tiles need registers / shared memory of their own).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

_MAX_SPLITS = 64
_MIN_SPLIT_TOKENS = 256  # with a max_seq_len hint: do not split below this many tokens per split


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch configuration of the split-KV pass (the merge pass is tiny and fixed)."""

    block_n: int = 64     # tokens per tile (K and V tiles are [block_n, D])
    num_warps: int = 4
    num_stages: int = 3   # K/V tiles in flight per program = num_stages - 1
    max_registers: int | None = None
    """Register cap per thread (Triton's maxnreg): more programs per SM when registers limit them."""


def default_config(max_programs: int | None, sm_count: int, head_dim: int = 128,
                   elem_size: int = 2) -> DecodeConfig:
    """Full grid (several programs per SM): 16 KB K and V tiles, 2 in flight (~72 KB of shared
    memory per program at D=128 bf16 on sm_90: 3 programs per SM). Grid capped to at most one program
    per SM: 32 KB tiles, 3 in flight, so each program alone keeps ~200 KB of reads in flight. fp32
    (tests) gets one stage less to fit in shared memory."""
    row_bytes = head_dim * elem_size
    fp32 = elem_size >= 4
    if max_programs is not None and max_programs <= sm_count:
        block_n = max(16, min(256, triton.next_power_of_2(32768 // row_bytes)))
        return DecodeConfig(block_n=block_n, num_warps=8, num_stages=3 if fp32 else 4)
    block_n = max(16, min(128, triton.next_power_of_2(16384 // row_bytes)))
    return DecodeConfig(block_n=block_n, num_warps=4, num_stages=2 if fp32 else 3)


@functools.lru_cache(maxsize=None)
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """SM count of a CUDA device; 8 elsewhere (the interpreter: keeps test grids small)."""
    if device.type != "cuda":
        return 8
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(num_requests: int, num_kv_heads: int, sm_count: int,
                      max_programs: int | None = None, max_seq_len: int | None = None) -> int:
    """Splits so that the work items fill ~2 waves of the program slots: one split when the batch
    alone has enough (request, KV head) pairs, more for small batches of long contexts."""
    slots = max_programs if max_programs is not None else 2 * sm_count
    pairs = max(1, num_requests * num_kv_heads)
    splits = triton.cdiv(2 * slots, pairs)
    if max_seq_len is not None:
        splits = min(splits, triton.cdiv(max_seq_len, _MIN_SPLIT_TOKENS))
    return max(1, min(splits, _MAX_SPLITS))


# Batch-dependent ints and row-sliced metadata pointers change every step: no re-compiles.
@triton.jit(do_not_specialize=['num_work', 'num_splits'],
            do_not_specialize_on_alignment=['num_work', 'num_splits', 'bt_ptr', 'lens_ptr'])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
    scale_log2, num_work, num_splits,
    stride_qr, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_or, stride_oh, stride_os,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, DIRECT_OUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # num_splits is a runtime value (no recompile per batch size); DIRECT_OUT == (num_splits == 1).
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    hd_mask = (offs_h[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    d_mask = offs_d[None, :] < HEAD_DIM
    for w in range(tl.program_id(0), num_work, tl.num_programs(0)):
        kvh = w % NUM_KV_HEADS
        split = (w // NUM_KV_HEADS) % num_splits
        r = w // NUM_KV_HEADS // num_splits
        seq_len = tl.load(lens_ptr + r)
        chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
        heads = kvh * GROUP + offs_h
        q = tl.load(q_ptr + r * stride_qr + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=hd_mask, other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        bt_row = bt_ptr + r.to(tl.int64) * stride_bt
        # The block-table entries of the next tile are loaded one iteration ahead: K/V addresses then
        # come from a loop-carried value, not from a load of the same iteration, which lets Triton's
        # pipeliner keep num_stages - 1 K/V tiles in flight (an indirect load gets only one).
        next_pos = start + offs_n
        next_page = tl.load(bt_row + next_pos // BLOCK_SIZE, mask=next_pos < end, other=0)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            valid = pos < end
            page = next_page.to(tl.int64)
            next_pos = pos + BLOCK_N
            next_page = tl.load(bt_row + next_pos // BLOCK_SIZE, mask=next_pos < end, other=0)
            slot = pos % BLOCK_SIZE
            kv_mask = valid[:, None] & d_mask
            k = tl.load(k_ptr + (page * stride_kb + slot * stride_ks + kvh * stride_kh)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if k_ptr.dtype.element_ty == tl.float8e4nv:  # fp8 cache: widen in registers
                k = k.to(q_ptr.dtype.element_ty)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            # Each tile has >= 1 valid column, so m_new is finite after the first tile.
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (page * stride_vb + slot * stride_vs + kvh * stride_vh)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if v_ptr.dtype.element_ty == tl.float8e4nv:
                v = v.to(q_ptr.dtype.element_ty)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        o_off = r * stride_or + heads[:, None] * stride_oh + offs_d[None, :]
        if DIRECT_OUT:
            tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=hd_mask)
        else:
            tl.store(o_ptr + o_off + split * stride_os, out, mask=hd_mask)
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + (r * (NUM_KV_HEADS * GROUP) + heads) * num_splits + split, lse,
                     mask=offs_h < GROUP)


# Batch-dependent ints and row-sliced metadata pointers change every step: no re-compiles.
@triton.jit(do_not_specialize=['num_work', 'num_splits'],
            do_not_specialize_on_alignment=['num_work', 'num_splits'])
def _decode_merge_kernel(
    po_ptr, lse_ptr, out_ptr, num_work, num_heads, num_splits, stride_or, stride_oh,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    for w in range(tl.program_id(0), num_work, tl.num_programs(0)):  # w = r * Hq + head
        lse = tl.load(lse_ptr + w * num_splits + offs_s, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        weights = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
        po = tl.load(po_ptr + (w * num_splits + offs_s)[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                     mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        total = tl.sum(weights, 0)
        out = tl.sum(po * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
        r = w // num_heads
        head = w % num_heads
        tl.store(out_ptr + r * stride_or + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)


def _check_cache_dtype(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """16/32-bit float caches, or fp8 e4m3 (widened to q's dtype in the kernel); K and V alike."""
    ok = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)
    if k_cache.dtype not in ok or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"unsupported KV cache dtypes {k_cache.dtype} / {v_cache.dtype}")


def _grid(num_work: int, max_programs: int | None) -> tuple[int]:
    return (num_work if max_programs is None else max(1, min(num_work, max_programs)),)


def check_decode_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes and strides both decode kernels need; returns (q with a contiguous head dim, out)."""
    num_requests, num_heads, head_dim = q.shape
    num_kv_heads, cache_dim = k_cache.shape[2], k_cache.shape[3]
    if cache_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} / {tuple(v_cache.shape)} does not "
                         f"match q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num q heads {num_heads} is not a multiple of num kv heads {num_kv_heads}")
    if out is None:
        out = torch.empty((num_requests, num_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q's shape and dtype with a contiguous head dim")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("KV cache head dim and block_tables rows must be contiguous")
    return q, out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    max_programs: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """q [R, Hq, D]; caches [num_blocks, block_size, Hk, D]; block_tables [R, max_blocks] int32;
    seq_lens [R] (context incl. the current token). Returns [R, Hq, D].

    num_splits: KV splits per (request, KV head); None = choose_num_splits(...).
    max_programs: cap on the grid of both kernels (persistent loop); None = one program per item.
    max_seq_len: optional host-side upper bound of seq_lens, only used by the split heuristic.
    config: tile size / warps / stages; None = default_config(...).
    """
    if max_programs is not None and max_programs < 1:
        raise ValueError(f"max_programs must be >= 1, got {max_programs}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    q, out = check_decode_args(q, k_cache, v_cache, block_tables, out)
    num_requests, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if num_requests == 0:
        return out
    sm_count = num_sms(q.device)
    _check_cache_dtype(k_cache, v_cache)
    cfg = config or default_config(max_programs, sm_count, head_dim, q.element_size())
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(num_requests, num_kv_heads, sm_count, max_programs, max_seq_len)
    if num_splits == 1:
        partial, lse = out, out  # lse unused
        p_strides = (out.stride(0), out.stride(1), 0)
    else:
        partial = torch.empty((num_requests, num_heads, num_splits, head_dim), dtype=torch.float32,
                              device=q.device)
        lse = torch.empty((num_requests, num_heads, num_splits), dtype=torch.float32, device=q.device)
        p_strides = (partial.stride(0), partial.stride(1), partial.stride(2))
    num_work = num_requests * num_kv_heads * num_splits
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[_grid(num_work, max_programs)](
        q, k_cache, v_cache, block_tables, seq_lens, partial, lse,
        scale * 1.4426950408889634, num_work, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *p_strides,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, DIRECT_OUT=num_splits == 1,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=cfg.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.max_registers} if cfg.max_registers else {}),
    )
    if num_splits > 1:
        merge_work = num_requests * num_heads
        _decode_merge_kernel[_grid(merge_work, max_programs)](
            partial, lse, out, merge_work, num_heads, num_splits, out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=4,
        )
    return out
