"""The token-to-expert sort of the grouped GEMM in three Triton launches (moe_reference.moe_align in torch
takes ~30 small kernels per layer: at decode, under CUDA graphs, their launches cost more than the sort).

1. histogram: each program counts its chunk of the T*k assignments per expert and adds the counts to a
   global [E] vector (atomics).
2. plan (one program): each expert's rows padded to whole blocks of block_m, their prefix sums (where
   each expert's blocks start), the expert of every block (-1 past the last) and the number of blocks
   in use (the TMA path's loop bound).
3. scatter: each assignment takes the next free row of its expert's blocks (an atomic cursor per expert).

The layout is moe_align's except for the order of the assignments inside an expert's blocks, which the
atomics leave to the hardware. The grouped GEMM's rows do not depend on it: each output row is the dot
products of that row alone, and the down kernel stores it at its assignment's index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoflow.kernels.moe_reference import max_aligned_blocks

_CHUNK = 1024


@triton.jit(do_not_specialize=["n"])
def _histogram_kernel(ids_ptr, counts_ptr, n, NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr,
                      CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    experts = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    counts = tl.histogram(experts, E_PAD, mask=mask)
    bins = tl.arange(0, E_PAD)
    tl.atomic_add(counts_ptr + bins, counts, mask=(bins < NUM_EXPERTS) & (counts > 0))


@triton.jit(do_not_specialize=["num_blocks"])
def _plan_kernel(counts_ptr, start_ptr, block_expert_ptr, used_ptr, num_blocks, NUM_EXPERTS: tl.constexpr,
                 E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_B: tl.constexpr):
    bins = tl.arange(0, E_PAD)
    valid = bins < NUM_EXPERTS
    counts = tl.load(counts_ptr + bins, mask=valid, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    tl.store(start_ptr + bins, end - padded, mask=valid)
    tl.store(used_ptr, tl.sum(padded, 0) // BLOCK_M)
    for b0 in range(0, num_blocks, CHUNK_B):
        blocks = b0 + tl.arange(0, CHUNK_B)
        # a block's expert: how many experts' padded rows end at or before the block's first row
        expert = tl.sum((end[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blocks, tl.where(expert < NUM_EXPERTS, expert, -1), mask=blocks < num_blocks)


@triton.jit(do_not_specialize=["n"])
def _scatter_kernel(ids_ptr, start_ptr, cursor_ptr, sorted_ptr, n, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    experts = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    rank = tl.atomic_add(cursor_ptr + experts, 1, mask=mask)
    start = tl.load(start_ptr + experts, mask=mask, other=0)
    tl.store(sorted_ptr + start + rank, offs.to(tl.int32), mask=mask)


def moe_align_fused(topk_ids: torch.Tensor, num_experts: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_reference.moe_align's (sorted_ids [B * block_m] int32, block_expert [B] int32) plus the
    number of blocks in use ([1] int32), all on topk_ids' device and without a host sync."""
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    dev = flat.device
    num_blocks = max_aligned_blocks(n, num_experts, block_m)
    sorted_ids = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    # counts [E], cursors [E], block starts [E], used [1] in one buffer: one memset
    scratch = torch.zeros(3 * num_experts + 1, dtype=torch.int32, device=dev)
    counts, cursor = scratch[:num_experts], scratch[num_experts:2 * num_experts]
    start, used = scratch[2 * num_experts:3 * num_experts], scratch[3 * num_experts:]
    if n == 0:
        block_expert.fill_(-1)
        return sorted_ids, block_expert, used
    e_pad = max(16, triton.next_power_of_2(num_experts))
    grid = (triton.cdiv(n, _CHUNK),)
    _histogram_kernel[grid](flat, counts, n, NUM_EXPERTS=num_experts, E_PAD=e_pad, CHUNK=_CHUNK)
    _plan_kernel[(1,)](counts, start, block_expert, used, num_blocks, NUM_EXPERTS=num_experts, E_PAD=e_pad,
                       BLOCK_M=block_m, CHUNK_B=max(16, 8192 // e_pad))
    _scatter_kernel[grid](flat, start, cursor, sorted_ids, n, CHUNK=_CHUNK)
    return sorted_ids, block_expert, used
