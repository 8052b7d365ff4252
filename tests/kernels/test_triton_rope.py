import math

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import DEVICE, TOLERANCES, randn

from nanoflow.kernels import reference, rope


def cos_sin_cache(max_pos, head_dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32)])
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
    torch.testing.assert_close(k_cache, want_k, **tol)       # untouched slots compare exactly
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)


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
