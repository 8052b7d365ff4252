"""GPU tests of the Hopper decode kernel (skipped without a Hopper GPU and the Gluon kernel).

Real shapes: bf16 relative error ||out - ref|| / ||ref|| < 1e-2 against the torch reference; fp8
(e4m3) KV with per-tensor scales against the reference run on the dequantised cache, bound FP8_TOL
(q is quantised to e4m3 per row: that is most of the error). The output is poisoned with NaN first,
so an unwritten row fails. Greedy tokens of a tiny checkpoint (head dim 64, GQA 4) with fp8 KV: the
Hopper kernel against the split-KV kernel on the same engine."""
from __future__ import annotations

import pytest
import torch

from nanoflow.kernels import decode_attention_hopper as hopper
from nanoflow.kernels import reference

_HOPPER = (torch.cuda.is_available() and hopper._IMPORT_ERROR is None and hopper._triton_ok()
           and torch.cuda.get_device_capability()[0] == 9)
pytestmark = pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU and the Gluon kernel (Triton 3.6)")


@pytest.fixture(autouse=True)
def _opt_in(monkeypatch):
    """The kernel is on by default; make sure no outer NANOFLOW_HOPPER_DECODE=0 turns it off."""
    monkeypatch.setenv("NANOFLOW_HOPPER_DECODE", "1")
DEV = torch.device("cuda")
FP8 = torch.float8_e4m3fn
FP8_TOL = 4e-2


def _inputs(lens, hk, group, d, bs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nblk = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(nblk) + 2
    table = torch.full((len(lens), max(1, max(nblk))), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)[:sum(nblk)].to(torch.int32)
    i = 0
    for r, n in enumerate(nblk):
        table[r, :n] = perm[i:i + n]
        i += n
    kc = torch.randn(num_blocks, bs, hk, d, generator=gen).to(torch.bfloat16)
    vc = torch.randn(num_blocks, bs, hk, d, generator=gen).to(torch.bfloat16)
    q = torch.randn(len(lens), hk * group, d, generator=gen).to(torch.bfloat16)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return q.to(DEV), kc.to(DEV), vc.to(DEV), table.to(DEV), lens_t.to(DEV)


def _rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


RAGGED = [0, 1, 63, 64, 65, 130, 1000, 3001]
FP8_CONFIGS = [None, hopper.HopperDecodeConfig(), hopper.HopperDecodeConfig(fp8_tile_tokens=128, stages=2),
               hopper.HopperDecodeConfig.parse("3/3/80")]
"""The default (4 CTAs x 2 stages), the old 2 x 4, 128-token tiles and 3 CTAs x 3 stages."""


@pytest.mark.parametrize("hk,group,d,bs,num_sms", [
    (8, 4, 128, 16, None), (8, 4, 128, 16, 3), (8, 4, 128, 64, 5), (4, 8, 64, 16, 7), (2, 1, 128, 32, 2),
    (2, 2, 64, 8, 1), (2, 6, 128, 128, 4)])
def test_hopper_decode_matches_reference(hk, group, d, bs, num_sms):
    q, kc, vc, table, lens = _inputs(RAGGED, hk, group, d, bs)
    scale = d ** -0.5
    want = reference.paged_decode_attention(q.float(), kc.float(), vc.float(), table, lens, scale)
    got = hopper.paged_decode_attention(q, kc, vc, table, lens, scale, num_sms=num_sms,
                                        out=torch.full_like(q, float("nan")))
    assert _rel(got, want) < 1e-2
    ks, vs = 0.05, 0.03
    k8, v8 = (kc.float() / ks).to(FP8), (vc.float() / vs).to(FP8)
    want8 = reference.paged_decode_attention(q.float(), k8, v8, table, lens, scale, k_scale=ks, v_scale=vs)
    for cfg in FP8_CONFIGS:
        got8 = hopper.paged_decode_attention(q, k8, v8, table, lens, scale, num_sms=num_sms, k_scale=ks,
                                             v_scale=vs, config=cfg, out=torch.full_like(q, float("nan")))
        assert _rel(got8, want8) < FP8_TOL, cfg


@pytest.mark.xfail(strict=True, reason="pipeline_pv writes NaN on an H100 (2026-12-07): a hazard between the "
                                       "in-flight PV wgmma and the double-buffered P / V. A suspect is fixed "
                                       "since (the stage released before every warp had widened its V), not yet "
                                       "run on a GPU: an XPASS here means it was the cause (then drop this mark)")
def test_pipelined_pv_consumer_matches_reference():
    q, kc, vc, table, lens = _inputs(RAGGED, 8, 4, 128, 16)
    ks, vs = 0.05, 0.03
    k8, v8 = (kc.float() / ks).to(FP8), (vc.float() / vs).to(FP8)
    want8 = reference.paged_decode_attention(q.float(), k8, v8, table, lens, 128 ** -0.5, k_scale=ks, v_scale=vs)
    got8 = hopper.paged_decode_attention(q, k8, v8, table, lens, 128 ** -0.5, k_scale=ks, v_scale=vs,
                                         config=hopper.HopperDecodeConfig(pipeline_pv=True),
                                         out=torch.full_like(q, float("nan")))
    assert _rel(got8, want8) < FP8_TOL


def test_hopper_decode_real_shape_and_dispatch():
    """R=256 contexts 512-2048, Llama-3-8B heads: matches the split-KV kernel; triton_ops dispatches to it."""
    from nanoflow.kernels import decode_attention as split_kv
    from nanoflow.kernels import decode_attention_dispatch as dispatch
    gen = torch.Generator().manual_seed(3)
    lens = torch.randint(512, 2049, (256,), generator=gen).tolist()
    q, kc, vc, table, sl = _inputs(lens, 8, 4, 128, 16, seed=3)
    want = split_kv.paged_decode_attention(q, kc, vc, table, sl, 128 ** -0.5)
    got = hopper.paged_decode_attention(q, kc, vc, table, sl, 128 ** -0.5)
    assert _rel(got, want) < 1e-2
    assert dispatch.use_hopper(q, kc)
    assert dispatch.use_hopper(q, kc.to(FP8))


def _greedy(path, kv_cache_dtype, prompts):
    """Greedy tokens and, per token, the logprobs of the two best tokens (the chosen one first)."""
    from nanoflow import LLM, SamplingParams
    llm = LLM(model=path, dtype="bfloat16", use_triton="on", num_kv_blocks=512, block_size=16,
              max_num_batched_tokens=256, gpu_memory_utilization=0.5, enforce_eager=True,
              kv_cache_dtype=kv_cache_dtype)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2), use_tqdm=False)
    return [(o.outputs[0].token_ids, [sorted((lp.logprob for lp in d.values()), reverse=True)
                                      for d in o.outputs[0].logprobs]) for o in outs]


