"""Mixtral: routing, the expert sort, the reference experts against transformers, plans on a MoE layer,
weight names, config errors, the preset's parameter counts. (Logits and greedy parity with transformers
on a tiny random Mixtral checkpoint: tests/test_model_parity.py, the 'mixtral' entry of TINY_CONFIGS.)"""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import transformers
from safetensors.torch import save_file

from nanoflow import EngineConfig
from nanoflow.kernels.moe_reference import max_aligned_blocks, moe_align, moe_experts, route
from nanoflow.models.config import ModelConfig
from nanoflow.models.loader import init_dummy_weights, iter_safetensors, load_model
from nanoflow.models.mixtral import MixtralForCausalLM
from nanoflow.models.presets import PRESETS
from nanoflow.models.registry import MODEL_CLASSES, model_class
from nanoflow.pipeline.executor import make_executor
from nanoflow.pipeline.plan import Plan, load_plan
from nanoflow.pipeline.plan_fold import fold_plan
from tests.greedy import greedy_tokens
from tests.tiny_checkpoints import make_checkpoint

CPU = torch.device("cpu")
TINY = dataclasses.replace(PRESETS["mixtral-8x7b"], vocab_size=96, hidden_size=32, intermediate_size=40,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_local_experts=5, num_experts_per_tok=2, bos_token_id=None, eos_token_ids=(),
                           torch_dtype="float32")


def _hf_moe_config(**kw) -> transformers.MixtralConfig:
    cfg = transformers.MixtralConfig(hidden_size=kw.pop("hidden", 32), intermediate_size=kw.pop("inter", 40), **kw)
    cfg._experts_implementation = "eager"  # the reference loop (transformers may pick a batched one)
    return cfg


# ---- routing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_route_equals_transformers_router(dtype, top_k):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    cfg = _hf_moe_config(num_local_experts=8, num_experts_per_tok=top_k)
    router = MixtralTopKRouter(cfg).to(dtype)
    g = torch.Generator().manual_seed(top_k)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 32, generator=g))
        x = torch.randn(300, 32, generator=g).to(dtype)
        # Rows with ties: bf16 logits collide easily; force exact ties on some rows too.
        x[:10] = 0.0                                     # all 8 logits equal: every expert ties
        x[10:20] = x[20:30]
        logits, want_w, want_ids = router(x)
        got_w, got_ids = route(torch.nn.functional.linear(x, router.weight), top_k)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)
    assert got_w.dtype == torch.float32
    torch.testing.assert_close(got_w.sum(-1), torch.ones(300), atol=1e-6, rtol=0)
    # all-equal logits: k distinct experts with weight 1/k each
    assert all(len(set(r)) == top_k for r in got_ids[:10].tolist())
    torch.testing.assert_close(got_w[:10], torch.full((10, top_k), 1.0 / top_k))


def test_route_renormalises_the_chosen_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 3.0]])
    w, ids = route(logits, 2)
    p = torch.softmax(logits, -1)
    assert ids[0].tolist() == [0, 1] and set(ids[1].tolist()) == {2, 3}
    torch.testing.assert_close(w[0], p[0, :2] / p[0, :2].sum())
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(w[0, 0] / w[0, 1], p[0, 0] / p[0, 1])   # ratios kept
    raw, _ = route(logits, 2, renormalize=False)
    torch.testing.assert_close(raw[0], p[0, :2])
    w1, _ = route(logits, 1)
    assert torch.equal(w1, torch.ones(2, 1))


# ---- the sort by expert -------------------------------------------------------------------------
@pytest.mark.parametrize("tokens, experts, top_k, block_m", [(1, 8, 2, 16), (37, 6, 2, 4), (64, 8, 2, 16),
                                                               (50, 5, 3, 8), (9, 16, 1, 4)])
