"""Triton SiLU-and-mul (same function as reference.silu_and_mul): x [..., 2I] = [gate | up] ->
silu(gate) * up [..., I].

Rounding follows torch: silu is computed in fp32 and rounded to x's dtype, then the product is
computed in fp32 and rounded again. `out` may be given (e.g. a slice of a persistent buffer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + inter + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_stride + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:], [..., I], x's dtype."""
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"last dim of x must be even ([gate | up]), got {two_i}")
    inter = two_i // 2
    out_shape = (*x.shape[:-1], inter)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != out_shape or out.dtype != x.dtype:
        raise ValueError(f"out must have shape {out_shape} and dtype {x.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    o2 = out.view(-1, inter) if out.is_contiguous() else out
    if o2.dim() != 2 or o2.stride(-1) != 1:
        raise ValueError("out must be contiguous or 2-D with unit last stride")
    rows = x2.shape[0]
    if rows > 0 and inter > 0:
        grid = (rows, triton.cdiv(inter, _BLOCK))
        _silu_and_mul_kernel[grid](x2, o2, x2.stride(0), o2.stride(0), inter, BLOCK=_BLOCK, num_warps=4)
    return out
