"""Triton RoPE fused with the paged KV-cache write (same function as reference.rope_and_cache_write).

Neox rotate-half rotary embedding; cos_sin [max_pos, D] holds [cos | sin] (any llama3 scaling is
already baked in). One program per token rotates all q heads, rotates all k heads and writes the
rotated k and the untouched v to cache row `slot_mapping[t]` (slot = block * block_size + offset).

q, k, v may be strided views (e.g. column slices of the fused qkv output) as long as the head dim is
contiguous. A negative slot skips the cache write for that token (padding rows of a CUDA graph); the
reference has no such case, callers that use the reference must not pass negative slots.
`q_out` may be given (e.g. a slice of a persistent buffer).

FP8 KV cache (k_cache / v_cache of dtype torch.float8_e4m3fn, scale 1.0): rotated k (rounded to k's
dtype first, as the reference) and v are clamped to +-448 (saturating cast, never NaN) and rounded
to nearest even on the e4m3 grid, i.e. exactly `x.clamp(-448, 448).to(torch.float8_e4m3fn)`. The
rounding is done in fp32 arithmetic (`_round_e4m3`) before the cast, so the cast only sees exact
e4m3 values: the result is bit-identical on the GPU and in Triton's interpreter (whose own fp8
rounding is wrong: ties away from zero and a lost mantissa carry). Other cache dtypes: plain cast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_e4m3(x):
    """fp32 -> the nearest float8_e4m3fn value (ties to even; saturating at +-448), still in fp32.
    Exact: the quantum 2^(e - 3) (e = max(exponent, -6): subnormals) is a power of two and the
    rounding of x / quantum (|.| <= 16) to an integer is the fp32 add-and-subtract of 1.5 * 2^23."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    e = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    quantum = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    r = (x / quantum + 12582912.0) - 12582912.0
    return tl.where(r == 0.0, x * 0.0, r * quantum)  # x * 0.0 keeps the sign of zero


@triton.jit
def _to_cache(x, cache_ptr, scale):
    """Casts x to the cache's element type; fp8 e4m3 caches hold x / scale, saturated and rounded to
    nearest even (16/32-bit caches ignore scale: the wrapper only allows 1.0 there)."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = _round_e4m3(x.to(tl.float32) / scale)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _rotate(x_ptr, tok_off, stride_h, num_heads, offs_h, offs_d, half, cos, sin):
    """Loads [BLOCK_H, BLOCK_HALF] halves of x and returns the rotated halves in fp32."""
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < half)
    base = x_ptr + tok_off + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + half, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, mask


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, qo_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cs, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_qot, stride_qoh,
    num_q_heads, num_kv_heads, half, block_size, k_scale, v_scale,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < half
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + half + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]

    offs_hq = tl.arange(0, BLOCK_HQ)
    q1, q2, qmask = _rotate(q_ptr, t * stride_qt, stride_qh, num_q_heads, offs_hq, offs_d, half, cos, sin)
    qo = qo_ptr + t * stride_qot + offs_hq[:, None] * stride_qoh + offs_d[None, :]
    tl.store(qo, q1.to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(qo + half, q2.to(qo_ptr.dtype.element_ty), mask=qmask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        offs_hk = tl.arange(0, BLOCK_HK)
        k1, k2, kmask = _rotate(k_ptr, t * stride_kt, stride_kh, num_kv_heads, offs_hk, offs_d, half,
                                cos, sin)
        # Round to k's dtype first (the reference returns rotated k in k's dtype, then casts).
        k1 = _to_cache(k1.to(k_ptr.dtype.element_ty), kc_ptr, k_scale)
        k2 = _to_cache(k2.to(k_ptr.dtype.element_ty), kc_ptr, k_scale)
        kc = kc_ptr + blk * stride_kcb + off * stride_kcs + offs_hk[:, None] * stride_kch + offs_d[None, :]
        tl.store(kc, k1, mask=kmask)
        tl.store(kc + half, k2, mask=kmask)
        vsrc = v_ptr + t * stride_vt + offs_hk[:, None] * stride_vh + offs_d[None, :]
        vc = vc_ptr + blk * stride_vcb + off * stride_vcs + offs_hk[:, None] * stride_vch + offs_d[None, :]
        tl.store(vc, _to_cache(tl.load(vsrc, mask=kmask, other=0.0), vc_ptr, v_scale), mask=kmask)
        tl.store(vc + half, _to_cache(tl.load(vsrc + half, mask=kmask, other=0.0), vc_ptr, v_scale),
                 mask=kmask)


_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def check_kv_scales(k_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Per-tensor KV scales: positive and finite; other than 1.0 only for an fp8 cache."""
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (value > 0.0 and value < float("inf")):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
        if value != 1.0 and k_cache.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{name} {value} needs an fp8 KV cache (got {k_cache.dtype})")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_and_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Rotates q and k, writes rotated k and v into the paged cache at slot_mapping (an fp8 cache
    holds k / k_scale and v / v_scale). Returns rotated q [T, Hq, D] (q's dtype)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2 or cos_sin.shape[-1] != head_dim:
        raise ValueError(f"head_dim must be even and match cos_sin's last dim, got {head_dim} "
                         f"and {cos_sin.shape[-1]}")
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, Hk, D]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q_out is None:
        q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    elif q_out.shape != q.shape or q_out.dtype != q.dtype or q_out.stride(-1) != 1:
        raise ValueError("q_out must match q's shape and dtype with a contiguous head dim")
    if num_tokens == 0:
        return q_out
    q, k, v, cos_sin = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(cos_sin)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV cache head dim must be contiguous")
    if k_cache.dtype not in _CACHE_DTYPES or v_cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"unsupported KV cache dtype {k_cache.dtype} / {v_cache.dtype}")
    check_kv_scales(k_cache, k_scale, v_scale)
    kc, vc = k_cache, v_cache
    half = head_dim // 2
    _rope_cache_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin, kc, vc, slot_mapping, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        q_out.stride(0), q_out.stride(1),
        num_q_heads, num_kv_heads, half, k_cache.shape[1], float(k_scale), float(v_scale),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
    return q_out
