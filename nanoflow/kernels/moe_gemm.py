"""Triton grouped GEMM of a mixture of experts (same function as moe_reference.moe_experts).

The T*k (token, slot) assignments are sorted by expert into blocks of BLOCK_M rows, each block owned
by one expert (moe_align.moe_align_fused, three small launches; an expert's rows padded to whole
blocks). Then three launches,
each for all experts at once:
1. gate_up: row block b of expert e gathers its tokens' rows of x and multiplies them by w_gate_up[e]
   with two accumulators (the gate rows n and the up rows I + n of the same output tile), and the
   epilogue writes silu(gate) * up: the activation is fused, the [*, 2I] product never stored.
2. down: the activation rows (contiguous per block) times w_down[e]; each row is stored at its
   assignment's index t * k + j, so the k outputs of a token sit side by side.
3. combine: out[t] = sum_j w[t, j] * y[t * k + j] (memory-bound; writes the caller's rows).
The grids are bounds known on the host (max_aligned_blocks), blocks past the last expert's exit at
once: no host sync, CUDA-graph capturable. With an SM budget every launch is persistent on exactly
that many programs (each loops over tiles pid, pid + P, ...), as the dense persistent GEMM.

Rounding follows the reference (and transformers): gate and up rounded to x's dtype before silu, silu
rounded, the product rounded; the down output rounded; each weighted term rounded, summed in fp32.
These kernels use plain pointer loads: the same code runs on Triton 3.6 and 3.9 and in the interpreter.
moe_gemm_tma holds a second path for Hopper (TMA descriptors, persistent, one flattened pipeline), taken
when a config says tma=True or, for tma=None, when NANOFLOW_MOE_TMA=1 on an sm_90+ GPU: it is off by
default until benchmarks/moe_gpu.py has measured it against these kernels on the H200.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from nanoflow.kernels import moe_gemm_tma
from nanoflow.kernels.moe_align import moe_align_fused

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class MoeGemmConfig:
    """One grouped GEMM's tiles: BLOCK_M rows (the alignment of every expert's rows; gate_up and down
    must agree on it), BLOCK_N output columns (gate_up: of each of gate and up), K step BLOCK_K, GROUP_M
    row blocks walking a column of tiles together (they mostly share an expert: weights reused in L2).
    tma: the TMA path (moe_gemm_tma) when True, the pointer kernels when False; None = TMA only where
    NANOFLOW_MOE_TMA=1 on an sm_90+ GPU."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool | None = None

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.group_m < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"group_m, num_warps and num_stages must be >= 1: {self}")

    def describe(self) -> str:
        path = {None: "", True: " tma", False: " ptr"}[self.tma]
        return (f"{self.block_m}x{self.block_n}x{self.block_k} g={self.group_m} w={self.num_warps} "
                f"st={self.num_stages}{path}")


def choose_configs(rows_per_expert: float) -> tuple[MoeGemmConfig, MoeGemmConfig]:
    """(gate_up, down) tiles for a mean of `rows_per_expert` routed rows per expert: small row blocks
    when few tokens reach an expert (decode: the GEMMs stream weights, padding is waste), large ones
    when many do. benchmarks/moe_gpu.py sweeps the candidates on the GPU and prints whether these
    defaults are the fastest."""
    if rows_per_expert <= 16:
        c = MoeGemmConfig(16, 64, 128, num_warps=4, num_stages=4)
        return c, c
    if rows_per_expert <= 48:
        c = MoeGemmConfig(32, 64, 128, num_warps=4, num_stages=4)
        return c, c
    if rows_per_expert <= 256:
        return (MoeGemmConfig(64, 128, 64, num_warps=4, num_stages=4),
                MoeGemmConfig(64, 128, 64, num_warps=4, num_stages=4))
    # Many rows: the dense persistent GEMM's best tile (128 x 256 x 64, 8 warps, 3 stages; gate_up's two
    # 128-wide accumulators are that tile's 256 columns).
    return (MoeGemmConfig(128, 128, 64, num_warps=8, num_stages=3),
            MoeGemmConfig(128, 256, 64, num_warps=8, num_stages=3))


SHARED_MEMORY_LIMIT = 232448
"""Bytes of shared memory a block may opt into on sm_90 (the size Triton checks a launch against)."""

_SHARED_MEMORY_MARGIN = 16384  # Triton's epilogue and layout conversions take some beyond the stages


