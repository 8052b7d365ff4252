import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import TOLERANCES, randn, same_rounding

from nanoflow.kernels import reference
from nanoflow.kernels import norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 96), (5, 200)])
def test_rms_norm_matches_reference(gen, dtype, rows, hidden):
    x = randn(gen, rows, hidden, dtype=dtype) * 3
    w = randn(gen, hidden, dtype=dtype)
    out = torch.full_like(x, float("nan"))
    got = norm.rms_norm(x, w, 1e-5, out=out)
    assert got is out
    torch.testing.assert_close(got, reference.rms_norm(x, w, 1e-5), **TOLERANCES[dtype])
    torch.testing.assert_close(norm.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5),
                               **TOLERANCES[dtype])


def test_rms_norm_promotes_like_reference(gen):
    """bf16 activations with an fp32 weight give fp32 output, and 3-D inputs keep their shape."""
    x = randn(gen, 2, 3, 64, dtype=torch.bfloat16)
    w = randn(gen, 64)
    got = norm.rms_norm(x, w, 1e-6)
    want = reference.rms_norm(x, w, 1e-6)
    assert got.dtype == want.dtype == torch.float32 and got.shape == x.shape
    # fp32 output of bf16-rounded values (Triton's interpreter rounds to bf16 toward zero).
    torch.testing.assert_close(got, want, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(gen, dtype):
    x = randn(gen, 6, 160, dtype=dtype)
    res = randn(gen, 6, 160, dtype=dtype) * 4
    w = randn(gen, 160, dtype=dtype)
    out, res_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    got, got_res = norm.fused_add_rms_norm(x, res, w, 1e-5, out=out, residual_out=res_out)
    want, want_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    assert got is out and got_res is res_out
    torch.testing.assert_close(got_res, want_res, **same_rounding(dtype))  # one rounding of one sum
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


def test_fused_add_rms_norm_in_place(gen):
    """out=x, residual_out=residual (vLLM-style in-place update) gives the same values."""
    x = randn(gen, 4, 128, dtype=torch.bfloat16)
    res = randn(gen, 4, 128, dtype=torch.bfloat16)
    w = randn(gen, 128, dtype=torch.bfloat16)
    want, want_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    norm.fused_add_rms_norm(x, res, w, 1e-5, out=x, residual_out=res)
    torch.testing.assert_close(res, want_res, **same_rounding(torch.bfloat16))
    torch.testing.assert_close(x, want, **TOLERANCES[torch.bfloat16])


def test_norm_rejects_bad_shapes(gen):
    x = randn(gen, 2, 64)
    with pytest.raises(ValueError, match="weight"):
        norm.rms_norm(x, randn(gen, 32), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        norm.fused_add_rms_norm(x, randn(gen, 2, 32), randn(gen, 64), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads", [(1, 4), (5, 1), (9, 3)])
def test_rms_norm_of_strided_heads_in_place(gen, dtype, tokens, heads):
    """Qwen3's per-head q / k norm: a [T, H, D] column slice of a wider qkv row, normalised in place
    (no copy), the columns around it untouched; equal to the reference on a contiguous copy."""
    d, width = 32, 7 * 32 + 5
    qkv = randn(gen, tokens, width, dtype=dtype)
    before = qkv.clone()
    w = randn(gen, d, dtype=dtype)
    view = qkv[:, 2 * d:(2 + heads) * d].view(tokens, heads, d)
    want = reference.rms_norm(view.contiguous(), w, 1e-6)
    ptr = view.data_ptr()
    got = norm.rms_norm(view, w, 1e-6, out=view)
    assert got is view and view.data_ptr() == ptr
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    outside = torch.ones(width, dtype=torch.bool)
    outside[2 * d:(2 + heads) * d] = False
    assert torch.equal(qkv[:, outside], before[:, outside])
    fresh = norm.rms_norm(before[:, 2 * d:(2 + heads) * d].view(tokens, heads, d), w, 1e-6)
    torch.testing.assert_close(fresh, want, **TOLERANCES[dtype])


def test_rms_norm_of_strided_heads_checks_its_arguments(gen):
    qkv = randn(gen, 3, 100)
    view = qkv[:, :64].view(3, 2, 32)
    with pytest.raises(ValueError, match="weight must have shape"):
        norm.rms_norm(view, randn(gen, 16), 1e-6)
    with pytest.raises(ValueError, match="out must be"):
        norm.rms_norm(view, randn(gen, 32), 1e-6, out=torch.empty(3, 64))
