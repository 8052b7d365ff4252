import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import TOLERANCES, randn

from nanoflow.kernels import activation, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 3000), (2, 3, 40)])
def test_silu_and_mul_matches_reference(gen, dtype, shape):
    x = randn(gen, *shape, dtype=dtype) * 4
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=x.device)
    got = activation.silu_and_mul(x, out=out)
    assert got is out
    torch.testing.assert_close(got, reference.silu_and_mul(x), **TOLERANCES[dtype])


def test_silu_and_mul_strided_rows(gen):
    """Rows of a wider buffer (non-contiguous view) are read with their stride."""
    base = randn(gen, 4, 100)
    x = base[:, :80]
    torch.testing.assert_close(activation.silu_and_mul(x), reference.silu_and_mul(x),
                               **TOLERANCES[torch.float32])


def test_silu_and_mul_rejects_odd_width(gen):
    with pytest.raises(ValueError, match="even"):
        activation.silu_and_mul(randn(gen, 2, 7))