def fit_shared_memory(config: MoeGemmConfig, element_bytes: int, weight_tiles: int,
                      limit: int = SHARED_MEMORY_LIMIT, epilogue_bytes: int = 0) -> MoeGemmConfig:
    """`config` with fewer pipeline stages (down to 2), then a shorter K step (down to 16), until its
    stages fit `limit`: a tile chosen for bf16 needs twice the bytes in fp32. Each stage holds the
    block_m x block_k activations and `weight_tiles` (2 for gate_up, 1 for down) block_n x block_k
    weight tiles; `epilogue_bytes` is what the epilogue keeps beside them (a TMA store's tile)."""
    def stage_bytes(c: MoeGemmConfig) -> int:
        return (c.block_m + weight_tiles * c.block_n) * c.block_k * element_bytes

    budget = limit - _SHARED_MEMORY_MARGIN - epilogue_bytes
    while config.num_stages * stage_bytes(config) > budget:
        if config.num_stages > 2:
            config = dataclasses.replace(config, num_stages=config.num_stages - 1)
        elif config.block_k > 16:
            config = dataclasses.replace(config, block_k=config.block_k // 2)
        else:
            break
    return config


# Tiles the GPU sweep (benchmarks/moe_gpu.py) tries for each kernel, beside choose_configs' choice.
# Shared memory per stage at bf16: (block_m + 2 * block_n) * block_k * 2 bytes for gate_up,
# (block_m + block_n) * block_k * 2 for down; 227 KB per SM on sm_90.
CANDIDATES = (
    MoeGemmConfig(16, 64, 128, num_warps=4, num_stages=4),
    MoeGemmConfig(32, 64, 128, num_warps=4, num_stages=4),
    MoeGemmConfig(64, 64, 64, num_warps=4, num_stages=4),
    MoeGemmConfig(64, 128, 64, num_warps=4, num_stages=4),
    MoeGemmConfig(64, 128, 64, num_warps=8, num_stages=3),
    MoeGemmConfig(128, 64, 64, num_warps=8, num_stages=4),
    MoeGemmConfig(128, 128, 64, num_warps=8, num_stages=3),
    MoeGemmConfig(128, 256, 64, num_warps=8, num_stages=3),
    # The TMA path (persistent on the SMs, flattened pipeline); its stages share the SM with the
    # gate_up epilogue tile.
    MoeGemmConfig(64, 128, 64, num_warps=4, num_stages=4, tma=True),
    MoeGemmConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True),
    MoeGemmConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True),
    MoeGemmConfig(128, 256, 64, num_warps=8, num_stages=3, tma=True),
)


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row blocks walk a column of tiles together."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % rows
    pid_n = (tile % per_group) // rows
    return pid_m, pid_n


