"""Paged decode attention for Hopper (sm_90) in Gluon: TMA pages, an mbarrier ring, wgmma with the
KV tokens as the MMA's M dimension, a persistent stream-K grid sized to the SMs it is given.

Same function as reference.paged_decode_attention (plus per-tensor fp8 KV scales). The design:

* Work is the flattened sequence of BT-token KV *tiles* (BT = 64; fp8: 64 or 128) over (request r,
  KV head h, tile t); request r has n_r = max(1, cdiv(seq_len_r, BT)) tiles per KV head. Program p of P takes the contiguous
  range [p*W/P, (p+1)*W/P) of the W tiles (stream-K: balanced by tiles, whatever the lengths). Each
  program finds its start from seq_lens on the device (two vector passes in its prologue), so no
  host value depends on device data.
* One CTA = one producer warp + one consumer warpgroup (warp specialisation). The producer issues,
  per tile, one TMA box per KV page (block_size rows, or 64 rows of a larger page) for K and for V,
  plus the item's query rows, into a ring of STAGES shared-memory stages completed on mbarriers.
  Page indices and the next request's length are loaded one tile ahead, so the producer never waits
  on a load of the tile it issues.
* The consumer computes S^T = K . Q^T with wgmma (M = 64 tokens, N = NP = 8 query-head columns: the
  GQA group, padded; A = K and B = Q^T straight from the TMA buffers), the online softmax on the
  [64, 8] fp32 tile (the max over tokens is one cross-warp reduction per tile; the sum is kept per
  thread and reduced once per item), writes P^T to shared memory and accumulates O^T = V^T . P^T
  with a second wgmma (A = V^T: a transposed view of the V buffer). So the tensor cores do the
  arithmetic and a 32 KB tile (bf16, D=128) costs a few hundred warp-instructions.
* FP8 (e4m3) KV: k_cache = K / k_scale, v_cache = V / v_scale (per-tensor scales, as vLLM's
  --kv-cache-dtype fp8). q is quantised to e4m3 per (request, head) row by a small Triton kernel
  (scale = amax / 448) and S^T is one fp8 wgmma (K read by the tensor cores as fp8: half the bytes).
  wgmma takes fp8 only K-major, and V^T is not, so the consumer widens each V tile to fp16 in shared
  memory (exact: every e4m3 value is an fp16 value) and the PV product runs in fp16. A 64-token fp8
  tile is half a bf16 tile's bytes for about the same per-tile chain of waits, barriers and
  wgmmas, so two options (HopperDecodeConfig) lengthen what each chain carries or shorten it:
  fp8_tile_tokens=128 (two 64-row wgmmas per product, the whole chain over twice the bytes) and
  pipeline_pv (_consumer_fp8_pipelined: a tile's PV wgmma runs on under the next tile's QK
  product and V widening, with P and the widened V double-buffered).
* An item (r, h) fully inside one program's range is written normalised to `out`. One cut by a range
  boundary leaves an unnormalised partial (acc, m, l): slot 1 of the program where it starts, slot 0
  of each later program covering it; the combine kernel (decode_attention_plan.merge) merges them.

Gluon's API moves between Triton releases: this module imports it inside a guard and `available()`
says whether the kernel can be used (Triton 3.6 on a CUDA device of compute capability 9.x).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton

from nanoflow.kernels import decode_attention_plan as plan
from nanoflow.kernels.decode_attention_hopper_parts import NP  # noqa: F401 - query-head columns per item

try:  # Gluon is experimental: its module layout differs between Triton releases
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any failure just disables this kernel
    gluon = gl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

TESTED_TRITON = ("3.6",)
"""Triton releases whose Gluon API this kernel was written and checked against."""

BLOCK_T = 64   # tokens per tile (bf16; fp8: HopperDecodeConfig.fp8_tile_tokens): the wgmma M dimension
MAX_GROUP = NP


@dataclasses.dataclass(frozen=True)
class HopperDecodeConfig:
    """Launch configuration."""

    stages: int = 4
    """Shared-memory ring depth (tiles in flight per CTA); bf16 D=128: 33 KB per stage."""
    ctas_per_sm: int = 2
    """CTAs per SM of the persistent grid (each: one producer warp + one consumer warpgroup)."""
    max_registers: int = 128
    """Register cap per thread (8 warps' worth of registers are allocated per CTA)."""
    producer_registers: int = 48
    """Registers per thread of the producer warp (setmaxnreg)."""
    fp8_tile_tokens: int = 64
    """KV tokens per tile with an fp8 cache (64 or 128; bf16 tiles are always 64): a 128-token tile
    is two 64-row wgmmas per product, so the per-tile fixed costs (barrier waits, the softmax max
    reduction, page-index loads) are spread over twice the bytes."""
    pipeline_pv: bool = False
    """fp8: leave each tile's PV wgmma running under the next tile's QK product and V widening
    (P and the widened V double-buffered), so its latency leaves the per-tile chain. Broken: it wrote
    NaN on an H100 (2026-12-07; tests/gpu/test_decode_hopper.py keeps a strict xfail), do not use.
    A suspect is fixed since, not yet run on a GPU: the stage was released before all warps had
    widened its V (the fixed kernel compiles for sm_90a with Triton 3.6, no spills)."""

    def __post_init__(self):
        if not 2 <= self.stages <= 8:
            raise ValueError(f"stages must be in 2..8, got {self.stages}")
        if self.ctas_per_sm < 1:
            raise ValueError(f"ctas_per_sm must be >= 1, got {self.ctas_per_sm}")
        if self.pipeline_pv and self.fp8_tile_tokens != 64:
            raise ValueError("pipeline_pv needs fp8_tile_tokens=64 (its double buffers would not fit)")
        if self.fp8_tile_tokens not in (64, 128):
            raise ValueError(f"fp8_tile_tokens must be 64 or 128, got {self.fp8_tile_tokens}")

    @classmethod
    def parse(cls, text: str) -> "HopperDecodeConfig":
        """From 'ctas_per_sm/stages/max_registers[/fp8_tile_tokens[/pipeline_pv 0|1]]', e.g. '2/3/128'."""
        parts = text.strip().split("/")
        if not 3 <= len(parts) <= 5 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"a Hopper decode config is ctas_per_sm/stages/max_registers[/fp8_tile_tokens"
                             f"[/pipeline_pv]] in whole numbers, e.g. 2/3/128; got {text!r}")
        ctas, stages, regs, *rest = (int(p) for p in parts)
        return cls(stages=stages, ctas_per_sm=ctas, max_registers=regs,
                   fp8_tile_tokens=rest[0] if rest else 64, pipeline_pv=bool(rest[1]) if len(rest) > 1 else False)

    def tile_tokens(self, fp8: bool) -> int:
        """KV tokens per tile for this cache dtype."""
        return self.fp8_tile_tokens if fp8 else BLOCK_T


