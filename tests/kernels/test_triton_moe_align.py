"""The fused token-to-expert sort (moe_align.moe_align_fused, three Triton launches) against the torch
moe_align: the same blocks, block experts and padding; within an expert's blocks the assignments may
come in any order (atomics), so rows are compared as sets."""
import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import DEVICE

from nanoflow.kernels.moe_align import moe_align_fused
from nanoflow.kernels.moe_reference import moe_align


def _same_layout(ids: torch.Tensor, experts: int, block_m: int) -> None:
    want_sorted, want_blocks = moe_align(ids.cpu(), experts, block_m)
    got_sorted, got_blocks, used = moe_align_fused(ids.to(DEVICE), experts, block_m)
    got_sorted, got_blocks = got_sorted.cpu(), got_blocks.cpu()
    assert got_sorted.dtype == got_blocks.dtype == used.dtype == torch.int32
    assert torch.equal(got_blocks, want_blocks)
    assert used.item() == int((want_blocks >= 0).sum())
    # row blocks hold the same assignments (padding included), in any order inside an expert's blocks
    n = ids.numel()
    for e in range(experts):
        rows = (want_blocks == e).nonzero().flatten()
        if rows.numel() == 0:
            continue
        span = slice(rows[0].item() * block_m, (rows[-1].item() + 1) * block_m)
        assert sorted(got_sorted[span].tolist()) == sorted(want_sorted[span].tolist())
        real = got_sorted[span][got_sorted[span] < n].long()
        assert (ids.reshape(-1).cpu()[real] == e).all()
    tail = slice(int((want_blocks >= 0).sum()) * block_m, None)
    assert (got_sorted[tail] == n).all()


@pytest.mark.parametrize("tokens, experts, top_k, block_m", [
    (1, 8, 2, 16), (37, 6, 2, 4), (700, 8, 2, 16), (50, 5, 3, 8), (9, 16, 1, 4),
    (300, 60, 4, 16), (200, 128, 8, 16),  # Qwen2-MoE's 60 and Qwen3-MoE's 128 experts
    (2100, 8, 2, 128)])
def test_fused_align_matches_the_torch_sort(tokens, experts, top_k, block_m):
    g = torch.Generator().manual_seed(tokens)
    probs = torch.rand(tokens, experts, generator=g) * torch.linspace(0.2, 1.0, experts) ** 3
    probs[:, 0] = -1.0                    # an expert that gets nothing
    probs[: tokens // 2, 1] = 10.0        # one that gets half the tokens
    _same_layout(probs.topk(top_k, dim=-1).indices, experts, block_m)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(0, 90), experts=st.integers(1, 20), block_m=st.sampled_from([1, 2, 4, 16, 64]),
       seed=st.integers(0, 2 ** 16))
def test_fused_align_on_random_routing(tokens, experts, block_m, seed):
    top_k = min(2, experts)
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices
    _same_layout(ids, experts, block_m)


def test_no_assignments():
    sorted_ids, blocks, used = moe_align_fused(torch.zeros(0, 2, dtype=torch.long, device=DEVICE), 8, 16)
    assert sorted_ids.numel() == 0 and blocks.numel() == 0 and used.item() == 0
