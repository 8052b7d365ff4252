"""Host-side pieces of the Hopper decode kernel, runnable anywhere (the merge and q quantisation are
Triton kernels: the interpreter on CPU): the stream-K split, the partial bookkeeping (emulated in
torch) with the merge kernel against the reference, q quantisation, and the dispatch guards."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from kernel_helpers import DEVICE, make_paged_cache, randn

from nanoflow.kernels import decode_attention_dispatch as dispatch
from nanoflow.kernels import decode_attention_hopper as hopper
from nanoflow.kernels import decode_attention_plan as plan
from nanoflow.kernels import reference


def _cpu(*ts):
    return [t.cpu() for t in ts]


@given(lens=st.lists(st.integers(0, 300), min_size=1, max_size=6), hk=st.integers(1, 3),
       programs=st.integers(1, 40))
@settings(max_examples=60, deadline=None)
def test_program_ranges_cover_every_tile_once(lens, hk, programs):
    seq = torch.tensor(lens, dtype=torch.int32)
    n = plan.tiles_per_request(seq).tolist()
    tiles = [(r, h, t) for r in range(len(n)) for h in range(hk) for t in range(n[r])]
    seen = []
    for r, h, t, count in plan.program_ranges(seq, hk, programs):
        for _ in range(count):
            seen.append((r, h, t))
            t += 1
            if t == n[r]:
                t, h = 0, h + 1
                if h == hk:
                    h, r = 0, r + 1
    assert seen == tiles
    counts = [c for *_, c in plan.program_ranges(seq, hk, programs)]
    assert max(counts) - min(counts) <= 1  # balanced by tiles


@pytest.mark.parametrize("lens,hk,group,block,programs", [
    ([100, 1, 300], 2, 4, 16, 5),
    ([100, 0, 300], 2, 4, 16, 64),   # more programs than tiles: empty programs inside a chain
    ([1000], 1, 8, 16, 7),           # one item cut into many pieces
    ([65, 64, 63, 129, 700], 2, 2, 8, 3),
    ([5, 7], 2, 1, 64, 40),
])
def test_partials_and_merge_match_reference(gen, lens, hk, group, block, programs):
    d = 32
    k_cache, v_cache, table = make_paged_cache(gen, lens, block, hk, d, torch.float32)
    q = randn(gen, len(lens), hk * group, d)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want = reference.paged_decode_attention(q, k_cache, v_cache, table, seq, d ** -0.5)
    out, part_o, part_ml, part_id = plan.emulate_partials(*_cpu(q, k_cache, v_cache, table, seq), d ** -0.5,
                                                          programs)
    got = plan.merge(part_o.to(DEVICE), part_ml.to(DEVICE), part_id.to(DEVICE), out.to(DEVICE), hk)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_leaves_direct_items_alone(gen):
    """Programs that cut nothing write no partials: the merge must not touch their rows."""
    lens = [64, 64, 64, 64]
    k_cache, v_cache, table = make_paged_cache(gen, lens, 16, 1, 32, torch.float32)
    q = randn(gen, 4, 2, 32)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out, part_o, part_ml, part_id = plan.emulate_partials(*_cpu(q, k_cache, v_cache, table, seq), 0.2, 4)
    assert (part_id[:, 1] == -1).all()
    got = plan.merge(part_o.to(DEVICE), part_ml.to(DEVICE), part_id.to(DEVICE), out.to(DEVICE).clone(), 1)
    torch.testing.assert_close(got, out.to(DEVICE), atol=0, rtol=0)


def test_quantize_q_matches_torch(gen):
    q = randn(gen, 3, 8, 64) * 5
    q8, scales = plan.quantize_q(q)
    q8_ref, scales_ref = plan.quantize_q_reference(q)
    torch.testing.assert_close(scales, scales_ref)
    torch.testing.assert_close(q8.float(), q8_ref.float(), atol=0, rtol=0)  # rounded to nearest even
    assert (q8.float().abs().amax(-1) == 448).all()  # each row's amax maps to the top of the range


def test_reference_decode_dequantises_scaled_fp8(gen):
    lens = [40, 3]
    k_cache, v_cache, table = make_paged_cache(gen, lens, 16, 2, 32, torch.float32)
    q = randn(gen, 2, 4, 32)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ks, vs = 0.05, 0.02
    k8, v8 = (k_cache / ks).to(torch.float8_e4m3fn), (v_cache / vs).to(torch.float8_e4m3fn)
    got = reference.paged_decode_attention(q, k8, v8, table, seq, 0.2, k_scale=ks, v_scale=vs)
    want = reference.paged_decode_attention(q, k8.float() * ks, v8.float() * vs, table, seq, 0.2)
    torch.testing.assert_close(got, want)


def test_hopper_kernel_not_used_off_hopper():
    """No Hopper GPU here (or no Gluon): the dispatch keeps the existing kernels, and the kernel's
    own entry point says why it cannot run."""
    q = torch.zeros(1, 4, 64)
    kc = torch.zeros(2, 16, 2, 64)
    if not torch.cuda.is_available():
        assert not hopper.available(q.device)
        assert not dispatch.use_hopper(q, kc)


@pytest.mark.parametrize("q_shape,cache_shape,dtype,cache_dtype,reason", [
    ((1, 4, 32), (2, 16, 2, 32), torch.bfloat16, torch.bfloat16, "head_dim"),
    ((1, 32, 128), (2, 16, 2, 128), torch.bfloat16, torch.bfloat16, "GQA"),
    ((1, 4, 128), (2, 4, 2, 128), torch.bfloat16, torch.bfloat16, "block_size"),
    ((1, 4, 128), (2, 16, 2, 128), torch.float32, torch.float32, "q dtype"),
    ((1, 4, 128), (2, 16, 2, 128), torch.bfloat16, torch.float16, "cache dtype"),
])
def test_supports_names_the_reason(q_shape, cache_shape, dtype, cache_dtype, reason):
    q = torch.zeros(q_shape, dtype=dtype)
    kc = torch.zeros(cache_shape, dtype=cache_dtype)
    assert reason in hopper.supports(q, kc)
    assert hopper.supports(torch.zeros(1, 8, 128, dtype=torch.bfloat16),
                           torch.zeros(2, 16, 2, 128, dtype=torch.float8_e4m3fn)) is None


def test_config_validation():
    with pytest.raises(ValueError):
        hopper.HopperDecodeConfig(stages=1)
    with pytest.raises(ValueError):
        hopper.HopperDecodeConfig(ctas_per_sm=0)
    with pytest.raises(ValueError, match="fp8_tile_tokens"):
        hopper.HopperDecodeConfig(fp8_tile_tokens=96)
    with pytest.raises(ValueError, match="pipeline_pv"):
        hopper.HopperDecodeConfig(fp8_tile_tokens=128, pipeline_pv=True)
    cfg = hopper.HopperDecodeConfig(fp8_tile_tokens=128)
    assert (cfg.tile_tokens(fp8=True), cfg.tile_tokens(fp8=False)) == (128, hopper.BLOCK_T)


def test_config_parse_and_environment_override(monkeypatch):
    assert hopper.HopperDecodeConfig.parse("3/2/80/64/1") == hopper.HopperDecodeConfig(
        stages=2, ctas_per_sm=3, max_registers=80, fp8_tile_tokens=64, pipeline_pv=True)
    assert hopper.HopperDecodeConfig.parse(" 2/3/128 ") == hopper.HopperDecodeConfig(stages=3, max_registers=128)
    for bad in ("", "2/3", "2/3/128/64/1/0", "a/3/128", "2/-3/128", "2/3/128/96"):
        with pytest.raises(ValueError):
            hopper.HopperDecodeConfig.parse(bad)
    for fp8 in (False, True):
        monkeypatch.delenv(hopper.CONFIG_ENV[fp8], raising=False)
    assert hopper.default_config(True) is hopper.FP8_DEFAULT_CONFIG
    assert hopper.default_config(False) is hopper.BF16_DEFAULT_CONFIG
    monkeypatch.setenv(hopper.CONFIG_ENV[True], "4/2/64")
    assert hopper.default_config(True) == hopper.HopperDecodeConfig.parse("4/2/64")
    assert hopper.default_config(False) is hopper.BF16_DEFAULT_CONFIG  # each dtype has its own variable
    assert hopper.num_programs_for(10, fp8=True) == 40
    monkeypatch.setenv(hopper.CONFIG_ENV[False], "2/1/128")
    with pytest.raises(ValueError, match="NANOFLOW_HOPPER_BF16_CONFIG"):
        hopper.default_config(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_fp8_cache_write_matches_reference(gen, dtype):
    """The KV writer with per-tensor scales: the fp8 cache holds k / k_scale and v / v_scale."""
    from nanoflow.kernels import rope
    from kernel_helpers import fp8_rope_k_tolerance
    t, hq, hk, d, bs, nb = 7, 4, 2, 32, 4, 4
    q, k, v = randn(gen, t, hq, d, dtype=dtype), randn(gen, t, hk, d, dtype=dtype) * 30, randn(gen, t, hk, d, dtype=dtype)
    positions = torch.arange(t, device=DEVICE)
    cos_sin = torch.cat([torch.ones(16, d // 2), torch.zeros(16, d // 2)], -1).to(DEVICE)  # identity rotation
    slots = torch.randperm(nb * bs, generator=gen)[:t].to(DEVICE)
    caches = [torch.zeros(nb, bs, hk, d, dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(4)]
    reference.rope_and_cache_write(q, k, v, positions, cos_sin, caches[0], caches[1], slots, k_scale=0.25, v_scale=0.004)
    rope.rope_and_cache_write(q, k, v, positions, cos_sin, caches[2], caches[3], slots, k_scale=0.25, v_scale=0.004)
    torch.testing.assert_close(caches[2].float(), caches[0].float(), **fp8_rope_k_tolerance(dtype))
    assert torch.equal(caches[3].view(torch.uint8), caches[1].view(torch.uint8))
    assert caches[1].float().abs().max() == 448  # v / 0.004 saturates


@given(scale=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)))
@settings(max_examples=40, deadline=None)
def test_kv_scale_validation(scale):
    from nanoflow.kernels.rope import check_kv_scales
    fp8 = torch.zeros(1, dtype=torch.float8_e4m3fn)
    ok = isinstance(scale, (int, float)) and scale > 0 and scale < float("inf")
    if ok:
        check_kv_scales(fp8, scale, 1.0)
    else:
        with pytest.raises(ValueError):
            check_kv_scales(fp8, scale, 1.0)
    if scale != 1.0:
        with pytest.raises(ValueError):
            check_kv_scales(torch.zeros(1, dtype=torch.bfloat16), 1.0, scale)