def _triton_ok() -> bool:
    return any(triton.__version__.startswith(v) for v in TESTED_TRITON)


@functools.lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def available(device: torch.device) -> bool:
    """Whether the kernel may run on `device`: not turned off (NANOFLOW_HOPPER_DECODE=0), Gluon
    imported, a tested Triton, a Hopper GPU (results on an H100: benchmarks/README.md)."""
    if os.environ.get("NANOFLOW_HOPPER_DECODE", "1") == "0":
        return False
    if device.type != "cuda" or _IMPORT_ERROR is not None or not _triton_ok():
        return False
    return _device_ok(device.index if device.index is not None else torch.cuda.current_device())


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """None if the shapes / dtypes are supported, else the reason they are not."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"q dtype {q.dtype}"
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        return f"cache dtype {k_cache.dtype} with q {q.dtype}"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim}"
    if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        return f"GQA group {num_heads}/{num_kv_heads}"
    if block_size < 8 or block_size & (block_size - 1):
        return f"block_size {block_size}"
    if not k_cache.is_contiguous():
        return "non-contiguous cache"
    return None


if gluon is not None:
    from nanoflow.kernels.decode_attention_hopper_parts import (_advance, _consumer_fp8_pipelined, _finish_item,
                                                                 _page_rows, _plan_start)
    _NP = gl.constexpr(NP)

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, qbuf, kbuf, vbuf, ready, empty, bt_ptr, lens_ptr,
                  num_requests, stride_bt, r, h, t, n, length, next_len, num_tiles,
                  NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                  BLOCK_SIZE: gl.constexpr, BT: gl.constexpr, STAGES: gl.constexpr, KSPLIT: gl.constexpr):
        BOX: gl.constexpr = BT if BLOCK_SIZE > BT else BLOCK_SIZE
        NBOX: gl.constexpr = BT // BOX
        NBOX_P: gl.constexpr = NBOX if NBOX > 1 else 2
        KW: gl.constexpr = HEAD_DIM // KSPLIT  # columns per box
        STAGE_BYTES: gl.constexpr = (q_desc.block_type.nbytes + 2 * k_desc.block_type.nbytes * NBOX) * KSPLIT
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        jj = gl.arange(0, NBOX_P, layout=lay)
        rows = _page_rows(bt_ptr, stride_bt, r, t, length, num_requests, BLOCK_SIZE, BT, BOX, NBOX_P)
        cur_r = r
        cur_h = h
        for k in range(num_tiles):
            r, h, t, n, length, next_len = _advance(r, h, t, n, length, next_len, lens_ptr, num_requests,
                                                    NUM_KV_HEADS, BT)
            nrows = _page_rows(bt_ptr, stride_bt, r, t, length, num_requests, BLOCK_SIZE, BT, BOX, NBOX_P)
            stage = k % STAGES
            mbarrier.wait(empty.index(stage), ((k // STAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, STAGE_BYTES)
            qrow = (cur_r * NUM_KV_HEADS + cur_h) * GROUP
            for s in gl.static_range(KSPLIT):
                tma.async_copy_global_to_shared(q_desc, [qrow, s * KW], bar, qbuf.index(stage * KSPLIT + s))
            col = cur_h * HEAD_DIM
            for j in gl.static_range(NBOX):
                row = gl.sum(gl.where(jj == j, rows, 0), 0)
                for s in gl.static_range(KSPLIT):
                    tma.async_copy_global_to_shared(k_desc, [row, col + s * KW], bar,
                                                    kbuf.index(stage * KSPLIT + s).slice(j * BOX, BOX))
                    tma.async_copy_global_to_shared(v_desc, [row, col + s * KW], bar,
                                                    vbuf.index(stage * KSPLIT + s).slice(j * BOX, BOX))
            rows = nrows
            cur_r = r
            cur_h = h

    @gluon.jit
    def _consumer(qbuf, kbuf, vbuf, pbuf, v16buf, ready, empty, lens_ptr, qscale_ptr, out_ptr,
                  part_o_ptr, part_ml_ptr, part_id_ptr, num_requests, stride_or, stride_oh,
                  score_scale, out_scale, pid, r, h, t, n, length, next_len, num_tiles,
                  NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                  BT: gl.constexpr, STAGES: gl.constexpr, KSPLIT: gl.constexpr, FP8: gl.constexpr,
                  num_warps: gl.constexpr):
        KW: gl.constexpr = HEAD_DIM // KSPLIT
        NH: gl.constexpr = HEAD_DIM // 64  # O^T row blocks of 64 (wgmma M)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, _NP, 32 if FP8 else 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, _NP, 16])
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        pv_dtype: gl.constexpr = gl.float16 if FP8 else kbuf.dtype
        tok = gl.arange(0, BT, layout=row_s)
        g_s = gl.arange(0, _NP, layout=col_s)
        m_i = gl.full([_NP], float("-inf"), gl.float32, col_s)
        l_i = gl.zeros([BT, _NP], gl.float32, s_layout)
        acc0 = gl.zeros([64, _NP], gl.float32, o_layout)
        acc1 = gl.zeros([64, _NP], gl.float32, o_layout)
        item = r * NUM_KV_HEADS + h
        own = t == 0
        slot0 = gl.where(num_tiles == 0, -2, gl.where(own, -1, item))
        slot1 = gl.to_tensor(-1)
        if FP8:
            qs = gl.load(qscale_ptr + item * GROUP + g_s, mask=(g_s < GROUP) & (r < num_requests), other=0.0)
            next_qs = gl.load(qscale_ptr + (item + 1) * GROUP + g_s,
                              mask=(g_s < GROUP) & (item + 1 < num_requests * NUM_KV_HEADS), other=0.0)
            col_scale = qs * score_scale
        else:
            col_scale = gl.full([_NP], 1.0, gl.float32, col_s) * score_scale
        cvt_layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [num_warps, 1], [1, 0])
        for k in range(num_tiles):
            stage = k % STAGES
            mbarrier.wait(ready.index(stage), (k // STAGES) & 1)
            m_i = gl.where(t == 0, float("-inf"), m_i)
            # S^T = K . Q^T: [BT tokens, _NP heads]
            s = gl.zeros([BT, _NP], gl.float32, s_layout)
            for sp in gl.static_range(KSPLIT):
                s = warpgroup_mma(kbuf.index(stage * KSPLIT + sp),
                                  qbuf.index(stage * KSPLIT + sp).permute((1, 0)), s,
                                  use_acc=sp > 0, is_async=True)
            if FP8:
                # widen V to fp16 in shared memory while the QK product runs
                for sp in gl.static_range(NH):
                    v8 = vbuf.index(stage).slice(sp * 64, 64, dim=1).load(cvt_layout)
                    v16buf.index(sp).store(v8.to(gl.float16))
            s = warpgroup_mma_wait(0, deps=(s,))
            s = s * col_scale[None, :]
            s = gl.where((t * BT + tok < length)[:, None], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 0))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(s - m_safe[None, :])
            l_i = l_i * alpha[None, :] + p
            pbuf.store(gl.permute(p.to(pv_dtype), (1, 0)))
            fence_async_shared()
            gl.thread_barrier()
            alpha_o = gl.convert_layout(alpha, col_o)
            acc0 = acc0 * alpha_o[None, :]
            if NH == 2:
                acc1 = acc1 * alpha_o[None, :]
            if FP8:
                acc0 = warpgroup_mma(v16buf.index(0).permute((1, 0)), pbuf.permute((1, 0)), acc0, is_async=True)
                if NH == 2:
                    acc1 = warpgroup_mma(v16buf.index(1).permute((1, 0)), pbuf.permute((1, 0)), acc1,
                                         is_async=True)
            else:
                acc0 = warpgroup_mma(vbuf.index(stage * KSPLIT).permute((1, 0)), pbuf.permute((1, 0)), acc0,
                                     is_async=True)
                if NH == 2:
                    acc1 = warpgroup_mma(vbuf.index(stage * KSPLIT + 1).permute((1, 0)), pbuf.permute((1, 0)),
                                         acc1, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
            mbarrier.arrive(empty.index(stage), count=1)
            m_i = m_new
            last = t == n - 1
            if last or k == num_tiles - 1:
                slot1 = _finish_item(acc0, acc1, l_i, m_i, own, last, r, h, item, pid, slot1, out_ptr, part_o_ptr,
                                     part_ml_ptr, stride_or, stride_oh, out_scale, GROUP, HEAD_DIM,
                                     s_layout, o_layout)
            r, h, t, n, length, next_len = _advance(r, h, t, n, length, next_len, lens_ptr, num_requests,
                                                    NUM_KV_HEADS, BT)
            own = own | (t == 0)
            item = r * NUM_KV_HEADS + h
            if t == 0:
                if FP8:
                    col_scale = next_qs * score_scale
                    next_qs = gl.load(qscale_ptr + (item + 1) * GROUP + g_s,
                                      mask=(g_s < GROUP) & (item + 1 < num_requests * NUM_KV_HEADS), other=0.0)
        gl.store(part_id_ptr + pid * 2, slot0)
        gl.store(part_id_ptr + pid * 2 + 1, slot1)

    # Batch-dependent ints and row-sliced metadata pointers must not pick a new specialisation (a
    # mid-run compile of this kernel costs about a second).
    @gluon.jit(do_not_specialize=["num_requests", "stride_bt", "row0"],
               do_not_specialize_on_alignment=["bt_ptr", "lens_ptr", "num_requests", "stride_bt", "row0"])
    def _decode_kernel(q_desc, k_desc, v_desc, bt_ptr, lens_ptr, qscale_ptr, out_ptr,
                       part_o_ptr, part_ml_ptr, part_id_ptr, nrows_ptr,
                       num_requests, row0, stride_bt, stride_or, stride_oh, score_scale, out_scale,
                       NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                       BLOCK_SIZE: gl.constexpr, STAGES: gl.constexpr, FP8: gl.constexpr,
                       BLOCK_R: gl.constexpr, ROWS_FROM_DEVICE: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                       BT: gl.constexpr, PIPE: gl.constexpr, num_warps: gl.constexpr):
        KSPLIT: gl.constexpr = 1 if FP8 else HEAD_DIM // 64
        KW: gl.constexpr = HEAD_DIM // KSPLIT
        if ROWS_FROM_DEVICE:  # CUDA-graph form: rows row0.. below the device's count are the requests
            num_requests = gl.minimum(gl.maximum(gl.load(nrows_ptr) - row0, 0), num_requests)
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        r, h, t, n, length, next_len, num_tiles = _plan_start(lens_ptr, num_requests, pid, nprog, NUM_KV_HEADS,
                                                              BT, BLOCK_R, num_warps)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, KW], k_desc.dtype)
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_NP, KW], q_desc.dtype)
        kbuf = gl.allocate_shared_memory(k_desc.dtype, [STAGES * KSPLIT, BT, KW], kv_layout)
        vbuf = gl.allocate_shared_memory(v_desc.dtype, [STAGES * KSPLIT, BT, KW], kv_layout)
        qbuf = gl.allocate_shared_memory(q_desc.dtype, [STAGES * KSPLIT, _NP, KW], q_layout)
        pv_dtype: gl.constexpr = gl.float16 if FP8 else k_desc.dtype
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_NP, BT], pv_dtype)
        v16_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, 64], gl.float16)
        if PIPE:
            pbuf = gl.allocate_shared_memory(pv_dtype, [2, _NP, BT], p_layout)
        else:
            pbuf = gl.allocate_shared_memory(pv_dtype, [_NP, BT], p_layout)
        if PIPE:
            v16buf = gl.allocate_shared_memory(gl.float16, [2 * (HEAD_DIM // 64), BT, 64], v16_layout)
        elif FP8:
            v16buf = gl.allocate_shared_memory(gl.float16, [HEAD_DIM // 64, BT, 64], v16_layout)
        else:  # unused
            v16buf = gl.allocate_shared_memory(gl.float16, [1, 8, 64], v16_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        if PIPE:
            gl.warp_specialize([
                (_consumer_fp8_pipelined, (
                    qbuf, kbuf, vbuf, pbuf, v16buf, ready, empty, lens_ptr, qscale_ptr, out_ptr, part_o_ptr,
                    part_ml_ptr, part_id_ptr, num_requests, stride_or, stride_oh, score_scale, out_scale, pid, r, h,
                    t, n, length, next_len, num_tiles, NUM_KV_HEADS, GROUP, HEAD_DIM, BT, STAGES, num_warps)),
                (_producer, (q_desc, k_desc, v_desc, qbuf, kbuf, vbuf, ready, empty, bt_ptr, lens_ptr,
                             num_requests, stride_bt, r, h, t, n, length, next_len, num_tiles,
                             NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE, BT, STAGES, KSPLIT)),
            ], [1], [PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (
                    qbuf, kbuf, vbuf, pbuf, v16buf, ready, empty, lens_ptr, qscale_ptr, out_ptr, part_o_ptr,
                    part_ml_ptr, part_id_ptr, num_requests, stride_or, stride_oh, score_scale, out_scale, pid, r, h,
                    t, n, length, next_len, num_tiles, NUM_KV_HEADS, GROUP, HEAD_DIM, BT, STAGES, KSPLIT, FP8,
                    num_warps)),
                (_producer, (q_desc, k_desc, v_desc, qbuf, kbuf, vbuf, ready, empty, bt_ptr, lens_ptr,
                             num_requests, stride_bt, r, h, t, n, length, next_len, num_tiles,
                             NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE, BT, STAGES, KSPLIT)),
            ], [1], [PRODUCER_REGS])


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float8_e4m3fn: "float8e4nv"}


def _gl_dtype(dtype: torch.dtype):
    return getattr(gl, _GL_DTYPES[dtype])


_BLOCK_R = 512
"""Requests per chunk of the in-kernel work split (it loops over chunks)."""


def _descriptor(t2d: torch.Tensor, box: list[int]):
    layout = gl.NVMMASharedLayout.get_default_for(box, _gl_dtype(t2d.dtype))
    return TensorDescriptor(t2d, list(t2d.shape), list(t2d.stride()), box, layout)


BF16_DEFAULT_CONFIG = HopperDecodeConfig(stages=3)
"""The configuration a bf16 / fp16 cache runs with when none is given: 3 stages (103 KB of shared
memory per CTA at D=128, offline compile) let both CTAs of an SM be resident; 4 stages (137 KB) fit one,
so half the persistent grid ran as a second wave. 2 CTAs x 3 stages is the configuration the H100
bandwidth table measured (2988 / 2964 / 2884 GB/s on 64 / 48 / 40 SMs; 1 CTA x 6 stages: 2983 / 2510 /
2099)."""

FP8_DEFAULT_CONFIG = HopperDecodeConfig(stages=2, ctas_per_sm=4, max_registers=64)
"""The configuration an fp8 cache runs with when none is given: 4 CTAs x 2 stages, 64 registers. On an
H100 (2026-12-07, benchmarks/README.md) its tokens/s against the bf16 default were 1.81x on 132 SMs and
1.67x on 64 (geometric mean of two workloads); the old 2 CTAs x 4 stages: 1.77x / 1.42x. More CTAs per
SM keep more TMA loads in flight, which the fp8 tile's shorter compute cannot hide otherwise."""


