"""The Triton kernels at Llama-3-8B shapes on a GPU (skipped without CUDA), against their torch
references on fresh random data: bf16 relative error ||out - ref|| / ||ref|| < 1e-2 (NaN fails);
FP8 (e4m3) KV caches against the reference run on the same fp8 cache, < 2e-2, with rope's cache
write saturating out-of-range values at +-448 like the reference (never NaN, V bit-identical);
decode attention on a green-context SM partition bitwise equal to the whole device. Shapes the CPU
interpreter cannot run (bf16 q over an fp8 cache, real head counts and contexts) are checked here.
(The correctness half of benchmarks/kernels_gpu.py and of the green-context study; the timings
stay there.)"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HIDDEN, INTER, HQ, HK, D, BLOCK = 4096, 14336, 32, 8, 128, 16
DT = torch.bfloat16
FP8 = torch.float8_e4m3fn
TOL, FP8_TOL = 1e-2, 2e-2
DEV = "cuda"


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def close(got, want, tol=TOL) -> None:
    err = rel(got, want)
    assert err < tol, f"rel err {err:.2e} >= {tol:g}"  # `<` also fails on NaN


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(DT)


def make_cache(seq_lens: torch.Tensor):
    """K/V caches holding every request's context in shuffled blocks, and the block tables."""
    blocks = (seq_lens + BLOCK - 1) // BLOCK
    num_blocks = int(blocks.sum())
    table = torch.zeros(len(seq_lens), int(blocks.max()), dtype=torch.int32, device=DEV)
    table[torch.arange(table.shape[1], device=DEV)[None, :] < blocks[:, None]] = torch.randperm(
        num_blocks, device=DEV, dtype=torch.int32)
    return rand(num_blocks, BLOCK, HK, D), rand(num_blocks, BLOCK, HK, D), table


def lengths(r: int, ctx: int, ragged: bool) -> torch.Tensor:
    if ragged:  # uniform in [ctx/2, 3ctx/2]
        return torch.randint(ctx // 2, 3 * ctx // 2 + 1, (r,), device=DEV, dtype=torch.int32)
    return torch.full((r,), ctx, device=DEV, dtype=torch.int32)


def rope_inputs(tokens: int):
    qkv = rand(tokens, (HQ + 2 * HK) * D)
    q, k, v = (t.view(tokens, -1, D) for t in qkv.split([HQ * D, HK * D, HK * D], dim=-1))
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(8192, device=DEV, dtype=torch.float32), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    num_blocks = tokens // BLOCK + 64
    slots = torch.randperm(num_blocks * BLOCK, device=DEV)[:tokens]
    return q, k, v, positions, cos_sin, num_blocks, slots


def test_norms_and_activation():
    from nanoflow.kernels import reference, triton_ops
    x, res, w = rand(8192, HIDDEN), rand(8192, HIDDEN), rand(HIDDEN)
    close(triton_ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    want, want_res = reference.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    got, got_res = triton_ops.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    close(got, want)
    close(got_res, want_res)
    gu = rand(4096, 2 * INTER, scale=2.0)
    close(triton_ops.silu_and_mul(gu), reference.silu_and_mul(gu))


def test_rope_and_cache_write_bf16():
    from nanoflow.kernels import reference, triton_ops
    q, k, v, positions, cos_sin, num_blocks, slots = rope_inputs(8192)
    kc, vc = rand(num_blocks, BLOCK, HK, D), rand(num_blocks, BLOCK, HK, D)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    got_q = triton_ops.rope_and_cache_write(q, k, v, positions, cos_sin, kc, vc, slots)
    want_q = reference.rope_and_cache_write(q, k, v, positions, cos_sin, kc_ref, vc_ref, slots)
    close(got_q, want_q)
    close(kc, kc_ref)
    close(vc, vc_ref)


@pytest.mark.parametrize("kv_scale", [1.0, 1000.0], ids=["in-range", "saturating"])
def test_rope_and_cache_write_fp8(kv_scale):
    """x1000: most of k / v lies beyond +-448; the cast must saturate (never NaN), as the reference does."""
    from nanoflow.kernels import reference, rope
    q, k, v, positions, cos_sin, num_blocks, slots = rope_inputs(8192)
    k, v = (k * kv_scale).contiguous(), (v * kv_scale).contiguous()
    kc = torch.zeros(num_blocks, BLOCK, HK, D, device=DEV).to(FP8)
    vc = torch.zeros_like(kc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    got_q = rope.rope_and_cache_write(q, k, v, positions, cos_sin, kc, vc, slots)
    want_q = reference.rope_and_cache_write(q, k, v, positions, cos_sin, kc_ref, vc_ref, slots)
    close(got_q, want_q, FP8_TOL)
    close(kc, kc_ref, FP8_TOL)
    assert not (kc.float().isnan().any() or vc.float().isnan().any()), "kernel cache has NaN"
    assert not (kc_ref.float().isnan().any() or vc_ref.float().isnan().any()), "reference cache has NaN"
    assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8)), "v cache differs from the reference"
    want_v = v.float().clamp(-448, 448).to(FP8)
    assert torch.equal(vc.view(num_blocks * BLOCK, HK, D)[slots].view(torch.uint8), want_v.view(torch.uint8))


DECODE_CASES = [(256, 1024, False), (64, 4096, False), (512, 512, True)]


@pytest.mark.parametrize("r,ctx,ragged", DECODE_CASES)
def test_decode_attention(r, ctx, ragged):
    """The split-KV kernel and the engine's dispatch (triton_ops: the Hopper kernel where it runs),
    on the full grid and on grids capped at 66 / 32 programs (the SM budgets of overlap plans)."""
    from nanoflow.kernels import decode_attention, reference, triton_ops
    lens = lengths(r, ctx, ragged)
    kc, vc, table = make_cache(lens)
    q = rand(r, HQ, D)
    want = reference.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5)
    for fn in (decode_attention.paged_decode_attention, triton_ops.paged_decode_attention):
        for budget in (None, 66, 32):
            close(fn(q, kc, vc, table, lens, D ** -0.5, max_programs=budget, max_seq_len=int(lens.max())), want)


