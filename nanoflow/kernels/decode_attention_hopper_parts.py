"""Gluon device functions of the Hopper decode kernel (decode_attention_hopper) that its partitions
share: the stream-K plan and walk (_plan_start, _advance), a tile's page rows, the output write, and
the fp8 consumer with the PV product pipelined across tiles (HopperDecodeConfig.pipeline_pv).

Imported by decode_attention_hopper only when Gluon imports (Triton 3.6's API)."""
from __future__ import annotations

try:  # Gluon is experimental: its module layout differs between Triton releases
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)
except Exception:  # noqa: BLE001 - decode_attention_hopper reports the failure (available())
    gluon = gl = None

NP = 8
"""Query-head columns per item (the GQA group, padded): the wgmma N dimension."""

if gluon is not None:
    _NP = gl.constexpr(NP)

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _tiles(length, BT: gl.constexpr):
        return gl.maximum((length + BT - 1) // BT, 1)

    @gluon.jit
    def _plan_start(lens_ptr, num_requests, pid, nprog, NUM_KV_HEADS: gl.constexpr, BT: gl.constexpr,
                    BLOCK_R: gl.constexpr, num_warps: gl.constexpr):
        """This program's tile range: (r0, h0, t0, n0, len0, next_len, L) of its first tile."""
        lay: gl.constexpr = gl.BlockedLayout([BLOCK_R // (32 * num_warps)], [32], [num_warps], [0])
        offs = gl.arange(0, BLOCK_R, layout=lay)
        total = gl.to_tensor(0)
        for c in range(0, num_requests, BLOCK_R):
            ok = c + offs < num_requests
            n = gl.where(ok, _tiles(gl.load(lens_ptr + c + offs, mask=ok, other=0), BT), 0)
            total += gl.sum(n, 0)
        work = total.to(gl.int64) * NUM_KV_HEADS
        t_lo = pid.to(gl.int64) * work // nprog
        t_hi = (pid.to(gl.int64) + 1) * work // nprog
        run = gl.to_tensor(0)
        count = gl.to_tensor(0)
        before = gl.to_tensor(0)
        for c in range(0, num_requests, BLOCK_R):
            ok = c + offs < num_requests
            n = gl.where(ok, _tiles(gl.load(lens_ptr + c + offs, mask=ok, other=0), BT), 0)
            incl = gl.associative_scan(n, 0, _add) + run
            full = ok & (incl.to(gl.int64) * NUM_KV_HEADS <= t_lo)
            count += gl.sum(full.to(gl.int32), 0)
            before += gl.sum(gl.where(full, n, 0), 0)
            run += gl.sum(n, 0)
        r0 = count
        len0 = gl.load(lens_ptr + r0, mask=r0 < num_requests, other=0)
        n0 = _tiles(len0, BT)
        off = (t_lo - before.to(gl.int64) * NUM_KV_HEADS).to(gl.int32)
        h0 = off // n0
        t0 = off % n0
        next_len = gl.load(lens_ptr + r0 + 1, mask=r0 + 1 < num_requests, other=0)
        return r0, h0, t0, n0, len0, next_len, (t_hi - t_lo).to(gl.int32)

    @gluon.jit
    def _advance(r, h, t, n, length, next_len, lens_ptr, num_requests, NUM_KV_HEADS: gl.constexpr,
                 BT: gl.constexpr):
        """The walk's next tile (and the length of the request after the next one, prefetched)."""
        t += 1
        if t == n:
            t = 0
            h += 1
            if h == NUM_KV_HEADS:
                h = 0
                r += 1
                length = next_len
                n = _tiles(length, BT)
                next_len = gl.load(lens_ptr + r + 1, mask=r + 1 < num_requests, other=0)
        return r, h, t, n, length, next_len

    @gluon.jit
    def _page_rows(bt_ptr, stride_bt, r, t, length, num_requests, BLOCK_SIZE: gl.constexpr, BT: gl.constexpr,
                   BOX: gl.constexpr, NBOX_P: gl.constexpr):
        """Cache rows (page * block_size + offset) of the tile's TMA boxes; boxes past the context
        read the request's last page (their tokens are masked)."""
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        j = gl.arange(0, NBOX_P, layout=lay)
        last = gl.maximum(length - 1, 0)
        tok = gl.minimum(t * BT + j * BOX, last)
        page = gl.load(bt_ptr + r.to(gl.int64) * stride_bt + tok // BLOCK_SIZE, mask=r < num_requests, other=0)
        return page * BLOCK_SIZE + tok % BLOCK_SIZE

    @gluon.jit
    def _write_item(acc_ptr, acc, rowscale, d_off, g, valid_g, stride_g, stride_d):
        ptrs = acc_ptr + g[None, :] * stride_g + d_off[:, None] * stride_d
        gl.store(ptrs, (acc * rowscale[None, :]).to(acc_ptr.dtype.element_ty),
                 mask=valid_g[None, :] & (d_off[:, None] >= 0))

    @gluon.jit
    def _finish_item(acc0, acc1, l_i, m_i, own, last, r, h, item, pid, slot1, out_ptr, part_o_ptr, part_ml_ptr,
                     stride_or, stride_oh, out_scale, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                     s_layout: gl.constexpr, o_layout: gl.constexpr):
        """Write an item's (or a range end's) accumulator: normalised to out if this program owns
        the whole item, else as a partial record; returns the updated slot-1 item id."""
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        g_s = gl.arange(0, _NP, layout=col_s)
        g_o = gl.arange(0, _NP, layout=col_o)
        d_o = gl.arange(0, 64, layout=row_o)
        valid_g = g_o < GROUP
        l_o = gl.convert_layout(gl.sum(l_i, 0), col_o)
        if own and last:
            inv = gl.where(l_o > 0.0, out_scale / l_o, 0.0)
            base = out_ptr + r.to(gl.int64) * stride_or + h * GROUP * stride_oh
            _write_item(base, acc0, inv, d_o, g_o, valid_g, stride_oh, 1)
            if HEAD_DIM == 128:
                _write_item(base + 64, acc1, inv, d_o, g_o, valid_g, stride_oh, 1)
        else:
            slot = own.to(gl.int32)
            rec = (pid * 2 + slot) * GROUP
            one = gl.full([_NP], out_scale, gl.float32, col_o)
            _write_item(part_o_ptr + rec.to(gl.int64) * HEAD_DIM, acc0, one, d_o, g_o, valid_g, HEAD_DIM, 1)
            if HEAD_DIM == 128:
                _write_item(part_o_ptr + rec.to(gl.int64) * HEAD_DIM + 64, acc1, one, d_o, g_o, valid_g,
                            HEAD_DIM, 1)
            ml = part_ml_ptr + (rec + g_s) * 2
            gl.store(ml, m_i, mask=g_s < GROUP)
            gl.store(ml + 1, gl.convert_layout(l_o, col_s), mask=g_s < GROUP)
            if own:
                slot1 = item
        return slot1

    @gluon.jit
    def _consumer_fp8_pipelined(qbuf, kbuf, vbuf, pbuf, v16buf, ready, empty, lens_ptr, qscale_ptr, out_ptr,
                                part_o_ptr, part_ml_ptr, part_id_ptr, num_requests, stride_or, stride_oh,
                                score_scale, out_scale, pid, r, h, t, n, length, next_len, num_tiles,
                                NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                                BT: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        """The fp8 consumer with tile k's PV wgmma left in flight until tile k+1's QK product is
        waited for: pbuf is [2, NP, BT] and v16buf [2 * NH, BT, 64] (tile k uses half k % 2); an
        item ending at tile k is written once that wait returns (at tile k+1, or after the loop).
        The stage is released once every warp has read its K (QK done) and widened its V: after the
        barrier that publishes P (2026-12-07: it was released right after the QK wait, before that
        barrier, a race with the producer's next TMA into the stage; the likely cause of the NaN the
        GPU test found, fix not yet run on a GPU)."""
        NH: gl.constexpr = HEAD_DIM // 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, _NP, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, _NP, 16])
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
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
        qs = gl.load(qscale_ptr + item * GROUP + g_s, mask=(g_s < GROUP) & (r < num_requests), other=0.0)
        next_qs = gl.load(qscale_ptr + (item + 1) * GROUP + g_s,
                          mask=(g_s < GROUP) & (item + 1 < num_requests * NUM_KV_HEADS), other=0.0)
        col_scale = qs * score_scale
        cvt_layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [num_warps, 1], [1, 0])
        # the previous tile's item (written once its PV product is waited for)
        w_last = False
        w_own = own
        w_r = r
        w_h = h
        w_item = item
        for k in range(num_tiles):
            stage = k % STAGES
            buf = k % 2
            mbarrier.wait(ready.index(stage), (k // STAGES) & 1)
            s = warpgroup_mma(kbuf.index(stage), qbuf.index(stage).permute((1, 0)),
                              gl.zeros([BT, _NP], gl.float32, s_layout), use_acc=False, is_async=True)
            for sp in gl.static_range(NH):  # widen V while the QK (and the last PV) product runs
                v8 = vbuf.index(stage).slice(sp * 64, 64, dim=1).load(cvt_layout)
                v16buf.index(buf * NH + sp).store(v8.to(gl.float16))
            s, acc0, acc1 = warpgroup_mma_wait(0, deps=(s, acc0, acc1))
            if w_last:
                slot1 = _finish_item(acc0, acc1, l_i, m_i, w_own, True, w_r, w_h, w_item, pid, slot1, out_ptr,
                                     part_o_ptr, part_ml_ptr, stride_or, stride_oh, out_scale, GROUP, HEAD_DIM,
                                     s_layout, o_layout)
            m_i = gl.where(t == 0, float("-inf"), m_i)
            s = s * col_scale[None, :]
            s = gl.where((t * BT + tok < length)[:, None], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 0))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(s - m_safe[None, :])
            l_i = l_i * alpha[None, :] + p
            pbuf.index(buf).store(gl.permute(p.to(gl.float16), (1, 0)))
            fence_async_shared()
            gl.thread_barrier()
            # Release the stage only here: one thread arrives, and before this barrier other warps may
            # still be widening this stage's V (the wgmma wait above does not synchronise warps).
            mbarrier.arrive(empty.index(stage), count=1)
            alpha_o = gl.convert_layout(alpha, col_o)
            acc0 = acc0 * alpha_o[None, :]
            if NH == 2:
                acc1 = acc1 * alpha_o[None, :]
            acc0 = warpgroup_mma(v16buf.index(buf * NH).permute((1, 0)), pbuf.index(buf).permute((1, 0)), acc0,
                                 is_async=True)
            if NH == 2:
                acc1 = warpgroup_mma(v16buf.index(buf * NH + 1).permute((1, 0)), pbuf.index(buf).permute((1, 0)),
                                     acc1, is_async=True)
            # no wait: both groups stay in flight (this only gives the loop-carried values their type)
            acc0, acc1 = warpgroup_mma_wait(NH, deps=(acc0, acc1))
            m_i = m_new
            w_last = t == n - 1
            w_own = own
            w_r = r
            w_h = h
            w_item = item
            r, h, t, n, length, next_len = _advance(r, h, t, n, length, next_len, lens_ptr, num_requests,
                                                    NUM_KV_HEADS, BT)
            own = own | (t == 0)
            item = r * NUM_KV_HEADS + h
            if t == 0:
                col_scale = next_qs * score_scale
                next_qs = gl.load(qscale_ptr + (item + 1) * GROUP + g_s,
                                  mask=(g_s < GROUP) & (item + 1 < num_requests * NUM_KV_HEADS), other=0.0)
        acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
        if num_tiles > 0:
            slot1 = _finish_item(acc0, acc1, l_i, m_i, w_own, w_last, w_r, w_h, w_item, pid, slot1, out_ptr,
                                 part_o_ptr, part_ml_ptr, stride_or, stride_oh, out_scale, GROUP, HEAD_DIM,
                                 s_layout, o_layout)
        gl.store(part_id_ptr + pid * 2, slot0)
        gl.store(part_id_ptr + pid * 2 + 1, slot1)
