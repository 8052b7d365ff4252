"""Host-side pieces of the Hopper decode kernel (decode_attention_hopper), in plain Triton / torch so
they run anywhere, the CPU interpreter included:

* `program_ranges`: the stream-K split of the work (tiles of 64 tokens over (request, KV head))
  into P contiguous ranges, as the kernel's prologue computes it on the device.
* `emulate_partials`: what the kernel writes for a given split (direct outputs and partials), in
  torch, tile by tile. Tests use it to check the split and the merge against the reference.
* `merge`: the combine step, a Triton kernel over the partial workspace.
* `quantize_q`: q -> e4m3 with one scale per (request, head) row (amax / 448), for the fp8 path.

Partial workspace of a launch with P programs, group G, head dim D:
  part_o [P, 2, G, D] fp32 (unnormalised sum of p * v, times the output scale),
  part_ml [P, 2, G, 2] fp32 (running max in log2 units, sum of p),
  part_id [P, 2] int32: the item (r * Hk + h) in slot 0 (the item the range starts inside, begun by
  an earlier program) and slot 1 (the item the range begins and cuts at its end); -1 = none,
  -2 in slot 0 = the program had no tiles (the merge skips over it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoflow.kernels.rope import _round_e4m3

TILE = 64
FP8_MAX = 448.0


def tiles_per_request(seq_lens: torch.Tensor) -> torch.Tensor:
    """Tiles per (request, KV head): an empty context still gets one (fully masked) tile."""
    return torch.clamp((seq_lens.long() + TILE - 1) // TILE, min=1)


def program_ranges(seq_lens: torch.Tensor, num_kv_heads: int, num_programs: int) -> list[tuple[int, int, int, int]]:
    """(r0, h0, t0, num_tiles) of each program: the first tile of its range and the range's length."""
    n = tiles_per_request(seq_lens).tolist()
    work = sum(n) * num_kv_heads
    out = []
    for p in range(num_programs):
        lo, hi = p * work // num_programs, (p + 1) * work // num_programs
        before, r = 0, 0
        while r < len(n) and (before + n[r]) * num_kv_heads <= lo:
            before += n[r]
            r += 1
        if r == len(n):
            out.append((r, 0, 0, 0))
            continue
        off = lo - before * num_kv_heads
        out.append((r, off // n[r], off % n[r], hi - lo))
    return out


def _tile_scores(q, k_cache, v_cache, table, length, h, group, t, scale):
    """Scores (log2 units) and V rows of tile t of request r's KV head h: [G, 64], [64, D]."""
    block_size = k_cache.shape[1]
    pos = torch.arange(t * TILE, (t + 1) * TILE)
    valid = pos < length
    safe = torch.clamp(pos, max=max(length - 1, 0))
    pages = table[safe // block_size].long()
    k = k_cache[pages, safe % block_size, h].float()
    v = v_cache[pages, safe % block_size, h].float()
    s = (q[h * group:(h + 1) * group].float() @ k.T) * (scale * 1.4426950408889634)
    return s.masked_fill(~valid[None, :], float("-inf")), v


def emulate_partials(q, k_cache, v_cache, block_tables, seq_lens, scale, num_programs, *, out_scale=1.0):
    """The kernel's writes for `num_programs` programs, computed in torch: (out, part_o, part_ml,
    part_id). `out` holds the items finished inside one program (other rows are zero)."""
    num_requests, num_heads, head_dim = q.shape
    hk = k_cache.shape[2]
    group = num_heads // hk
    n = tiles_per_request(seq_lens).tolist()
    lens = seq_lens.tolist()
    out = torch.zeros(q.shape, dtype=torch.float32)
    part_o = torch.zeros(num_programs, 2, group, head_dim)
    part_ml = torch.zeros(num_programs, 2, group, 2)
    part_id = torch.full((num_programs, 2), -1, dtype=torch.int32)
    for p, (r, h, t, count) in enumerate(program_ranges(seq_lens, hk, num_programs)):
        if count == 0:
            part_id[p, 0] = -2
            continue
        own = t == 0
        if not own:
            part_id[p, 0] = r * hk + h
        m = torch.full((group,), float("-inf"))
        l = torch.zeros(group)
        acc = torch.zeros(group, head_dim)
        for k in range(count):
            if t == 0:
                m = torch.full((group,), float("-inf"))
            s, v = _tile_scores(q[r], k_cache, v_cache, block_tables[r], lens[r], h, group, t, scale)
            m_new = torch.maximum(m, s.max(1).values)
            m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
            alpha = torch.exp2(m - m_safe)
            pr = torch.exp2(s - m_safe[:, None])
            l = l * alpha + pr.sum(1)
            acc = acc * alpha[:, None] + pr @ v
            m = m_new
            last = t == n[r] - 1
            if last or k == count - 1:
                if own and last:
                    inv = torch.where(l > 0, out_scale / torch.where(l > 0, l, 1.0), 0.0)
                    out[r, h * group:(h + 1) * group] = acc * inv[:, None]
                else:
                    slot = int(own)
                    part_o[p, slot] = acc * out_scale
                    part_ml[p, slot, :, 0] = m
                    part_ml[p, slot, :, 1] = l
                    if own:
                        part_id[p, 1] = r * hk + h
            t += 1
            if t == n[r]:
                t, h = 0, h + 1
                own = True
                if h == hk:
                    h, r = 0, r + 1
    return out, part_o, part_ml, part_id


@triton.jit(do_not_specialize=["num_programs"])
def _merge_kernel(part_o_ptr, part_ml_ptr, part_id_ptr, out_ptr, num_programs, stride_or, stride_oh,
                  NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0)
    item = tl.load(part_id_ptr + p * 2 + 1)
    if item >= 0:
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < GROUP
        mask = g_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        rec = (p * 2 + 1) * GROUP + offs_g
        m = tl.load(part_ml_ptr + rec * 2, mask=g_ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + rec * 2 + 1, mask=g_ok, other=0.0)
        acc = tl.load(part_o_ptr + rec[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        q = p + 1
        go = q < num_programs
        while go:
            other = tl.load(part_id_ptr + q * 2)
            if other == item:
                rq = (q * 2) * GROUP + offs_g
                mq = tl.load(part_ml_ptr + rq * 2, mask=g_ok, other=float("-inf"))
                lq = tl.load(part_ml_ptr + rq * 2 + 1, mask=g_ok, other=0.0)
                aq = tl.load(part_o_ptr + rq[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], mask=mask,
                             other=0.0)
                m_new = tl.maximum(m, mq)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                a = tl.exp2(m - m_safe)
                b = tl.exp2(mq - m_safe)
                acc = acc * a[:, None] + aq * b[:, None]
                l = l * a + lq * b
                m = m_new
            go = (q + 1 < num_programs) & ((other == item) | (other == -2))
            q += 1
        r = item // NUM_KV_HEADS
        h = item % NUM_KV_HEADS
        res = acc / tl.where(l > 0.0, l, 1.0)[:, None]
        ptrs = out_ptr + r.to(tl.int64) * stride_or + (h * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
        tl.store(ptrs, res.to(out_ptr.dtype.element_ty), mask=mask)


def merge(part_o: torch.Tensor, part_ml: torch.Tensor, part_id: torch.Tensor, out: torch.Tensor,
          num_kv_heads: int) -> torch.Tensor:
    """Writes the items cut between programs into out [R, Hq, D] (the others are left as they are)."""
    num_programs, _, group, head_dim = part_o.shape
    _merge_kernel[(num_programs,)](
        part_o, part_ml, part_id, out, num_programs, out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=max(2, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )
    return out


@triton.jit(do_not_specialize=["num_rows"], do_not_specialize_on_alignment=["num_rows"])
def _quantize_kernel(q_ptr, q8_ptr, scale_ptr, num_rows, stride_row,
                     HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-30) / 448.0
    y = _round_e4m3(x / scale[:, None])  # exact e4m3 values: the cast below does not round
    tl.store(q8_ptr + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], y.to(q8_ptr.dtype.element_ty),
             mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < num_rows)


def quantize_q(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, Hq, D] -> (e4m3 [R, Hq, D] contiguous, fp32 scales [R, Hq]) with q ~ q8 * scale."""
    num_requests, num_heads, head_dim = q.shape
    rows = num_requests * num_heads
    q2 = q.reshape(rows, head_dim)
    q8 = torch.empty((num_requests, num_heads, head_dim), dtype=torch.float8_e4m3fn, device=q.device)
    scales = torch.empty((num_requests, num_heads), dtype=torch.float32, device=q.device)
    if rows:
        block_rows = 16
        _quantize_kernel[(triton.cdiv(rows, block_rows),)](
            q2, q8, scales, rows, q2.stride(0), HEAD_DIM=head_dim, BLOCK_ROWS=block_rows,
            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
    return q8, scales


def quantize_q_reference(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantisation in torch."""
    x = q.float()
    scales = x.abs().amax(-1).clamp_min(1e-30) / FP8_MAX
    return (x / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales
