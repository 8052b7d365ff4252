"""Mixture of experts: routing, the token-to-expert sort, and the plain-torch reference of the experts.

Shapes: T tokens, H hidden, E experts, I expert width (per gate / up projection), k experts per token.
Expert weights are stacked like Linear weights: w_gate_up [E, 2I, H] (rows 0:I gate, I:2I up) and
w_down [E, H, I], which is also how transformers >= 5 holds them in memory.

`route` and `moe_align` are torch code shared by every path (they do no heavy work and are the
bookkeeping the grouped GEMM needs); `moe_experts` here is the reference of the Triton grouped GEMM
(nanoflow.kernels.moe_gemm) and the CPU path. Everything on the Triton path is free of host syncs
(no .item(), no data-dependent shapes), so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing as transformers' MixtralTopKRouter computes it: softmax of the logits in fp32,
    torch.topk (so ties go the way torch.topk breaks them on that device, as in transformers), then the
    k weights renormalised to sum to 1. Returns (weights [T, k] fp32, expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def max_aligned_blocks(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Row blocks of the padded layout, an upper bound known on the host: every expert that gets a
    token wastes less than one block, and at most min(E, T*k) experts get one."""
    padded = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    return -(-padded // block_m)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorts the T*k (token, slot) assignments by expert into blocks of block_m rows, each block of one
    expert (an expert's rows padded up to a whole number of blocks).

    Returns sorted_ids [B * block_m] int32 (the assignment index t * k + j of each row, or T*k on a
    padding row) and block_expert [B] int32 (the expert of each block, -1 for blocks past the last
    expert's), with B = max_aligned_blocks(T*k, E, block_m). Within an expert, assignments keep
    their order. No host sync: the layout's size is the bound B, not the data."""
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    dev = flat.device
    num_blocks = max_aligned_blocks(n, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded_end = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0)
    padded_start = padded_end - (counts + block_m - 1) // block_m * block_m
    first = torch.cumsum(counts, 0) - counts  # where each expert's assignments start once sorted
    sorted_expert, order = torch.sort(flat, stable=True)
    rank = torch.arange(n, device=dev) - first[sorted_expert]
    sorted_ids = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=dev)
    sorted_ids[padded_start[sorted_expert] + rank] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    sm_budget: int | None = None,
) -> torch.Tensor:
    """The experts' sum: out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j].

    Rounding as transformers' MixtralExperts: each expert's gate / up and down outputs in x's dtype,
    each weighted term rounded to x's dtype, the k terms summed in fp32 and rounded once (for k = 2
    that is exactly transformers' index_add_ in x's dtype). sm_budget never changes the result."""
    num_tokens, top_k = topk_ids.shape
    acc = torch.zeros(num_tokens, w_down.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1).float()
    inter = w_down.shape[2]
    for e in range(w_gate_up.shape[0]):
        pos = (flat_ids == e).nonzero().squeeze(1)
        if pos.numel() == 0:
            continue
        tokens = pos // top_k
        gate_up = torch.nn.functional.linear(x[tokens], w_gate_up[e])
        h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = torch.nn.functional.linear(h, w_down[e])
        acc.index_add_(0, tokens, (y * flat_weights[pos, None]).to(x.dtype).float())
    result = acc.to(x.dtype)
    return result if out is None else out.copy_(result)
