"""The Triton kernels under the reference names (see reference.py for the functions they compute).

Every function takes the reference's positional arguments; extras are keyword-only with defaults:
`out=` (all), `residual_out=` (fused_add_rms_norm), `q_out=` (rope_and_cache_write), and the SM-budget
knobs of the attention kernels (`max_programs`, decode's `num_splits` / `max_seq_len` / `config`).
"""
from __future__ import annotations

import torch

from nanoflow.kernels.activation import silu_and_mul
from nanoflow.kernels import decode_attention as _split_kv
from nanoflow.kernels import decode_attention_dispatch as _dispatch
from nanoflow.kernels import decode_attention_persistent as _persistent
from nanoflow.kernels.norm import fused_add_rms_norm, rms_norm
from nanoflow.kernels.prefill_attention import paged_prefill_attention
from nanoflow.kernels.prefill_attention_graph import paged_prefill_attention_rows
from nanoflow.kernels.rope import rope_and_cache_write
from nanoflow.kernels.moe_gemm import moe_experts



def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, *, out=None,
                           max_programs: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                           **kwargs):
    """On Hopper (when the Gluon kernel is available and passed its self-check): the TMA / wgmma
    kernel, on max_programs SMs if given, else on the SMs of the stream's green context (or the whole
    device). Elsewhere: split-KV decode on the whole device; with an SM budget, the persistent
    stream-K kernel whose grid is the budget. k_scale / v_scale: per-tensor fp8 KV scales."""
    if not kwargs and _dispatch.use_hopper(q, k_cache):
        return _dispatch.hopper_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out=out,
                                       max_programs=max_programs, k_scale=k_scale, v_scale=v_scale)
    if k_scale != 1.0 or v_scale != 1.0:
        out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale * k_scale, out=out,
                                     max_programs=max_programs, **kwargs)
        return out.mul_(v_scale)
    if max_programs is None:
        return _split_kv.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                out=out, **kwargs)
    return _persistent.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                              num_programs=max_programs, out=out)


def paged_decode_attention_rows(q, k_cache, v_cache, block_tables, seq_lens, scale, *, num_rows, row0, out,
                                max_programs: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0):
    """CUDA-graph form (reference.paged_decode_attention_rows), computing only the rows below the
    device-side count num_rows: the Hopper kernel where paged_decode_attention would run it, else the
    persistent stream-K kernel; either on a fixed grid for max_programs SMs (an SM budget or a green
    context's SMs; default: every SM)."""
    if _dispatch.use_hopper(q, k_cache):
        return _dispatch.hopper_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out=out,
                                       max_programs=max_programs, k_scale=k_scale, v_scale=v_scale,
                                       num_rows=num_rows, row0=row0)
    if v_scale != 1.0:  # a scaled output would need a masked multiply: not needed (the engine's scales are 1)
        raise ValueError("paged_decode_attention_rows supports v_scale 1.0 only")
    programs = max_programs or _split_kv.num_sms(q.device)
    return _persistent.paged_decode_attention_rows(q, k_cache, v_cache, block_tables, seq_lens, scale * k_scale,
                                                   num_rows=num_rows, row0=row0, num_programs=programs, out=out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None, sm_budget: int | None = None) -> torch.Tensor:
    """cuBLAS on the whole device; with an SM budget, the persistent Triton GEMM on that many SMs."""
    if sm_budget is None:
        from nanoflow.kernels.reference import linear as torch_linear
        return torch_linear(x, weight, bias, out=out)
    from nanoflow.kernels.gemm_persistent import persistent_matmul
    return persistent_matmul(x, weight, num_programs=sm_budget, out=out, bias=bias)


__all__ = ["linear", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope_and_cache_write",
           "paged_decode_attention", "paged_prefill_attention", "moe_experts",
           "paged_decode_attention_rows", "paged_prefill_attention_rows"]