def test_moe_align_sorts_every_assignment_into_single_expert_blocks(tokens, experts, top_k, block_m):
    g = torch.Generator().manual_seed(tokens)
    # skewed routing: expert 0 never chosen, expert 1 often, the rest uneven
    probs = torch.rand(tokens, experts, generator=g) * torch.linspace(0.2, 1.0, experts) ** 3
    probs[:, 0] = -1.0
    probs[: tokens // 2, 1] = 10.0
    ids = probs.topk(top_k, dim=-1).indices
    sorted_ids, block_expert = moe_align(ids, experts, block_m)
    n = tokens * top_k
    assert block_expert.numel() == max_aligned_blocks(n, experts, block_m)
    assert sorted_ids.numel() == block_expert.numel() * block_m
    assert sorted_ids.dtype == block_expert.dtype == torch.int32
    flat = ids.reshape(-1)
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))                         # each assignment once
    assert ((sorted_ids == n) | (sorted_ids < n)).all()                     # the rest is padding
    rows = sorted_ids.view(-1, block_m)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        members = [i for i in rows[b].tolist() if i < n]
        if e < 0:
            assert not members
            assert all(x < 0 for x in block_expert[b:].tolist())             # unused blocks come last
            continue
        assert members, "a block of an expert holds at least one row"
        assert all(flat[i].item() == e for i in members)
        assert members == sorted(members)                                   # order kept within an expert
        assert rows[b].tolist()[:len(members)] == members                   # padding only at the end
        seen.append(e)
    assert seen == sorted(seen) and 0 not in seen                            # experts in order; none empty
    counts = torch.bincount(flat, minlength=experts)
    assert [seen.count(e) for e in range(experts)] == [-(-int(c) // block_m) for c in counts]


# ---- the reference experts ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_experts_equal_transformers_block(dtype):
    """Same per-expert GEMMs and rounding; only the GEMMs' row order differs (transformers gathers an
    expert's tokens slot-major, we token-major), which a BLAS may round differently: fp32 to 1e-5,
    bf16 to one rounding step (it is bit-exact on the machine this was written on)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(_hf_moe_config(num_local_experts=6, num_experts_per_tok=2)).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        x = torch.randn(1, 45, 32).to(dtype)
        want = block(x)[0]
        w, ids = route(torch.nn.functional.linear(x[0], block.gate.weight), 2)
        out = torch.full_like(x[0], float("nan"))
        got = moe_experts(x[0], w, ids, block.experts.gate_up_proj, block.experts.down_proj, out=out)
    assert got is out
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2.0**-7, rtol=2.0**-7)
    torch.testing.assert_close(got, want, **tol)


def test_reference_experts_skip_unrouted_experts_and_handle_no_tokens():
    g = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(4, 12, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    x = torch.randn(5, 8, generator=g)
    ids = torch.tensor([[2, 2], [2, 2], [2, 2], [2, 2], [2, 2]])  # only expert 2, twice (weights split)
    w = torch.full((5, 2), 0.5)
    h = torch.nn.functional.silu(x @ w13[2, :6].T) * (x @ w13[2, 6:].T)
    torch.testing.assert_close(moe_experts(x, w, ids, w13, w2), h @ w2[2].T)
    assert moe_experts(x[:0], w[:0], ids[:0], w13, w2).shape == (0, 8)


# ---- plans on a MoE layer -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_ops():
    return MixtralForCausalLM(TINY, torch.float32, CPU).layers[0].ops


def test_moe_layer_shares_the_llama_attention_ops(moe_ops):
    from nanoflow.models.llama import LlamaForCausalLM
    dense = LlamaForCausalLM(dataclasses.replace(TINY, architecture="MistralForCausalLM", num_local_experts=0,
                                                 num_experts_per_tok=0), torch.float32, CPU).layers[0].ops
    assert [o.name for o in moe_ops] == [o.name for o in dense[:-3]] + ["moe"]
    moe = moe_ops[-1]
    assert moe.resource.value == "compute" and moe.reads == ("normed",) and moe.writes == ("hidden",)
    assert moe.replaces == ("gate_up_gemm", "act", "down_gemm")


@pytest.mark.parametrize("name", ["overlap-2", "nano-4", "overlap-split"])
def test_builtin_plans_fold_their_mlp_ops_into_moe(moe_ops, name):
    plan = load_plan(name)
    folded = fold_plan(plan, moe_ops)
    assert "moe" in folded.ops and not {"gate_up_gemm", "act", "down_gemm"} & set(folded.ops)
    assert folded.ops["moe"] == plan.ops["gate_up_gemm"]
    assert [(e.nano, e.layer_offset) for e in folded.order if e.op == "moe"] == \
        [(e.nano, e.layer_offset) for e in plan.order if e.op == "gate_up_gemm"]
    assert len(folded.order) == len(plan.order) - 2 * plan.ops["gate_up_gemm"].num_nano
    ex = make_executor(plan, moe_ops, CPU)  # the executor folds, validates and checks the data flow
    assert ex.plan == folded and ex.name == name
    # a dense layer is left alone, and a plan that names moe itself is not folded
    from nanoflow.models.llama import LlamaForCausalLM
    dense_ops = LlamaForCausalLM(PRESETS["default"], torch.float32, torch.device("meta")).layers[0].ops
    assert fold_plan(plan, dense_ops) is plan
    assert fold_plan(folded, moe_ops) is folded


def test_fold_refuses_mlp_ops_cut_differently(moe_ops):
    d = load_plan("overlap-2").to_dict()
    d["ops"]["down_gemm"]["cuts"] = [{"of": "decode", "at": 0.25}]
    with pytest.raises(ValueError, match="same cuts and stream"):
        make_executor(Plan.from_dict(d), moe_ops, CPU)


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory):
    return make_checkpoint("mixtral", tmp_path_factory.mktemp("moe"), num_layers=5)


def _greedy(path, plan: str, prompts, budget: int, **kw) -> list[list[int]]:
    return greedy_tokens(path, prompts, 6, max_num_batched_tokens=budget, plan=plan, **kw)


def test_every_plan_gives_the_sequential_tokens_on_mixtral(mixtral_ckpt, tmp_path):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.randrange(2, 25))] for _ in range(6)]
    reference = _greedy(mixtral_ckpt, "sequential", prompts, 24)
    # moe cut by tokens into 3 nano-batches, one with an SM budget (ignored on CPU, same function)
    own = load_plan("overlap-2").to_dict()
    for name in ("gate_up_gemm", "act", "down_gemm"):
        own["ops"].pop(name)
    own["ops"]["moe"] = {"stream": "compute", "cuts": [{"of": "tokens", "at": 0.3}, {"of": "tokens", "at": 0.8}],
                         "sm_budget": 7}
    own.pop("order")
    path = tmp_path / "moe-cuts.json"
    path.write_text(json.dumps(own))
    for plan in ("overlap-2", "nano-4", "overlap-split", str(path)):
        assert _greedy(mixtral_ckpt, plan, prompts, 24) == reference, plan


# ---- weights ------------------------------------------------------------------------------------
def test_checkpoint_names_are_mixtrals(mixtral_ckpt):
    names = set(dict(iter_safetensors(mixtral_ckpt)))
    model, _ = load_model(EngineConfig(model=str(mixtral_ckpt)), CPU, torch.float32)
    assert set(model.hf_weight_names()) == names
    assert "model.layers.4.block_sparse_moe.experts.5.w3.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names


def _stacked_checkpoint(tmp_path, src):
    """The same weights under transformers >= 5's in-memory names (stacked experts)."""
    model, _ = load_model(EngineConfig(model=str(src)), CPU, torch.float32)
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "stacked"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    stacked = {}
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}.mlp."
        stacked[pre + "gate.weight"] = layer.mlp.router_weight.clone()
        stacked[pre + "experts.gate_up_proj"] = layer.mlp.experts_gate_up.clone()
        stacked[pre + "experts.down_proj"] = layer.mlp.experts_down.clone()
    for name, t in iter_safetensors(src):
        if "block_sparse_moe" not in name:
            stacked[name] = t
    save_file(stacked, str(out / "model.safetensors"))
    return model, out


def test_expert_weights_land_where_the_names_say(mixtral_ckpt, tmp_path):
    model, stacked_dir = _stacked_checkpoint(tmp_path, mixtral_ckpt)
    weights = dict(iter_safetensors(mixtral_ckpt))
    layer = model.layers[3].mlp
    i = layer.inter
    pre = "model.layers.3.block_sparse_moe."
    assert torch.equal(layer.router_weight, weights[pre + "gate.weight"])
    for e in range(layer.num_experts):
        assert torch.equal(layer.experts_gate_up[e, :i], weights[pre + f"experts.{e}.w1.weight"])   # gate
        assert torch.equal(layer.experts_gate_up[e, i:], weights[pre + f"experts.{e}.w3.weight"])   # up
        assert torch.equal(layer.experts_down[e], weights[pre + f"experts.{e}.w2.weight"])
    again, _ = load_model(EngineConfig(model=str(stacked_dir)), CPU, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_missing_or_unknown_expert_weights_are_refused(mixtral_ckpt, tmp_path):
    weights = dict(iter_safetensors(mixtral_ckpt))
    cfg = (mixtral_ckpt / "config.json").read_text()
    for label, mutate, message in [
        ("missing", lambda w: w.pop("model.layers.2.block_sparse_moe.experts.4.w2.weight"),
         r"missing 1 weights.*layers.2.block_sparse_moe.experts.4.w2"),
        ("extra-expert", lambda w: w.update({"model.layers.0.block_sparse_moe.experts.6.w1.weight":
                                             torch.zeros(160, 64)}), "unexpected weight.*experts.6"),
        ("shape", lambda w: w.update({"model.layers.0.block_sparse_moe.experts.0.w1.weight": torch.zeros(64, 64)}),
         "shape mismatch.*experts.0.w1"),
    ]:
        w = {k: v.clone() for k, v in weights.items()}
        mutate(w)
        d = tmp_path / label
        d.mkdir()
        (d / "config.json").write_text(cfg)
        save_file(w, str(d / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_model(EngineConfig(model=str(d)), CPU, torch.float32)


def test_export_builds_the_transformers_model(mixtral_ckpt):
    from nanoflow.bench.hf_baseline import build_hf_model
    model, src = load_model(EngineConfig(model=str(mixtral_ckpt)), CPU, torch.float32)
    hf = build_hf_model({k: v.clone() for k, v in model.export_hf_state_dict().items()}, src.model_config, CPU,
                        torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(mixtral_ckpt, dtype=torch.float32).eval()
    ids = torch.arange(10, 30).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


# ---- configs, registry, preset ------------------------------------------------------------------
def _mixtral_dict(**kw) -> dict:
    d = TINY.to_hf_dict()
    d.update(kw)
    return d


@pytest.mark.parametrize("d, message", [
    (dict(architectures=["OlmoeForCausalLM"], model_type="olmoe"), "OlmoeForCausalLM is a mixture-of-experts"
                                                                   r".*q/k norms.*MixtralForCausalLM, Qwen2Moe"),
    (dict(architectures=["PhimoeForCausalLM"], model_type="phimoe"), "PhimoeForCausalLM.*sparsemixer"),
    (dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3"), "DeepseekV3ForCausalLM.*latent"),
    (dict(num_experts_per_tok=6), "num_experts_per_tok <= num_local_experts"),
    (dict(num_experts_per_tok=0), "1 <= num_experts_per_tok"),
    (dict(num_local_experts=None), "num_local_experts=None"),
    (dict(hidden_act="gelu"), "unsupported Mixtral expert activation 'gelu'"),
])
def test_unsupported_moe_configs_are_refused_clearly(d, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(_mixtral_dict(**d))


def test_mixtral_config_round_trip_and_registry():
    cfg = ModelConfig.from_hf_dict(_mixtral_dict())
    assert cfg == TINY and cfg.architecture == "MixtralForCausalLM"
    by_type = ModelConfig.from_hf_dict({k: v for k, v in _mixtral_dict().items() if k != "architectures"})
    assert by_type == TINY
    assert "num_local_experts" not in PRESETS["llama-3-8b"].to_hf_dict()      # dense configs stay as they were
    from nanoflow.models.config import SUPPORTED_ARCHITECTURES
    assert set(MODEL_CLASSES) == set(SUPPORTED_ARCHITECTURES)
    assert model_class("MixtralForCausalLM") is MixtralForCausalLM
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        model_class("GPT2LMHeadModel")


def test_mixtral_8x7b_preset_counts_and_meta_build():
    cfg = PRESETS["mixtral-8x7b"]
    assert cfg.num_parameters() == 46_702_792_704                 # Mixtral-8x7B-v0.1 as published
    assert cfg.num_active_parameters() == 12_879_925_248          # 2 of 8 experts: the 12.9e9 of the paper
    dense = PRESETS["mistral-7b"]
    assert dense.num_active_parameters() == dense.num_parameters()
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg, torch.bfloat16, torch.device("meta"))
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == pytest.approx(93.4e9, rel=1e-3)
    assert model.layers[0].mlp.experts_gate_up.shape == (8, 2 * 14336, 4096)


def test_dummy_weights_fill_the_parameters_in_place():
    """No host copy and no second copy: every parameter keeps its storage (on the GPU the generator
    is the device's; benchmarks/moe_gpu.py checks the peak memory of the 93 GB preset there)."""
    model = MixtralForCausalLM(TINY, torch.float32, CPU)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    init_dummy_weights(model, seed=0)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    assert all(torch.isfinite(p).all() and p.std() > 0 for p in model.parameters())


def test_throughput_bench_counts_active_parameters(mixtral_ckpt):
    from nanoflow.bench.throughput import run_throughput
    result = run_throughput(model=str(mixtral_ckpt), device="cpu", workload="constant:8:3", num_requests=3,
                            warmup_requests=1, use_tqdm=False)
    cfg = ModelConfig.from_pretrained_dir(mixtral_ckpt)
    assert result["num_params"] == cfg.num_active_parameters() < cfg.num_parameters()
    assert result["optimal_tokens_per_s"] == pytest.approx(result["gemm_peak_tflops"] * 1e12 /
                                                           (2 * cfg.num_active_parameters()))


# ---- fuzz: config.json fields, plans, the sort ----------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True), st.text(max_size=6),
                 st.lists(st.integers(0, 3), max_size=2))


@settings(max_examples=80, deadline=None)
@given(experts=_ANY, top_k=_ANY, act=st.one_of(st.just("silu"), _ANY))
def test_fuzz_mixtral_config_fields_parse_or_raise_value_error(experts, top_k, act):
    d = _mixtral_dict(num_local_experts=experts, num_experts_per_tok=top_k, hidden_act=act)
    try:
        cfg = ModelConfig.from_hf_dict(d)
    except ValueError:
        return
    assert 1 <= cfg.num_experts_per_tok <= cfg.num_local_experts and act == "silu"
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


_CUT = st.fixed_dictionaries({"of": st.sampled_from(["tokens", "decode", "prefill"]),
                              "at": st.sampled_from([0.25, 0.5, 0.75])})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.lists(_CUT, max_size=2), min_size=3, max_size=3),
       streams=st.lists(st.sampled_from(["compute", "memory"]), min_size=3, max_size=3),
       with_order=st.booleans())
def test_fuzz_dense_plans_fold_or_raise_value_error(moe_ops, cuts, streams, with_order):
    """A dense-layer plan runs on the MoE layer exactly when it is valid on the dense layer and cuts
    gate_up_gemm / act / down_gemm alike on one stream; otherwise a ValueError says why."""
    from nanoflow.models.llama import LlamaForCausalLM
    dense_ops = LlamaForCausalLM(PRESETS["default"], torch.float32, torch.device("meta")).layers[0].ops
    d = load_plan("overlap-2").to_dict()
    for name, c, s in zip(("gate_up_gemm", "act", "down_gemm"), cuts, streams):
        d["ops"][name] = {"stream": s, "cuts": c}
    if not with_order:
        d.pop("order")
    try:
        plan = Plan.from_dict(d)
        make_executor(plan, dense_ops, CPU)
    except ValueError:
        return  # invalid for the dense layer too (order / cut counts / cut order)
    alike = all(c == cuts[0] for c in cuts) and all(s == streams[0] for s in streams)
    if not alike:
        with pytest.raises(ValueError, match="same cuts and stream"):
            make_executor(plan, moe_ops, CPU)
        return
    ex = make_executor(plan, moe_ops, CPU)
    assert ex.plan.ops["moe"] == plan.ops["gate_up_gemm"]
    assert {"gate_up_gemm", "act", "down_gemm"}.isdisjoint(ex.plan.ops)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), experts=st.integers(1, 9), top_k=st.integers(1, 3), block_m=st.sampled_from([1, 2, 4, 16]),
       tokens=st.integers(1, 40))
def test_fuzz_moe_align_invariants(data, experts, top_k, block_m, tokens):
    top_k = min(top_k, experts)
    rows = [data.draw(st.permutations(range(experts)))[:top_k] for _ in range(tokens)]
    ids = torch.tensor(rows, dtype=torch.long)
    sorted_ids, block_expert = moe_align(ids, experts, block_m)
    n = tokens * top_k
    assert sorted(sorted_ids[sorted_ids < n].tolist()) == list(range(n))
    flat = ids.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        members = sorted_ids[b * block_m:(b + 1) * block_m]
        members = members[members < n]
        assert (e < 0) == (members.numel() == 0)
        assert e < 0 or bool((flat[members.long()] == e).all())
