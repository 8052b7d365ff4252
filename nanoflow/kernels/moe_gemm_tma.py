"""The grouped GEMM's TMA path (Hopper): persistent programs, tensor descriptors, one flattened pipeline.

The same two products as moe_gemm's pointer kernels, built like the dense persistent GEMM that matches
cuBLAS on the H200 (gemm_persistent: 784 against 776 TFLOP/s): every operand tile arrives by a TMA
descriptor load, and the tile loop and the K loop form one software pipeline (`flatten=True`), so the
next tile's loads overlap the current tile's epilogue.

- The activations are gathered into expert order first (`xs`, one row per padded row; padding rows
  copy token 0 and are never stored), so gate_up's A tiles are plain rectangles.
- The expert weights are one 2-D descriptor ([E * rows, K]); a tile of expert e starts at row
  e * rows. A tile that runs past an expert's last row reads the next expert's rows into output
  columns that the stores clip (gate_up: the descriptor of h ends at I columns; down: a masked store).
- Programs loop over the tiles of the blocks in use only: the count is read on the device
  (`used_blocks`), so no host sync and CUDA-graph capture stays possible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - old triton: the pointer path only
    TensorDescriptor = None

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def available() -> bool:
    return TensorDescriptor is not None


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0 for t in tensors)


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row blocks walk a column of tiles together (they mostly share an expert)."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % rows
    pid_n = (tile % per_group) // rows
    return pid_m, pid_n


@triton.jit
def _gate_up_silu_tma_kernel(
    xs_desc, w_desc, h_desc, block_expert_ptr, used_blocks_ptr, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """h[row, n] = silu(xs[row] . w[e, n]) * (xs[row] . w[e, N + n]) for the rows of every used block."""
    num_blocks = tl.load(used_blocks_ptr)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_blocks * num_pid_n, tl.num_programs(0), flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_blocks, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        off_m = pid_m * BLOCK_M
        row_gate = expert * (2 * N) + pid_n * BLOCK_N
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = xs_desc.load([off_m, ki * BLOCK_K])  # columns past K read as zeros
            g = w_desc.load([row_gate, ki * BLOCK_K])
            u = w_desc.load([row_gate + N, ki * BLOCK_K])
            acc_g = tl.dot(a, g.T, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, u.T, acc_u, input_precision=DOT_PRECISION)
        gate = acc_g.to(OUT_DTYPE).to(tl.float32)
        up = acc_u.to(OUT_DTYPE).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(OUT_DTYPE).to(tl.float32)
        h_desc.store([off_m, pid_n * BLOCK_N], (act * up).to(OUT_DTYPE))  # clipped at N columns


@triton.jit(do_not_specialize=["num_assignments"])
def _down_tma_kernel(
    h_desc, w_desc, y_ptr, sorted_ptr, block_expert_ptr, used_blocks_ptr, num_assignments, N, K,
    stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[ids[row]] = h[row] . w[e]^T for the rows of every used block (padding rows not stored)."""
    num_blocks = tl.load(used_blocks_ptr)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_blocks * num_pid_n, tl.num_programs(0), flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_blocks, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        off_m = pid_m * BLOCK_M
        row_w = expert * N + pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = h_desc.load([off_m, ki * BLOCK_K])
            b = w_desc.load([row_w, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
        ids = tl.load(sorted_ptr + off_m + tl.arange(0, BLOCK_M))
        valid = ids < num_assignments
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_y = tl.where(valid, ids, 0).to(tl.int64)
        y_ptrs = y_ptr + rows_y[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def used_blocks(block_expert: torch.Tensor) -> torch.Tensor:
    """[1] int32 on the device: how many blocks hold an expert's rows (they come first)."""
    return (block_expert >= 0).sum(dtype=torch.int32).reshape(1)


def gather_rows(x: torch.Tensor, sorted_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """[B * block_m, H]: each padded row's token row of x (padding rows: token 0's, never stored)."""
    num_assignments = x.shape[0] * top_k
    tokens = torch.where(sorted_ids < num_assignments, sorted_ids // top_k, 0)
    return x.index_select(0, tokens)


def gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor, sorted_ids: torch.Tensor,
                 block_expert: torch.Tensor, used: torch.Tensor, top_k: int, config, num_programs: int,
                 precision: str) -> torch.Tensor:
    """[B * block_m, I] = silu(gate) * up of every row of the used blocks (rows past them unwritten)."""
    num_experts, two_i, hidden = w_gate_up.shape
    inter = two_i // 2
    block_m, block_n, block_k = config.block_m, config.block_n, config.block_k
    xs = gather_rows(x, sorted_ids, top_k)
    h = torch.empty(xs.shape[0], inter, dtype=x.dtype, device=x.device)
    w2d = w_gate_up.reshape(num_experts * two_i, hidden)
    _gate_up_silu_tma_kernel[(num_programs,)](
        TensorDescriptor(xs, list(xs.shape), [xs.stride(0), 1], [block_m, block_k]),
        TensorDescriptor(w2d, list(w2d.shape), [w2d.stride(0), 1], [block_n, block_k]),
        TensorDescriptor(h, list(h.shape), [h.stride(0), 1], [block_m, block_n]),
        block_expert, used, inter, hidden,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config.group_m,
        DOT_PRECISION=precision, OUT_DTYPE=_TL_DTYPES[x.dtype],
        num_warps=config.num_warps, num_stages=config.num_stages)
    return h


def down(h: torch.Tensor, w_down: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
         used: torch.Tensor, num_assignments: int, config, num_programs: int,
         precision: str) -> torch.Tensor:
    """[T * k, H], row t * k + j = the down projection of that assignment's activation."""
    num_experts, hidden, inter = w_down.shape
    y = torch.empty(num_assignments, hidden, dtype=h.dtype, device=h.device)
    w2d = w_down.reshape(num_experts * hidden, inter)
    _down_tma_kernel[(num_programs,)](
        TensorDescriptor(h, list(h.shape), [h.stride(0), 1], [config.block_m, config.block_k]),
        TensorDescriptor(w2d, list(w2d.shape), [w2d.stride(0), 1], [config.block_n, config.block_k]),
        y, sorted_ids, block_expert, used, num_assignments, hidden, inter, y.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        DOT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages)
    return y
