"""Which decode kernel runs: the Hopper (Gluon) kernel where it is available and correct, else the
Triton split-KV / persistent kernels (triton_ops falls back to them).

"Correct" is checked once per device and cache dtype at first use: the Hopper kernel runs a small
random problem (ragged contexts, items cut between programs) and must match the split-KV kernel
(relative error < 1e-2 for 16-bit caches; fp8 caches: < 5e-2, since q is quantised to e4m3). A
failure, or any exception, disables it for that process with a warning.
On by default where available; NANOFLOW_HOPPER_DECODE=0 turns it off (a hang, unlike a wrong
result, would not be caught by the self-check). Measured on an H100 (benchmarks/README.md): as
fast as split-KV on the whole device with bf16 KV, keeps ~95% of it on 40-64 SMs, and with fp8 KV
the engine runs 512:1024 at 20.7k tokens/s where split-KV did not finish in 100 s.
"""
from __future__ import annotations

import functools
import warnings

import torch

from nanoflow.kernels import decode_attention_hopper as hopper

_SELF_CHECK_TOL = {False: 1e-2, True: 5e-2}


def _stream_sms(device: torch.device) -> int | None:
    """SMs of the current stream's green context, None for an ordinary stream (or no cuda-python)."""
    try:
        from nanoflow.pipeline.sm_partition import _driver  # noqa: PLC0415
        driver = _driver()
        if driver is None:
            return None
        return _green_ctx_sms(torch.cuda.current_stream(device).cuda_stream)
    except Exception:  # noqa: BLE001 - no green contexts here
        return None


@functools.lru_cache(maxsize=64)
def _green_ctx_sms(stream_handle: int) -> int | None:
    from nanoflow.pipeline.sm_partition import _driver  # noqa: PLC0415
    driver = _driver()
    status, ctx = driver.cuStreamGetGreenCtx(stream_handle)
    if status != driver.CUresult.CUDA_SUCCESS or not int(ctx):
        return None
    status, res = driver.cuGreenCtxGetDevResource(ctx, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    if status != driver.CUresult.CUDA_SUCCESS:
        return None
    return int(res.sm.smCount)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


@functools.lru_cache(maxsize=None)
def _self_check(index: int, q_dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int) -> bool:
    from nanoflow.kernels import decode_attention as split_kv  # noqa: PLC0415
    device = torch.device("cuda", index)
    gen = torch.Generator(device=device).manual_seed(7)
    block, hk, group = 16, 2, 4
    lens = torch.tensor([1, 63, 64, 65, 700, 2000, 0, 130], dtype=torch.int32, device=device)
    blocks = (lens + block - 1) // block
    table = torch.zeros(len(lens), int(blocks.max()), dtype=torch.int32, device=device)
    num_blocks = int(blocks.sum()) + 1
    perm = torch.randperm(num_blocks - 1, device=device, generator=gen).to(torch.int32) + 1
    used = torch.arange(table.shape[1], device=device)[None, :] < blocks[:, None]
    table[used] = perm
    kc = torch.randn(num_blocks, block, hk, head_dim, device=device, generator=gen).to(cache_dtype)
    vc = torch.randn(num_blocks, block, hk, head_dim, device=device, generator=gen).to(cache_dtype)
    q = torch.randn(len(lens), hk * group, head_dim, device=device, generator=gen).to(q_dtype)
    try:
        want = split_kv.paged_decode_attention(q, kc, vc, table, lens, head_dim ** -0.5)
        got = hopper.paged_decode_attention(q, kc, vc, table, lens, head_dim ** -0.5, num_sms=3,
                                            out=torch.full_like(q, float("nan")))
        err = _rel_err(got, want)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        warnings.warn(f"Hopper decode kernel disabled: {type(exc).__name__}: {exc}", stacklevel=3)
        return False
    fp8 = cache_dtype == torch.float8_e4m3fn
    if not err < _SELF_CHECK_TOL[fp8]:
        warnings.warn(f"Hopper decode kernel disabled: self-check error {err:.2e} ({cache_dtype})", stacklevel=3)
        return False
    return True


def use_hopper(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether triton_ops should run the Hopper kernel for these arguments."""
    if not hopper.available(q.device) or hopper.supports(q, k_cache) is not None:
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return _self_check(index, q.dtype, k_cache.dtype, q.shape[-1])


def hopper_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, *, out=None, max_programs=None,
                  k_scale=1.0, v_scale=1.0, num_rows=None, row0=0):
    """The Hopper kernel on max_programs SMs (an SM budget), else on the current stream's green
    context's SMs, else on the whole device. num_rows / row0: its CUDA-graph form (rows below a
    device-side count)."""
    num_sms = max_programs if max_programs is not None else _stream_sms(q.device)
    return hopper.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, num_sms=num_sms,
                                         out=out, k_scale=k_scale, v_scale=v_scale, num_rows=num_rows,
                                         row0=row0)
