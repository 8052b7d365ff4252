"""Plain-torch reference implementations of every kernel the model calls.

These define the *function* each Triton kernel must compute; tests compare the two. They run on any
device and are the CPU path. Shapes: T tokens in the step, R requests, Hq query heads, Hk KV heads,
D head dim. The paged KV cache of one layer is a pair of tensors [num_blocks, block_size, Hk, D].
"""
from __future__ import annotations

import torch

from nanoflow.kernels.moe_reference import moe_experts  # noqa: F401  (the MoE experts' reference)


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Every kernel may write into a caller's buffer (a slice of the step workspace)."""
    return result if out is None else out.copy_(result)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None, sm_budget: int | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias). sm_budget only limits where a GPU kernel runs, never the result."""
    if out is None:
        return torch.nn.functional.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm in fp32, cast back to x's dtype (as transformers' LlamaRMSNorm does)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return _into(weight * xf.to(x.dtype), out)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual). The sum is the new residual stream."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps, out=out), _into(new_residual, residual_out)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x is [T, 2I] = [gate | up]; returns silu(gate) * up, [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return _into(torch.nn.functional.silu(gate) * up, out)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Neox-style (rotate-half) rotary embedding. x [T, H, D]; cos_sin [max_pos, D] = [cos | sin] halves."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions].unsqueeze(1)  # [T, 1, D]
    cos, sin = cs[..., :half].float(), cs[..., half:].float()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


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
    """Rotates q and k, writes rotated k and v into the paged cache at slot_mapping
    (slot = block * block_size + offset; negative slots are skipped: padding). An fp8 cache holds
    k / k_scale and v / v_scale (per-tensor scales, as vLLM's). Returns rotated q [T, Hq, D]."""
    q_rot = apply_rope(q, positions, cos_sin)
    k_rot = apply_rope(k, positions, cos_sin)
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slots] = _to_cache(k_rot[keep], k_cache.dtype, k_scale)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slots] = _to_cache(v[keep], v_cache.dtype, v_scale)
    return _into(q_rot, q_out)


def _to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """The cache's dtype; an fp8 (e4m3) cache holds x / scale, saturated at +-448 like vLLM's cast."""
    if dtype == torch.float8_e4m3fn:
        x = (x.float() / scale).clamp(-448.0, 448.0)
    return x.to(dtype)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of one request, [length, Hk, D]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_start: int) -> torch.Tensor:
    """Causal attention of q [Lq, Hq, D] at positions q_start.. over k, v [Lk, Hk, D] (GQA by repeat)."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    q_pos = torch.arange(q_start, q_start + q.shape[0], device=q.device)
    k_pos = torch.arange(k.shape[0], device=q.device)
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_programs: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query token per request. q [R, Hq, D]; block_tables [R, max_blocks] int32;
    seq_lens [R] = context length including the current token. Returns [R, Hq, D].
    max_programs (an SM budget for GPU kernels) does not change the result. k_scale / v_scale:
    the cache holds K / k_scale and V / v_scale (fp8 caches; 1.0 otherwise)."""
    out = torch.empty_like(q) if out is None else out
    lens = seq_lens.tolist()
    for r, length in enumerate(lens):
        k = _gather_context(k_cache, block_tables[r], length).float() * k_scale
        v = _gather_context(v_cache, block_tables[r], length).float() * v_scale
        out[r] = _attend(q[r : r + 1], k, v, scale, length - 1)[0]
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_programs: int | None = None,
) -> torch.Tensor:
    """Chunked prefill over the paged cache: request r owns query rows
    query_start_loc[r]:query_start_loc[r+1], which sit at the last positions of its seq_lens[r]
    context (earlier context was cached by previous steps). q [T, Hq, D] -> [T, Hq, D]."""
    out = torch.empty_like(q) if out is None else out
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for r, length in enumerate(lens):
        lo, hi = starts[r], starts[r + 1]
        k = _gather_context(k_cache, block_tables[r], length)
        v = _gather_context(v_cache, block_tables[r], length)
        out[lo:hi] = _attend(q[lo:hi], k, v, scale, length - (hi - lo))
    return out


# ---- CUDA-graph forms: which rows / requests to compute is read from device scalars ---------------
def paged_decode_attention_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_rows: torch.Tensor,
    row0: int,
    out: torch.Tensor,
    max_programs: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """paged_decode_attention on the first clamp(num_rows[0] - row0, 0, R) of the R rows given (rows
    row0.. of the batch; num_rows: the batch's decode rows, an int32 device scalar); `out` rows of
    the others are left as they are. The kernels read the count on the device (CUDA graphs)."""
    n = max(0, min(int(num_rows.reshape(-1)[0]) - row0, q.shape[0]))
    if n:
        paged_decode_attention(q[:n], k_cache, v_cache, block_tables[:n], seq_lens[:n], scale, out=out[:n],
                               k_scale=k_scale, v_scale=v_scale)
    return out


def paged_prefill_attention_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    first_request: torch.Tensor,
    num_requests: torch.Tensor,
    out: torch.Tensor,
    max_programs: int | None = None,
) -> torch.Tensor:
    """paged_prefill_attention of requests first_request[0] <= r < num_requests[0] (int32 device
    scalars) of the whole batch: q and out hold every row, query_start_loc has R + 1 entries (rows
    past the last request repeat its end). Rows of other requests are not written."""
    end = max(0, min(int(num_requests.reshape(-1)[0]), seq_lens.shape[0]))
    first = max(0, min(int(first_request.reshape(-1)[0]), end))
    if first < end:
        lo, hi = int(query_start_loc[first]), int(query_start_loc[end])
        paged_prefill_attention(q[lo:hi], k_cache, v_cache, block_tables[first:end],
                                query_start_loc[first:end + 1] - lo, seq_lens[first:end], scale, out=out[lo:hi])
    return out
