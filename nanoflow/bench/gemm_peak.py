"""Dense GEMM peak (NanoFlow's C): the median of timed n x n x n matmuls on random data, after warm-up.

On CUDA each matmul is timed with CUDA events (n = 8192, bf16, as BENCHMARKING.md asks). On CPU an
8192^3 matmul takes seconds, so n is capped (`cpu_max_n`, and smaller still when the matmuls would take
longer than `cpu_max_seconds`), the caller passes the model's dtype (a bf16 peak against an fp32 model
gave "327% of optimal"), and the result is flagged `illustrative`: a % of optimal from it says little.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

MIN_TIMED_ITERS = 10
"""BENCHMARKING.md: the peak is the median of at least this many timed matmuls."""


@dataclass(frozen=True)
class GemmPeak:
    """A measured dense GEMM peak."""

    tflops: float
    """Median throughput of the timed matmuls, in TFLOP/s (2 n^3 flops per matmul)."""
    n: int
    """Matrix size actually used (M = N = K = n)."""
    iters: int
    """Timed matmuls (the median is over these)."""
    dtype: str
    """Element type of the matmuls."""
    device: str
    """Device the matmuls ran on."""
    device_name: str
    """GPU name (torch.cuda.get_device_name) or the CPU's description."""
    illustrative: bool
    """True when measured on CPU or below n = 8192: not the protocol's C, so % of optimal is only illustrative."""

    def to_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or a description of the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def measure_gemm_peak(device: torch.device | str, n: int = 8192, iters: int = 10,
                      dtype: torch.dtype = torch.bfloat16, warmup: int = 3,
                      cpu_max_n: int = 1024, cpu_max_seconds: float = 3.0) -> GemmPeak:
    """Median TFLOP/s of `iters` timed n^3 matmuls after `warmup` untimed ones. On CPU n is capped at
    cpu_max_n and halved (down to 64) until the matmuls are expected to take at most cpu_max_seconds."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if iters < MIN_TIMED_ITERS:
        raise ValueError(f"iters must be at least {MIN_TIMED_ITERS} (BENCHMARKING.md), got {iters}")
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1, got {warmup}")
    if device.type == "cpu":
        n = min(n, cpu_max_n)
    while True:
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, generator=generator, device=device, dtype=dtype)
        b = torch.randn(n, n, generator=generator, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)  # the first warm-up matmul, timed on CPU to bound the whole measurement
        one = time.perf_counter() - t0
        if device.type != "cpu" or n <= 64 or one * (warmup + iters) <= cpu_max_seconds:
            break
        n //= 2
    for _ in range(warmup - 1):
        torch.matmul(a, b, out=c)
    seconds = _time_cuda(a, b, c, iters) if device.type == "cuda" else _time_host(a, b, c, iters)
    flops = 2.0 * n ** 3
    tflops = flops / statistics.median(seconds) / 1e12
    del a, b, c
    return GemmPeak(tflops=tflops, n=n, iters=iters, dtype=str(dtype).removeprefix("torch."),
                    device=str(device), device_name=device_name(device),
                    illustrative=device.type != "cuda" or n < 8192)


def measure_gemm_peak_tflops(device: torch.device | str, n: int = 8192, iters: int = 10) -> float:
    """The median bf16 GEMM TFLOP/s (see measure_gemm_peak; on CPU a small-n, illustrative figure)."""
    return measure_gemm_peak(device, n=n, iters=iters).tflops


def _time_cuda(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, iters: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    with torch.cuda.device(a.device):
        torch.cuda.synchronize()
        for start, end in zip(starts, ends):
            start.record()
            torch.matmul(a, b, out=c)
            end.record()
        torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]


def _time_host(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, iters: int) -> list[float]:
    seconds = []
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        seconds.append(time.perf_counter() - t0)
    return seconds
