"""Shared helpers of the kernel tests (a uniquely named module: test dirs have no __init__.py)."""
import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Per-dtype tolerances for comparing a kernel with its reference (same math, other summation order).
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def same_rounding(dtype: torch.dtype) -> dict:
    """Tolerance for values the kernel rounds exactly as torch does: zero, except that Triton's
    interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest even)."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return TOLERANCES[torch.bfloat16]
    return dict(atol=0, rtol=0)


def fp8_rope_k_tolerance(dtype: torch.dtype) -> dict:
    """Tolerance of rotated k written to an fp8 e4m3 cache: at most one fp8 step (2^-3 relative,
    2^-9 absolute at subnormals) where the kernel's k (before the fp8 cast) differs from torch's by
    an ulp of k's dtype. fp32 k in the interpreter (numpy fp32, same op order) is exact."""
    if dtype == torch.float32 and os.environ.get("TRITON_INTERPRET") == "1":
        return dict(atol=0, rtol=0)
    return dict(atol=2.0**-9, rtol=0.125)


def randn(gen: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


FP8 = torch.float8_e4m3fn

# Triton's interpreter holds bf16 as uint16 in numpy, so tl.dot on bf16 operands is meaningless
# there (the existing attention tests use fp32 / fp16 q for that reason). bf16-q attention cases run
# on the GPU only (pytest on a CUDA machine; at real shapes in tests/gpu/test_kernels_gpu.py).
skip_bf16_dot_in_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="Triton's interpreter cannot tl.dot bf16 (numpy has no bf16); checked on the GPU")


def attention_dtypes() -> list:
    """q dtypes of the fp8-cache attention tests: bf16 only where tl.dot can run it."""
    return [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=skip_bf16_dot_in_interpreter)]





def make_paged_cache(gen, seq_lens, block_size, num_kv_heads, head_dim, dtype, spare_blocks=3):
    """Random K/V caches and block tables that place each request's blocks at shuffled indices.
    Unused block-table entries are -1; unused blocks hold random data (reading them would show)."""
    blocks_per_req = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_req) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_req + [1]) + 1
    table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for r, nb in enumerate(blocks_per_req):
        table[r, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # fp8 caches: randn in fp32, then the saturating cast (values stay well inside +-448).
    k_cache = randn(gen, *shape, dtype=dtype)
    v_cache = randn(gen, *shape, dtype=dtype)
    return k_cache, v_cache, table.to(DEVICE)
