"""Triton RMSNorm and fused residual-add + RMSNorm (same function as reference.rms_norm /
reference.fused_add_rms_norm).

One program per row; the row is held in registers (hidden sizes up to 65536). Rounding follows the
reference exactly: the sum x + residual is rounded to the residual dtype, the normalized row (fp32
math) is rounded to the input dtype, then multiplied by the weight in fp32 and rounded to
promote(weight, input) dtype, which is what torch's `weight * x_normed` does.

`out` / `residual_out` may be given (e.g. slices of persistent buffers); passing `out=x` or
`residual_out=residual` is safe (each element is read before it is written, by the same program).

rms_norm also takes a strided 3-D [T, H, D] view (unit stride along D) as x and out without a copy:
one program per (token, head). Qwen3 normalises each q / k head this way in place in the qkv buffer,
whose head rows are not evenly spaced ([T, H*D] column slices of a wider row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    x_stride, res_stride, out_stride, res_out_stride,
    x_head_stride, out_head_stride, heads,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row, head = pid // heads, pid % heads  # heads = 1 for 2-D inputs
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * x_stride + head * x_head_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * res_out_stride + offs, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / hidden
    xn = x * tl.rsqrt(var + eps)
    if HAS_RESIDUAL:
        xn = xn.to(res_out_ptr.dtype.element_ty).to(tl.float32)
    else:
        xn = xn.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + head * out_head_stride + offs, (xn * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """A 2-D [rows, hidden] view with unit stride along hidden (copies only if it must)."""
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_out(out: torch.Tensor, shape: torch.Size, dtype: torch.dtype, name: str) -> torch.Tensor:
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"{name} must have shape {tuple(shape)} and dtype {dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    out2 = out.view(-1, shape[-1]) if out.is_contiguous() else out
    if out2.dim() != 2 or out2.stride(-1) != 1:
        raise ValueError(f"{name} must be 2-D with unit last stride or contiguous")
    return out2


def _heads_view(x: torch.Tensor) -> bool:
    """x is a 3-D [T, H, D] view the kernel reads in place (strided rows and heads, unit stride along D)."""
    return x.dim() == 3 and x.stride(-1) == 1 and not x.is_contiguous()


def _launch_heads(x, weight, eps, out):
    """rms_norm of a strided [T, H, D] view: one program per (token, head), no copy of x."""
    hidden = x.shape[-1]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.shape != x.shape or out.dtype != out_dtype or out.dim() != 3 or out.stride(-1) != 1:
        raise ValueError(f"out must be a [T, H, D] view with unit last stride, shape {tuple(x.shape)} and dtype "
                         f"{out_dtype}, got {tuple(out.shape)} {out.dtype}")
    rows = x.shape[0] * x.shape[1]
    if rows > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x, x, weight.contiguous(), out, out,
            x.stride(0), 0, out.stride(0), 0,
            x.stride(1), out.stride(1), x.shape[1],
            hidden, eps,
            HAS_RESIDUAL=False, BLOCK=block,
            num_warps=max(1, min(16, block // 512)),
        )
    return out


def _launch(x, residual, weight, eps, out, residual_out):
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} > {_MAX_HIDDEN} is not supported by the Triton norm")
    x2 = _rows(x, hidden)
    weight = weight.contiguous()
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        res_dtype = torch.promote_types(x.dtype, residual.dtype)
        r2 = _rows(residual, hidden)
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=res_dtype, device=x.device)
        ro2 = _check_out(residual_out, x.shape, res_dtype, "residual_out")
        norm_in_dtype = res_dtype
    else:
        r2, ro2, norm_in_dtype = x2, x2, x.dtype
    out_dtype = torch.promote_types(weight.dtype, norm_in_dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    o2 = _check_out(out, x.shape, out_dtype, "out")
    rows = x2.shape[0]
    if rows > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, o2, ro2,
            x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
            0, 0, 1,
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=max(1, min(16, block // 512)),
        )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim; output dtype promote(weight, x). A strided [T, H, D] x (and out) is
    normalised per head in place of the strides (no copy)."""
    if _heads_view(x):
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
        if x.shape[-1] > _MAX_HIDDEN:
            raise ValueError(f"hidden size {x.shape[-1]} > {_MAX_HIDDEN} is not supported by the Triton norm")
        return _launch_heads(x, weight, eps, out)
    return _launch(x, None, weight, eps, out, None)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) in one pass over the row."""
    return _launch(x, residual, weight, eps, out, residual_out)