CONFIG_ENV = {True: "NANOFLOW_HOPPER_FP8_CONFIG", False: "NANOFLOW_HOPPER_BF16_CONFIG"}
"""Environment variables that override the default per cache dtype (HopperDecodeConfig.parse's form),
for tuning a new device end to end without editing the defaults."""


@functools.lru_cache(maxsize=8)
def _parsed(text: str, variable: str) -> HopperDecodeConfig:
    try:
        return HopperDecodeConfig.parse(text)
    except ValueError as err:
        raise ValueError(f"{variable}: {err}") from None


def default_config(fp8: bool) -> HopperDecodeConfig:
    """The launch configuration used when none is given, per cache dtype (CONFIG_ENV overrides it)."""
    text = os.environ.get(CONFIG_ENV[fp8], "").strip()
    if text:
        return _parsed(text, CONFIG_ENV[fp8])
    return FP8_DEFAULT_CONFIG if fp8 else BF16_DEFAULT_CONFIG


def num_programs_for(num_sms: int, config: HopperDecodeConfig | None = None, fp8: bool = False) -> int:
    return (config or default_config(fp8)).ctas_per_sm * num_sms


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_sms: int | None = None,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    config: HopperDecodeConfig | None = None,
    num_rows: torch.Tensor | None = None,
    row0: int = 0,
) -> torch.Tensor:
    """q [R, Hq, D]; caches [num_blocks, block_size, Hk, D] (q's dtype, or e4m3 holding K / k_scale
    and V / v_scale); block_tables [R, max_blocks] int32; seq_lens [R] int32. Returns [R, Hq, D].

    num_sms: SMs the kernel may use (its persistent grid is config.ctas_per_sm per SM); None = all
    of the device. Pass the partition's size when launching on a green-context stream.
    num_rows / row0 (CUDA-graph form): the R rows given are rows row0.. of a batch whose first
    num_rows[0] rows (an int32 device scalar) are decode rows; only those are computed and the
    other rows of `out` are left as they are, so the launch depends on no device value."""
    from nanoflow.kernels.decode_attention import check_decode_args  # noqa: PLC0415 - avoids a cycle
    if gluon is None:
        raise RuntimeError(f"Gluon is not available: {_IMPORT_ERROR}")
    reason = supports(q, k_cache)
    if reason is not None:
        raise ValueError(f"unsupported by the Hopper decode kernel: {reason}")
    if v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape or not v_cache.is_contiguous():
        raise ValueError("v_cache must match k_cache (shape, dtype, contiguous)")
    q, out = check_decode_args(q, k_cache, v_cache, block_tables, out)
    num_requests, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if num_requests == 0:
        return out
    if num_rows is not None and (num_rows.dtype != torch.int32 or num_rows.numel() < 1
                                 or num_rows.device != q.device):
        raise ValueError("num_rows must be an int32 tensor on q's device")
    if row0 < 0:
        raise ValueError(f"row0 must be >= 0, got {row0}")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    cfg = config or default_config(fp8)
    if seq_lens.dtype != torch.int32 or block_tables.dtype != torch.int32:  # the kernel reads int32
        seq_lens, block_tables = seq_lens.to(torch.int32), block_tables.to(torch.int32)
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    nprog = cfg.ctas_per_sm * num_sms
    group = num_heads // num_kv_heads
    ksplit = 1 if fp8 else head_dim // 64
    kw = head_dim // ksplit
    tile = cfg.tile_tokens(fp8)
    box = min(block_size, tile)
    rows = num_blocks * block_size
    k_desc = _descriptor(k_cache.view(rows, num_kv_heads * head_dim), [box, kw])
    v_desc = _descriptor(v_cache.view(rows, num_kv_heads * head_dim), [box, kw])
    if fp8:
        q_src, q_scales = plan.quantize_q(q)
    else:
        q_src = q if q.is_contiguous() else q.contiguous()
        q_scales = seq_lens  # unused
    q_desc = _descriptor(q_src.view(num_requests * num_heads, head_dim), [NP, kw])
    dev = q.device
    part_o = torch.empty((nprog, 2, group, head_dim), dtype=torch.float32, device=dev)
    part_ml = torch.empty((nprog, 2, group, 2), dtype=torch.float32, device=dev)
    part_id = torch.empty((nprog, 2), dtype=torch.int32, device=dev)
    block_r = _BLOCK_R  # fixed: a batch-dependent constexpr would compile one kernel per size
    _decode_kernel[(nprog,)](
        q_desc, k_desc, v_desc, block_tables, seq_lens, q_scales, out, part_o, part_ml, part_id,
        seq_lens if num_rows is None else num_rows,  # unread without a device-side count
        num_requests, row0, block_tables.stride(0), out.stride(0), out.stride(1),
        float(scale * 1.4426950408889634 * k_scale), float(v_scale),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        STAGES=cfg.stages, FP8=fp8, BLOCK_R=block_r,
        ROWS_FROM_DEVICE=num_rows is not None, PRODUCER_REGS=cfg.producer_registers, BT=tile,
        PIPE=fp8 and cfg.pipeline_pv,
        num_warps=4, maxnreg=cfg.max_registers,
    )
    return plan.merge(part_o, part_ml, part_id, out, num_kv_heads)