def _diverge_only_at_near_ties(new, old, margin):
    """Sequences equal up to a first difference, and there the reference's two best tokens were
    within `margin` nats (a near-tie that rounding may flip; after it the contexts differ)."""
    for (a, _), (b, lps) in zip(new, old):
        if a == b:
            continue
        i = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
        gap = lps[i][0] - lps[i][1] if len(lps[i]) > 1 else 0.0
        assert gap < margin, f"tokens differ at {i} where the reference's top-2 gap was {gap:.3f} nats"


def test_greedy_tokens_fp8_kv(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from nanoflow.models.loader import default_model_dir
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.06)
    model.save_pretrained(tmp_path / "tiny-d64")
    tok.save_pretrained(tmp_path / "tiny-d64")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 4000, (n,), generator=gen).tolist() for n in (3, 17, 70, 300)]
    path = str(tmp_path / "tiny-d64")
    new_fp8 = _greedy(path, "fp8", prompts)
    new_bf16 = _greedy(path, "auto", prompts)
    monkeypatch.setenv("NANOFLOW_HOPPER_DECODE", "0")
    old_fp8 = _greedy(path, "fp8", prompts)
    old_bf16 = _greedy(path, "auto", prompts)
    assert all(len(t) == 24 for t, _ in new_fp8 + new_bf16)
    same_fp8 = sum(a[0] == b[0] for a, b in zip(new_fp8, old_fp8))
    same_bf16 = sum(a[0] == b[0] for a, b in zip(new_bf16, old_bf16))
    print(f"greedy tokens hopper == split-KV: fp8 KV {same_fp8}/4, bf16 KV {same_bf16}/4")
    # bf16 rounding differs between the kernels (fp8 also quantises q): only near-ties may flip.
    _diverge_only_at_near_ties(new_bf16, old_bf16, margin=0.05)
    _diverge_only_at_near_ties(new_fp8, old_fp8, margin=0.25)


@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_hopper_graph_form_replays_with_new_counts(cache):
    """triton_ops' graph form runs the Hopper kernel: captured once, replayed for several device-side
    decode counts and contexts; rows below the count match the reference, the rest keep NaN."""
    from nanoflow.kernels import triton_ops
    lens = [700, 33, 1, 1024, 300, 64, 5, 2000, 129, 17]
    q, kc, vc, table, sl = _inputs(lens, 8, 4, 128, 16, seed=5)
    if cache == "fp8":
        kc, vc = kc.to(FP8), vc.to(FP8)
    scale, row0 = 128 ** -0.5, 2
    num_rows = torch.zeros(1, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    assert triton_ops._dispatch.use_hopper(q, kc)

    def launch():
        triton_ops.paged_decode_attention_rows(q[row0:], kc, vc, table[row0:], sl[row0:], scale,
                                               num_rows=num_rows, row0=row0, out=out[row0:], max_programs=6)
    num_rows.fill_(len(lens))
    launch()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for n, new_lens in ((len(lens), None), (5, [90, 3, 1, 1000, 77, 64, 5, 8, 1, 2]), (2, None), (0, None)):
        if new_lens is not None:
            sl.copy_(torch.tensor(new_lens, dtype=torch.int32, device=DEV))  # <= the table's blocks
        num_rows.fill_(n)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        rows = slice(row0, max(row0, n))
        want = reference.paged_decode_attention(q[rows].float(), kc.float(), vc.float(), table[rows], sl[rows],
                                                scale)
        if n > row0:
            assert _rel(out[rows], want) < (FP8_TOL if cache == "fp8" else 1e-2)
        assert torch.isnan(out[:row0]).all() and torch.isnan(out[max(row0, n):]).all()
