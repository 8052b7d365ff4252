import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_helpers import DEVICE, TOLERANCES, randn

from nanoflow.kernels import gemm_persistent as gp

# Small tiles keep the interpreter fast; group_m=2 so grouped ordering has more than one group.
SMALL = dict(block_m=32, block_n=16, block_k=32, group_m=2, num_warps=4, num_stages=2)


def check(got: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None):
    want = a.double() @ b_t.double().T
    if bias is not None:
        want += bias.double()
    torch.testing.assert_close(got, want.to(a.dtype), **TOLERANCES[a.dtype])


# Ragged M and N (not tile multiples), K not a multiple of block_k; 1 program loops over all 15
# tiles, 4 programs split them unevenly, 40 programs leave most programs without a tile.
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("num_programs", [1, 4, 40])
def test_ragged_shapes_and_budgets(gen, tma, num_programs):
    a = randn(gen, 70, 80, dtype=torch.float16)
    b_t = randn(gen, 72, 80, dtype=torch.float16)
    got = gp.persistent_matmul(a, b_t, num_programs=num_programs, config=gp.GemmConfig(**SMALL, tma=tma))
    check(got, a, b_t)


@pytest.mark.parametrize("tma", [False, True])
def test_bias_and_out_row_slice(gen, tma):
    """out is a row slice of a bigger buffer: the rows around it stay untouched."""
    a = randn(gen, 45, 64, dtype=torch.float16)
    b_t = randn(gen, 48, 64, dtype=torch.float16)
    bias = randn(gen, 48, dtype=torch.float16)
    buf = torch.full((64, 48), float("nan"), dtype=torch.float16, device=DEVICE)
    out = buf[8:53]
    got = gp.persistent_matmul(a, b_t, num_programs=3, out=out, bias=bias,
                               config=gp.GemmConfig(**SMALL, tma=tma))
    assert got is out
    check(got, a, b_t, bias)
    assert buf[:8].isnan().all() and buf[53:].isnan().all()


def test_fp32_and_default_config(gen):
    a = randn(gen, 20, 40)
    b_t = randn(gen, 24, 40)
    check(gp.persistent_matmul(a, b_t, num_programs=2), a, b_t)


def test_choose_config_avoids_bad_last_wave():
    big, small = gp.CONFIGS[0], gp.CONFIGS[1]
    assert gp.choose_config(1024, 28672, 4096, 132) == big     # 896 big tiles: 7 waves, 97% busy
    assert gp.choose_config(1024, 4096, 14336, 132) == big     # 128 big tiles: one wave
    assert gp.choose_config(1024, 4096, 14336, 100) == small   # 128 big tiles on 100: 2 waves, 64%


def test_rejects_bad_arguments(gen):
    a = randn(gen, 4, 32, dtype=torch.float16)
    b_t = randn(gen, 8, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="num_programs"):
        gp.persistent_matmul(a, b_t, num_programs=0)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        gp.persistent_matmul(a, b_t[:, :16], num_programs=1)
    with pytest.raises(ValueError, match="out must be"):
        gp.persistent_matmul(a, b_t, num_programs=1, out=torch.empty(4, 9, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias"):
        gp.persistent_matmul(a, b_t, num_programs=1, bias=torch.zeros(7, dtype=torch.float16))
    with pytest.raises(ValueError, match="16-byte"):  # rows of 9 fp16 values: 18-byte stride
        gp.persistent_matmul(a, randn(gen, 9, 32, dtype=torch.float16), num_programs=1,
                             config=gp.GemmConfig(**SMALL, tma=True))
    with pytest.raises(ValueError, match="block_n"):
        gp.GemmConfig(block_n=48)