@triton.jit(do_not_specialize=["num_assignments", "num_blocks"])
def _gate_up_silu_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr,
    num_assignments, num_blocks, N, K,
    stride_xm, stride_we, stride_wn, stride_om,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[row, n] = silu(x[tok] . w[e, n]) * (x[tok] . w[e, N + n]) for each padded row of an expert."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_blocks * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_blocks, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert >= 0:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            ids = tl.load(sorted_ptr + offs_m)
            valid = ids < num_assignments
            tokens = tl.where(valid, ids // TOP_K, 0)  # padding rows read token 0, never stored
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rows_n = tl.where(offs_n < N, offs_n, 0)
            a_ptrs = x_ptr + tokens.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
            g_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + rows_n.to(tl.int64)[:, None] * stride_wn
                      + offs_k[None, :])
            u_ptrs = g_ptrs + N * stride_wn
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                if EVEN_K:
                    a = tl.load(a_ptrs)
                    g = tl.load(g_ptrs)
                    u = tl.load(u_ptrs)
                else:
                    k_mask = offs_k[None, :] < K - ki * BLOCK_K
                    a = tl.load(a_ptrs, mask=k_mask, other=0.0)
                    g = tl.load(g_ptrs, mask=k_mask, other=0.0)
                    u = tl.load(u_ptrs, mask=k_mask, other=0.0)
                acc_g = tl.dot(a, g.T, acc_g, input_precision=DOT_PRECISION)
                acc_u = tl.dot(a, u.T, acc_u, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K
                g_ptrs += BLOCK_K
                u_ptrs += BLOCK_K
            dt = out_ptr.dtype.element_ty
            gate = acc_g.to(dt).to(tl.float32)
            up = acc_u.to(dt).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
            o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
            tl.store(o_ptrs, (act * up).to(dt), mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["num_assignments", "num_blocks"])
def _down_kernel(
    h_ptr, w_ptr, y_ptr, sorted_ptr, block_expert_ptr,
    num_assignments, num_blocks, N, K,
    stride_hm, stride_we, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y[ids[row]] = h[row] . w[e]^T for each padded row of an expert (padding rows skipped)."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_blocks * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_blocks, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert >= 0:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            ids = tl.load(sorted_ptr + offs_m)
            valid = ids < num_assignments
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rows_n = tl.where(offs_n < N, offs_n, 0)
            a_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_k[None, :]
            b_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + rows_n.to(tl.int64)[:, None] * stride_wn
                      + offs_k[None, :])
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
                    b = tl.load(b_ptrs)
                else:
                    k_mask = offs_k[None, :] < K - ki * BLOCK_K
                    a = tl.load(a_ptrs, mask=valid[:, None] & k_mask, other=0.0)
                    b = tl.load(b_ptrs, mask=k_mask, other=0.0)
                acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
            rows_y = tl.where(valid, ids, 0).to(tl.int64)
            y_ptrs = y_ptr + rows_y[:, None] * stride_ym + offs_n[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["num_tokens"])
def _combine_kernel(y_ptr, w_ptr, out_ptr, num_tokens, H, stride_ym, stride_om,
                    TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum_j round(y[t * k + j] * w[t, j]), summed in fp32 (programs loop over tokens)."""
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    dt = out_ptr.dtype.element_ty
    # An int64 loop counter: row offsets below must not overflow int32.
    for t in tl.range(tl.program_id(0).to(tl.int64), num_tokens, tl.num_programs(0)):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(TOP_K):
            row = t * TOP_K + j
            w = tl.load(w_ptr + row)
            y = tl.load(y_ptr + row * stride_ym + offs, mask=mask, other=0.0).to(tl.float32)
            acc += (y * w).to(dt).to(tl.float32)
        tl.store(out_ptr + t * stride_om + offs, acc.to(dt), mask=mask)


_COMBINE_BLOCK = 1024


def _grid(tiles: int, sm_budget: int | None) -> int:
    return max(1, tiles if sm_budget is None else min(tiles, sm_budget))


def _persistent_grid(tiles: int, sm_budget: int | None, device: torch.device) -> int:
    """The TMA path always loops: one program per SM of the budget (the whole device without one)."""
    return max(1, min(tiles, sm_budget if sm_budget is not None else _num_sms(device)))


def use_tma(config: MoeGemmConfig, *tensors: torch.Tensor) -> bool:
    """Whether `config` runs on the TMA path for these operands (see MoeGemmConfig.tma)."""
    if config.tma is not None:
        if config.tma and not moe_gemm_tma.available():
            raise ValueError("MoeGemmConfig(tma=True) needs triton.tools.tensor_descriptor (triton >= 3.4)")
        if config.tma and not moe_gemm_tma.tma_compatible(*tensors):
            raise ValueError("MoeGemmConfig(tma=True) needs 16-byte aligned bases and row strides")
        return config.tma
    device = tensors[0].device
    return (os.environ.get("NANOFLOW_MOE_TMA", "0") == "1" and moe_gemm_tma.available()
            and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and moe_gemm_tma.tma_compatible(*tensors))


def _check(x, topk_weights, topk_ids, w_gate_up, w_down, out):
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be [T, H] in {_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    num_tokens, hidden = x.shape
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("w_gate_up must be [E, 2I, H] and w_down [E, H, I]")
    e, two_i, h = w_gate_up.shape
    if h != hidden or two_i % 2 or tuple(w_down.shape) != (e, hidden, two_i // 2):
        raise ValueError(f"expert weights {tuple(w_gate_up.shape)} / {tuple(w_down.shape)} do not fit "
                         f"hidden size {hidden}: need [E, 2I, {hidden}] and [E, {hidden}, I]")
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"expert weights must be {x.dtype}, got {w_gate_up.dtype} / {w_down.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids / topk_weights must both be [{num_tokens}, k], got "
                         f"{tuple(topk_ids.shape)} / {tuple(topk_weights.shape)}")
    if out is not None and (tuple(out.shape) != (num_tokens, hidden) or out.dtype != x.dtype or out.stride(1) != 1):
        raise ValueError(f"out must be [{num_tokens}, {hidden}] {x.dtype} with contiguous rows")


def grouped_gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor, sorted_ids: torch.Tensor,
                         block_expert: torch.Tensor, top_k: int, config: MoeGemmConfig,
                         sm_budget: int | None = None, used: torch.Tensor | None = None) -> torch.Tensor:
    """Launch 1: [B * block_m, I] = silu(gate) * up of every padded row (padding rows left unwritten).
    used: the TMA path's count of blocks in use ([1] int32 on the device), computed when None."""
    num_blocks = block_expert.numel()
    inter, hidden = w_gate_up.shape[1] // 2, x.shape[1]
    tiles = num_blocks * triton.cdiv(inter, config.block_n)
    if use_tma(config, x, w_gate_up):
        used = moe_gemm_tma.used_blocks(block_expert) if used is None else used
        return moe_gemm_tma.gate_up_silu(x, w_gate_up, sorted_ids, block_expert, used, top_k, config,
                                         _persistent_grid(tiles, sm_budget, x.device), _precision(x))
    h = torch.empty(num_blocks * config.block_m, inter, dtype=x.dtype, device=x.device)
    _gate_up_silu_kernel[(_grid(tiles, sm_budget),)](
        x, w_gate_up, h, sorted_ids, block_expert, x.shape[0] * top_k, num_blocks, inter, hidden,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), h.stride(0),
        TOP_K=top_k, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, EVEN_K=hidden % config.block_k == 0, DOT_PRECISION=_precision(x),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return h


def grouped_down(h: torch.Tensor, w_down: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
                 num_assignments: int, config: MoeGemmConfig, sm_budget: int | None = None,
                 used: torch.Tensor | None = None) -> torch.Tensor:
    """Launch 2: [T * k, H], row t * k + j = the down projection of that assignment's activation."""
    num_blocks = block_expert.numel()
    hidden, inter = w_down.shape[1], w_down.shape[2]
    tiles = num_blocks * triton.cdiv(hidden, config.block_n)
    if use_tma(config, h, w_down):
        used = moe_gemm_tma.used_blocks(block_expert) if used is None else used
        return moe_gemm_tma.down(h, w_down, sorted_ids, block_expert, used, num_assignments, config,
                                 _persistent_grid(tiles, sm_budget, h.device), _precision(h))
    y = torch.empty(num_assignments, hidden, dtype=h.dtype, device=h.device)
    _down_kernel[(_grid(tiles, sm_budget),)](
        h, w_down, y, sorted_ids, block_expert, num_assignments, num_blocks, hidden, inter,
        h.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, EVEN_K=inter % config.block_k == 0, DOT_PRECISION=_precision(h),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return y


def combine(y: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor,
            sm_budget: int | None = None) -> torch.Tensor:
    """Launch 3: out[t] = sum_j w[t, j] * y[t * k + j] (each term rounded, summed in fp32)."""
    num_tokens, top_k = topk_weights.shape
    hidden = y.shape[1]
    weights = topk_weights.reshape(-1).float().contiguous()
    col_blocks = triton.cdiv(hidden, _COMBINE_BLOCK)
    token_programs = num_tokens if sm_budget is None else max(1, min(num_tokens, sm_budget // col_blocks))
    _combine_kernel[(token_programs, col_blocks)](
        y, weights, out, num_tokens, hidden, y.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK=_COMBINE_BLOCK, num_warps=4)
    return out


def _shared_memory_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return SHARED_MEMORY_LIMIT
    return _cuda_shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device())


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a few looping programs
    return _cuda_num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _cuda_shared_memory_limit(index: int) -> int:
    """Read once per device: moe_experts asks on every eager call."""
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", SHARED_MEMORY_LIMIT))


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    sm_budget: int | None = None,
    configs: tuple[MoeGemmConfig, MoeGemmConfig] | None = None,
) -> torch.Tensor:
    """x [T, H], routing (weights [T, k], expert ids [T, k]), w_gate_up [E, 2I, H], w_down [E, H, I]
    -> [T, H] in x's dtype (written into `out` when given, e.g. a row slice of the step workspace).
    sm_budget: every launch on exactly that many programs. configs: (gate_up, down) tiles, same
    block_m; None = choose_configs(T * k / E)."""
    _check(x, topk_weights, topk_ids, w_gate_up, w_down, out)
    num_tokens = x.shape[0]
    num_experts = w_gate_up.shape[0]
    top_k = topk_ids.shape[1]
    if out is None:
        out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    if sm_budget is not None and sm_budget < 1:
        raise ValueError(f"sm_budget must be >= 1, got {sm_budget}")
    up_cfg, down_cfg = configs or choose_configs(num_tokens * top_k / num_experts)
    if up_cfg.block_m != down_cfg.block_m:
        raise ValueError(f"gate_up and down configs must share block_m: {up_cfg.block_m} != {down_cfg.block_m}")
    x = x if x.stride(1) == 1 else x.contiguous()
    w_gate_up = w_gate_up if w_gate_up.stride(2) == 1 else w_gate_up.contiguous()
    w_down = w_down if w_down.stride(2) == 1 else w_down.contiguous()
    limit = _shared_memory_limit(x.device)
    up_tma = use_tma(up_cfg, x, w_gate_up)
    # The TMA gate_up keeps its output tile in shared memory for the store.
    up_cfg = fit_shared_memory(up_cfg, x.element_size(), 2, limit,
                               up_cfg.block_m * up_cfg.block_n * x.element_size() if up_tma else 0)
    down_cfg = fit_shared_memory(down_cfg, x.element_size(), 1, limit)
    sorted_ids, block_expert, used = moe_align_fused(topk_ids, num_experts, up_cfg.block_m)
    h = grouped_gate_up_silu(x, w_gate_up, sorted_ids, block_expert, top_k, up_cfg, sm_budget, used)
    y = grouped_down(h, w_down, sorted_ids, block_expert, num_tokens * top_k, down_cfg, sm_budget, used)
    return combine(y, topk_weights, out, sm_budget)
