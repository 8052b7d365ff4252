import math

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import DEVICE, TOLERANCES, fp8_rope_k_tolerance, randn

from nanoflow.kernels import reference, rope


def cos_sin_cache(max_pos, head_dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.float8_e4m3fn),
                                               (torch.bfloat16, torch.float8_e4m3fn),
                                               (torch.float16, torch.float8_e4m3fn)])
@pytest.mark.parametrize("hq,hk,head_dim", [(4, 4, 64), (4, 2, 32), (6, 2, 24)])
def test_rope_and_cache_write_matches_reference(gen, dtype, cache_dtype, hq, hk, head_dim):
    num_tokens, block_size, num_blocks = 9, 4, 6
    # q, k, v as column slices of one fused qkv output, like the model produces them.
    qkv = randn(gen, num_tokens, (hq + 2 * hk) * head_dim, dtype=dtype)
    q, k, v = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in (q, k, v))
    positions = torch.randint(0, 50, (num_tokens,), generator=gen).to(DEVICE)
    cos_sin = cos_sin_cache(64, head_dim, torch.float32)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    k_cache = randn(gen, num_blocks, block_size, hk, head_dim, dtype=cache_dtype)
    v_cache = randn(gen, num_blocks, block_size, hk, head_dim, dtype=cache_dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = reference.rope_and_cache_write(q, k, v, positions, cos_sin, want_k, want_v, slots)
    q_out = torch.full((num_tokens, hq, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    got_q = rope.rope_and_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, slots, q_out=q_out)
    assert got_q is q_out
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got_q, want_q, **tol)
    if cache_dtype == torch.float8_e4m3fn:
        # Rotated k: one fp8 step at most, where k's own rounding (fp32 FMA order, or the
        # interpreter's bf16 truncation) moves a value across an fp8 rounding boundary.
        torch.testing.assert_close(k_cache.float(), want_k.float(), **fp8_rope_k_tolerance(dtype))
        # v is only cast: bit-identical (torch's NaN != NaN aside, none here).
        assert torch.equal(v_cache.view(torch.uint8), want_v.view(torch.uint8))
        return
    torch.testing.assert_close(k_cache, want_k, **tol)       # untouched slots compare exactly
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_write_saturates_and_rounds_like_torch(gen, dtype):
    """v is written by a plain cast: every e4m3 rounding case (ties to even, mantissa carry into the
    exponent, subnormals, signed zero) and out-of-range values (clamped to +-448, never NaN) must
    match x.clamp(-448, 448).to(float8_e4m3fn) bit for bit."""
    head_dim, num_tokens = 64, 8
    special = torch.tensor([0.0, -0.0, 1e-9, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 2.0**-6, 1.0625 * 2.0**-7,
                            1.97, -1.97, 0.97, 15.9, 17.0, 19.0, -17.0, 0.001, 0.01, -0.003,
                            440.0, 447.0, 448.0, 460.0, 464.0, 479.0, 481.0, 500.0, -1e5, 1e30,
                            float("inf"), float("-inf"), 0.5, 3.125])
    vals = torch.cat([special, torch.randn(num_tokens * head_dim - special.numel(), generator=gen)
                      * torch.logspace(-4, 3, num_tokens * head_dim - special.numel())])
    v = vals.view(num_tokens, 1, head_dim).to(dtype).to(DEVICE)
    q = randn(gen, num_tokens, 1, head_dim, dtype=dtype)
    k = randn(gen, num_tokens, 1, head_dim, dtype=dtype) * 300  # rotated k overflows too
    positions = torch.arange(num_tokens, device=DEVICE)
    cos_sin = cos_sin_cache(16, head_dim, torch.float32)
    slots = torch.arange(num_tokens, device=DEVICE)
    kc = torch.zeros(2, 4, 1, head_dim, dtype=torch.float8_e4m3fn, device=DEVICE)
    vc = torch.zeros_like(kc)
    rope.rope_and_cache_write(q, k, v, positions, cos_sin, kc, vc, slots)
    want_v = v.float().clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(vc.flatten(0, 1).view(torch.uint8), want_v.view(torch.uint8))
    assert not torch.isnan(kc.float()).any()
    assert kc.float().abs().max().item() == 448.0
    want_k = reference.apply_rope(k, positions, cos_sin).float().clamp(-448, 448)
    torch.testing.assert_close(kc.flatten(0, 1).float(), want_k.to(torch.float8_e4m3fn).float(),
                               **fp8_rope_k_tolerance(dtype))


def test_rope_rotates_by_position_angle(gen):
    """Independent of the reference: a unit vector on dim 0 turns by pos * inv_freq[0] = pos rad."""
    head_dim = 8
    q = torch.zeros(3, 1, head_dim, device=DEVICE)
    q[:, 0, 0] = 1.0
    k, v = q.clone(), q.clone()
    positions = torch.tensor([0, 1, 2], device=DEVICE)
    kc = torch.zeros(2, 4, 1, head_dim, device=DEVICE)
    vc = torch.zeros_like(kc)
    out = rope.rope_and_cache_write(q, k, v, positions, cos_sin_cache(4, head_dim, torch.float32),
                                    kc, vc, torch.tensor([5, 0, 7], device=DEVICE))
    for p in range(3):
        assert out[p, 0, 0].item() == pytest.approx(math.cos(p), abs=1e-6)
        assert out[p, 0, head_dim // 2].item() == pytest.approx(math.sin(p), abs=1e-6)
    assert kc.view(8, 1, head_dim)[7, 0, head_dim // 2].item() == pytest.approx(math.sin(2), abs=1e-6)
    assert vc.view(8, 1, head_dim)[5, 0, 0].item() == 1.0


def test_negative_slot_skips_cache_write(gen):
    q = randn(gen, 2, 2, 16)
    k, v = randn(gen, 2, 1, 16), randn(gen, 2, 1, 16)
    kc = randn(gen, 2, 4, 1, 16)
    vc = randn(gen, 2, 4, 1, 16)
    kc0, vc0 = kc.clone(), vc.clone()
    cos_sin = cos_sin_cache(8, 16, torch.float32)
    rope.rope_and_cache_write(q, k, v, torch.tensor([1, 2], device=DEVICE), cos_sin, kc, vc,
                              torch.tensor([-1, 3], device=DEVICE))
    changed = (kc != kc0).flatten(0, 1).any(-1).any(-1)
    assert changed.nonzero().flatten().tolist() == [3]
    assert torch.equal(vc.flatten(0, 1)[3], v[1])
