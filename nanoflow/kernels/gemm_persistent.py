"""Persistent Triton GEMM whose grid is an SM budget: out = a @ b_t.T (+ bias).

NanoFlow runs a GEMM beside decode attention with each kernel on a share of the SMs. cuBLAS takes
the whole GPU (its SM carveout was erratic on the H200), so GEMM nano-ops with a budget use this
kernel: the launch grid is exactly `num_programs` programs (the hardware places them on distinct SMs
while SMs are free) and each program loops over output tiles pid, pid + P, pid + 2P, ... in grouped
order (GROUP_M row tiles share a column of B while they are in L2). The tile loop and the K loop are
one flattened software pipeline (`tl.range(..., flatten=True)`), so the loads of the next tile
overlap the epilogue of the current one.

Two load paths: TMA tensor descriptors (Hopper and newer; the default on CUDA) and plain pointers
(any GPU and the interpreter). a [M, K] and b_t [N, K] (a Linear weight) are row-major; out [M, N]
may be a row slice of a larger buffer (only its rows are written: TMA clips at its shape). bf16 /
fp16 with fp32 accumulation; fp32 inputs multiply in full precision (tests).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - old triton: pointer path only
    TensorDescriptor = None


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile BLOCK_M x BLOCK_N, K step BLOCK_K; num_stages K steps in flight through shared memory
    ((BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes each at bf16, plus the BLOCK_M x BLOCK_N epilogue tile
    for TMA stores; 227 KB per SM on sm_90). tma=None: TMA on CUDA when available, else pointers."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    tma: bool | None = None

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.group_m < 1:
            raise ValueError(f"group_m must be >= 1, got {self.group_m}")

    def describe(self) -> str:
        tma = {None: "auto", True: "tma", False: "ptr"}[self.tma]
        return f"{self.block_m}x{self.block_n}x{self.block_k} w={self.num_warps} st={self.num_stages} {tma}"


# The sweep's candidates (docs/research/overlap-budgeted-kernels/overlap_gpu.py). Shared memory at bf16: 144 KB + 64 KB
# epilogue, 128 + 32, 160 + 32, 96 + 32 (the last two: many small tiles, for budgets whose wave
# count the big tile quantizes badly, e.g. N=4096 at 100 programs).
CONFIGS = (
    GemmConfig(128, 256, 64, num_warps=8, num_stages=3),
    GemmConfig(128, 128, 64, num_warps=8, num_stages=4),
    GemmConfig(128, 128, 64, num_warps=4, num_stages=5),
    GemmConfig(128, 128, 128, num_warps=8, num_stages=3),
)


def _waves(config: GemmConfig, m: int, n: int, num_programs: int) -> int:
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    return triton.cdiv(tiles, num_programs)


def choose_config(m: int, n: int, k: int, num_programs: int) -> GemmConfig:
    """The big tile (best per-SM throughput) unless its last wave leaves many programs idle: cost =
    waves x tile area / relative speed (128x128 tiles assumed 10% slower per flop; a guess that the
    H200 sweep in docs/research/overlap-budgeted-kernels/overlap_gpu.py checks)."""
    big, small = CONFIGS[0], CONFIGS[1]
    cost_big = _waves(big, m, n, num_programs) * big.block_m * big.block_n
    cost_small = _waves(small, m, n, num_programs) * small.block_m * small.block_n / 0.9
    return big if cost_big <= cost_small else small


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles walk a column of tiles together (B columns reused in L2)."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % rows
    pid_n = (tile % per_group) // rows
    return pid_m, pid_n


@triton.jit(do_not_specialize=["M"])  # M = the nano-batch's token count: no re-compile per batch
def _gemm_tma_kernel(
    a_desc, b_desc, c_desc, bias_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    start = tl.program_id(0)
    step = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(start, num_pid_m * num_pid_n, step, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])   # out-of-bounds rows / columns read as zeros
            b = b_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([off_m, off_n], acc.to(OUT_DTYPE))


@triton.jit(do_not_specialize=["M"])  # M = the nano-batch's token count: no re-compile per batch
def _gemm_ptr_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
    stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    start = tl.program_id(0)
    step = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(start, num_pid_m * num_pid_n, step, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Clamp rather than mask the rows: loads stay unmasked (vectorized); extra rows are not stored.
        rows_a = tl.max_contiguous(tl.multiple_of(tl.where(offs_m < M, offs_m, 0), BLOCK_M), BLOCK_M)
        rows_b = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), BLOCK_N), BLOCK_N)
        a_ptrs = a_ptr + rows_a.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + rows_b.to(tl.int64)[:, None] * stride_bn + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_mask = offs_k[None, :] < K - ki * BLOCK_K
                a = tl.load(a_ptrs, mask=k_mask, other=0.0)
                b = tl.load(b_ptrs, mask=k_mask, other=0.0)
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def _use_tma(config: GemmConfig, *tensors: torch.Tensor) -> bool:
    if config.tma is not None:
        if config.tma and TensorDescriptor is None:
            raise ValueError("GemmConfig(tma=True) needs triton.tools.tensor_descriptor (triton >= 3.4)")
        if config.tma and not _tma_compatible(*tensors):
            raise ValueError("GemmConfig(tma=True) needs 16-byte aligned bases and row strides")
        return config.tma
    device = tensors[0].device
    return (TensorDescriptor is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9 and _tma_compatible(*tensors))


def persistent_matmul(
    a: torch.Tensor,
    b_t: torch.Tensor,
    *,
    num_programs: int,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """a [M, K] @ b_t[N, K].T (+ bias [N]) -> [M, N] in a's dtype, on exactly `num_programs` programs.

    out: optional [M, N] destination with contiguous rows (e.g. a row slice of a step buffer).
    config: tiles / warps / stages / load path; None = choose_config(M, N, K, num_programs).
    """
    if num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    if a.dim() != 2 or b_t.dim() != 2 or a.shape[1] != b_t.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} and b_t {tuple(b_t.shape)} must be [M, K] and [N, K]")
    if a.dtype != b_t.dtype or a.dtype not in _TL_DTYPES:
        raise ValueError(f"a and b_t must share a dtype in {list(_TL_DTYPES)}: {a.dtype}, {b_t.dtype}")
    m, k = a.shape
    n = b_t.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    elif out.shape != (m, n) or out.dtype != a.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {a.dtype} with contiguous rows, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] vector, got {tuple(bias.shape)}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
    a = a if a.stride(1) == 1 else a.contiguous()
    b_t = b_t if b_t.stride(1) == 1 else b_t.contiguous()
    cfg = config or choose_config(m, n, k, num_programs)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    bias_arg = bias if bias is not None else out  # unused when HAS_BIAS is False
    meta = dict(HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m, DOT_PRECISION=precision, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    if _use_tma(cfg, a, b_t, out):
        a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [cfg.block_m, cfg.block_k])
        b_desc = TensorDescriptor(b_t, [n, k], [b_t.stride(0), 1], [cfg.block_n, cfg.block_k])
        c_desc = TensorDescriptor(out, [m, n], [out.stride(0), 1], [cfg.block_m, cfg.block_n])
        _gemm_tma_kernel[(num_programs,)](a_desc, b_desc, c_desc, bias_arg, m, n, k,
                                          OUT_DTYPE=_TL_DTYPES[out.dtype], **meta)
    else:
        _gemm_ptr_kernel[(num_programs,)](
            a, b_t, out, bias_arg, m, n, k, a.stride(0), b_t.stride(0), out.stride(0),
            EVEN_K=k % cfg.block_k == 0, **meta)
    return out