@pytest.mark.parametrize("programs", [132, 44])
def test_persistent_decode_attention(programs):
    from nanoflow.kernels import decode_attention_persistent as dap
    from nanoflow.kernels import reference
    lens = lengths(512, 1100, True)
    kc, vc, table = make_cache(lens)
    q = rand(512, HQ, D)
    want = reference.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5)
    programs = min(programs, torch.cuda.get_device_properties(0).multi_processor_count)
    close(dap.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5, num_programs=programs), want)


PREFILL_CASES = [[(0, 2048)], [(3072, 512)] * 4, [(0, 512), (1024, 512), (3000, 300), (100, 1)]]


def _prefill_inputs(chunks):
    lens = torch.tensor([c + n for c, n in chunks], device=DEV, dtype=torch.int32)
    qsl = torch.tensor([0] + [n for _, n in chunks], device=DEV).cumsum(0).to(torch.int32)
    kc, vc, table = make_cache(lens)
    return rand(int(qsl[-1]), HQ, D), kc, vc, table, qsl, lens


@pytest.mark.parametrize("chunks", PREFILL_CASES, ids=["one-2048", "4x512-on-3072", "mixed"])
def test_prefill_attention(chunks):
    from nanoflow.kernels import reference, triton_ops
    q, kc, vc, table, qsl, lens = _prefill_inputs(chunks)
    close(triton_ops.paged_prefill_attention(q, kc, vc, table, qsl, lens, D ** -0.5),
          reference.paged_prefill_attention(q, kc, vc, table, qsl, lens, D ** -0.5))


def _reference_on_fp8(fn, *args):
    """The reference on the fp8 caches; where this torch cannot index fp8 CUDA tensors, on exact bf16
    copies of them (the same values: the reference widens to fp32 either way)."""
    try:
        return fn(*args)
    except (RuntimeError, NotImplementedError):
        return fn(*[a.to(DT) if isinstance(a, torch.Tensor) and a.dtype == FP8 else a for a in args])


def test_fp8_decode_attention_split_kv_and_persistent():
    from nanoflow.kernels import decode_attention, reference
    from nanoflow.kernels import decode_attention_persistent as dap
    lens = lengths(512, 1100, True)
    kc16, vc16, table = make_cache(lens)
    kc, vc = kc16.to(FP8), vc16.to(FP8)
    q = rand(512, HQ, D)
    want = _reference_on_fp8(reference.paged_decode_attention, q, kc, vc, table, lens, D ** -0.5)
    for budget in (None, 44):
        got = decode_attention.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5, max_programs=budget,
                                                      max_seq_len=int(lens.max()))
        close(got, want, FP8_TOL)
    close(dap.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5, num_programs=44), want, FP8_TOL)


@pytest.mark.parametrize("chunks", PREFILL_CASES[1:], ids=["4x512-on-3072", "mixed"])
def test_fp8_prefill_attention(chunks):
    from nanoflow.kernels import prefill_attention, reference
    q, kc16, vc16, table, qsl, lens = _prefill_inputs(chunks)
    kc, vc = kc16.to(FP8), vc16.to(FP8)
    close(prefill_attention.paged_prefill_attention(q, kc, vc, table, qsl, lens, D ** -0.5),
          _reference_on_fp8(reference.paged_prefill_attention, q, kc, vc, table, qsl, lens, D ** -0.5), FP8_TOL)


def test_decode_attention_on_an_sm_partition_is_bitwise_the_whole_device():
    from nanoflow.kernels import decode_attention as split_kv
    from nanoflow.pipeline import sm_partition
    device = torch.device(DEV)
    if not sm_partition.available(device):
        pytest.skip("no CUDA green contexts here (cuda-python missing or too old)")
    lens = lengths(286, 1200, True)
    kc, vc, table = make_cache(lens)
    q = rand(286, HQ, D)
    want = split_kv.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5, max_seq_len=int(lens.max()))
    part = sm_partition.split_sms(device, 48)
    torch.cuda.synchronize()
    for stream in part.streams:
        with torch.cuda.stream(stream):
            got = split_kv.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5, max_seq_len=int(lens.max()))
        stream.synchronize()
        assert torch.equal(got, want)
