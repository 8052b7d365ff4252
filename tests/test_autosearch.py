"""Auto-search on CPU: the MILP on synthetic profile tables whose optimum is known, its plans against
the executor (and the sequential tokens), the plan cache, and `nanoflow tune` end to end (host timing,
tiny default model)."""
from __future__ import annotations

import json
from dataclasses import replace
import random
import warnings
from types import SimpleNamespace

import pytest
import torch

from nanoflow.autosearch.layout import Mode
from nanoflow.autosearch.milp import solve_structure
from nanoflow.autosearch.search import check_plan, search, sequential_ms, simulate_plan
from nanoflow.autosearch.profile import decode_sizes, op_meta, token_sizes
from nanoflow.pipeline import plan_cache as cache
from nanoflow.pipeline.profile_table import ProfileTable, budget_key
from nanoflow.pipeline.workload_class import workload_class_for
from nanoflow.models.llama import LlamaForCausalLM
from nanoflow.models.presets import PRESETS
from nanoflow.pipeline.executor import make_executor
from nanoflow.pipeline.plan_cache import resolve_plan
from nanoflow.pipeline.plan import SEQUENTIAL, Plan

NUM_SMS = 132
SATURATE = 44  # decode attention reaches full bandwidth from 44 SMs
BUDGETS = (16, 24, 32, 44, 56, 64)
# ms per 1024 rows on the whole device
GEMM_LIKE = {"input_norm": 0.01, "qkv_gemm": 0.10, "rope_kv_write": 0.01, "o_gemm": 0.07, "post_norm": 0.01,
             "gate_up_gemm": 0.45, "act": 0.02, "down_gemm": 0.23}


@pytest.fixture(scope="module")
def layer_ops():
    return LlamaForCausalLM(PRESETS["default"], torch.float32, torch.device("cpu")).layers[0].ops


@pytest.fixture(scope="module")
def metas(layer_ops):
    return [op_meta(op) for op in layer_ops]


def synthetic_table(metas, T=1024, D=1024, attn_ms=0.55, per_1k=None, phi_free=1.0, phi_shared=0.0,
                    iota=1.0, prefill_ms=0.05, budgets=BUDGETS) -> ProfileTable:
    """Compute ops: time linear in rows and inversely proportional to SMs. Decode attention: linear
    in decode rows, full bandwidth from SATURATE SMs, slower below. Interference: the compute stream
    loses phi ms per ms of memory op ('free': no SM split; 'shared': disjoint SMs)."""
    per_1k = {**GEMM_LIKE, **(per_1k or {})}
    P = T - D
    comp_budgets = [NUM_SMS - b for b in budgets]
    alone = {}
    for m in metas:
        name, series = m["name"], {}
        if name == "decode_attn":
            for b in [None, *budgets]:
                slow = 1.0 if b is None else max(1.0, SATURATE / b)
                series[budget_key(b)] = {str(n): attn_ms * n / D * slow for n in decode_sizes(D, 128)}
        elif name == "prefill_attn":
            for b in [None, *comp_budgets]:
                series[budget_key(b)] = {str(P): prefill_ms * (1.0 if b is None else NUM_SMS / b)} if P else {}
        else:
            for b in ([None, *comp_budgets] if m["resource"] == "compute" else [None]):
                f = 1.0 if b is None else NUM_SMS / b
                series[budget_key(b)] = {str(n): per_1k[name] * n / 1024 * f for n in token_sizes(T, D, 128)}
        alone[name] = series
    inter = []
    for b in [None, *budgets]:
        for m in metas:
            if m["name"] == "decode_attn":
                continue
            for mode, phi in (("free", phi_free), ("shared", phi_shared)):
                if mode == "shared" and (b is None or m["resource"] != "compute"):
                    continue
                inter.append({"side_op": "decode_attn", "side_budget": b, "comp_op": m["name"], "mode": mode,
                              "comp_budget": None, "comp_reps": 10, "side_rows": D, "comp_rows": T,
                              "side_alone_ms": 1.0, "comp_alone_ms": 0.2, "side_ms": iota,
                              "comp_ms": 2.0 + phi * iota})
    wl = {"name": "synthetic", "spec": "synthetic", "num_decode": D, "num_prefill_tokens": P,
          "decode_context": 1024, "prefill_chunk": 256, "prefill_context": 0}
    return ProfileTable(device="synthetic", num_sms=NUM_SMS, torch_version="-", triton_version=None, model={},
                        dtype="bfloat16", tp=1, dense_batch=T, workload=wl, num_tokens=T, num_decode=D,
                        prefill_chunks=[256] * (P // 256) + ([P % 256] if P % 256 else []), ops=metas,
                        memory_budgets=list(budgets), compute_budgets=comp_budgets, alone=alone,
                        interference=inter)


def test_profile_table_interpolates_and_round_trips(metas, tmp_path):
    t = synthetic_table(metas)
    # linear between grid points, flat below the smallest size, proportional above the largest
    assert t.op_time("gate_up_gemm", 512 + 64) == pytest.approx(0.45 * 576 / 1024)
    assert t.op_time("gate_up_gemm", 10) == pytest.approx(t.op_time("gate_up_gemm", 128))
    assert t.op_time("gate_up_gemm", 0) == 0.0
    assert t.op_time("gate_up_gemm", 1024, 108) == pytest.approx(0.45 * 132 / 108)
    assert t.op_time("input_norm", 1024, 108) == pytest.approx(0.01)  # not budgeted: full-device time
    assert t.interference_factors("shared", 24) == pytest.approx((1.0, 0.0))
    assert t.interference_factors("free", 24) == pytest.approx((1.0, 1.0))
    again = ProfileTable.load(t.save(tmp_path / "p.json"))
    assert again.alone == t.alone and again.ops == t.ops


def test_milp_finds_the_known_best_split(metas):
    # Negligible pre-attention work; memory (0.8 ms) equals the post-attention GEMMs (0.8 ms): the
    # 2-nano-batch pipeline hides one under the other only with an even split, period 0.8 + 0.004.
    t = synthetic_table(metas, attn_ms=0.8, per_1k={"input_norm": 0.0, "qkv_gemm": 0.004, "rope_kv_write": 0.0,
                                                   "o_gemm": 0.1, "post_norm": 0.0, "gate_up_gemm": 0.5,
                                                   "act": 0.0, "down_gemm": 0.2})
    cand = solve_structure(t, (2, 2, 2), Mode("stage1"))
    assert cand.cuts == (512,)
    assert cand.predicted_ms == pytest.approx(0.804, rel=1e-3)
    assert sequential_ms(t) == pytest.approx(1.604)
    assert simulate_plan(cand.plan, t) == pytest.approx(cand.predicted_ms, rel=1e-3)
    assert cand.plan.ops["decode_attn"].cuts[0].at == pytest.approx(0.5)


def test_milp_finds_the_known_best_sm_budget(metas):
    # Shared mode, no interference: period >= max(compute at 132 - b SMs, memory at b SMs); the best
    # budget is where that bound is lowest (24 SMs), and the pipeline reaches the bound.
    t = synthetic_table(metas)
    compute = sum(v for k, v in GEMM_LIKE.items() if k.endswith("gemm"))
    other = sum(v for k, v in GEMM_LIKE.items() if not k.endswith("gemm"))
    bound = {b: max(compute * NUM_SMS / (NUM_SMS - b) + other, 0.55 * max(1.0, SATURATE / b)) for b in BUDGETS}
    best_b = min(bound, key=bound.get)
    assert best_b == 24
    cands = search(t)
    top = cands[0]
    assert (top.mode, top.side_budget) == ("shared", 24)
    assert top.score == pytest.approx(bound[24], rel=0.01)
    assert top.plan.ops["decode_attn"].sm_budget == 24 and top.plan.ops["gate_up_gemm"].sm_budget == 108
    assert top.plan.ops["input_norm"].sm_budget is None
    seq = next(c for c in cands if c.mode == "sequential")
    assert seq.score == pytest.approx(sequential_ms(t)) and top.score < 0.8 * seq.score
    for c in cands:  # the MILP's schedule is achievable: replaying the plan is never slower
        assert c.simulated_ms <= c.predicted_ms * 1.001 + 1e-9


def test_joint_milp_matches_enumerating_the_splits(metas):
    # The one-hot split choice (with split-dependent dependencies: cuts in the decode or the prefill
    # region) gives the same optimum as solving every split on its own.
    from nanoflow.autosearch.milp import configs_for
    t = synthetic_table(metas, T=1024, D=640, attn_ms=0.6)
    mode = Mode("shared", 32, 1.0, 0.0)
    joint = solve_structure(t, (2, 2, 2), mode)
    configs = configs_for(t, 2)
    assert any(c[0] < 640 for c in configs) and any(c[0] > 640 for c in configs)
    each = [solve_structure(t, (2, 2, 2), mode, configs=[c]) for c in configs]
    assert joint.predicted_ms == pytest.approx(min(c.predicted_ms for c in each), rel=1e-4)


def test_when_overlap_cannot_help_sequential_or_no_slower(metas):
    # Every overlap costs: the compute stream stalls fully while the memory op runs (phi = 1), and a
    # memory op below 132 SMs is slower. Nothing beats sequential by the model.
    t = synthetic_table(metas, phi_free=1.0, phi_shared=1.0)
    for b in BUDGETS:  # no saturation: fewer SMs, slower memory op
        t.alone["decode_attn"][budget_key(b)] = {k: v * NUM_SMS / b for k, v in t.alone["decode_attn"]["full"].items()}
    cands = search(t)
    seq = next(c for c in cands if c.mode == "sequential")
    assert cands[0].mode == "sequential" or cands[0].score >= seq.score * (1 - 1e-6)
    assert all(c.score >= seq.score * (1 - 1e-6) for c in cands)


@pytest.mark.parametrize("T, D", [(1024, 512), (1024, 1024), (2048, 300)])
def test_every_plan_passes_the_executor(metas, layer_ops, T, D):
    t = synthetic_table(metas, T=T, D=D, attn_ms=0.5 * D / 512, budgets=(24, 44))
    cands = search(t, structures=[(2, 2, 2), (4, 4, 2), (2, 4, 2), (4, 4, 4)], time_limit=5, max_stage2=4)
    assert len(cands) > 3
    for c in cands:
        ex = make_executor(c.plan, layer_ops, torch.device("cpu"))  # validation + data flow on its batch
        check_plan(c.plan, t, layer_ops)  # and on the profiled batch shape
        assert Plan.from_dict(json.loads(json.dumps(c.plan.to_dict()))) == c.plan
        assert ex.name == c.plan.name


def test_auto_plan_gives_the_sequential_tokens(metas, tmp_path):
    from nanoflow import LLM, SamplingParams
    t = synthetic_table(metas, T=1024, D=512)
    cand = solve_structure(t, (4, 4, 2), Mode("shared", 24, 1.0, 0.0), time_limit=5)
    assert cand is not None and len(cand.plan.ops["qkv_gemm"].cuts) == 3
    path = tmp_path / "auto.json"
    cand.plan.save(path)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 500) for _ in range(rng.randrange(2, 20))]} for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tokens = {}
    for plan in ("sequential", str(path)):
        llm = LLM(model="default", device="cpu", max_num_batched_tokens=24, num_kv_blocks=64, block_size=4, plan=plan)
        tokens[plan] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens[str(path)] == tokens["sequential"]


def test_workload_classes():
    wl = workload_class_for("constant:512:1024", 2048, kv_capacity_tokens=800_000, max_num_seqs=1024,
                            max_model_len=8192)
    # KV-bound: 800k / 1536 = 520 running requests, all decoding; prefill refills 520 * 512 / 1024
    assert (wl.num_decode, wl.num_prefill_tokens, wl.decode_context) == (520, 260, 1024)
    assert wl.name == "dec65-ctx1024"
    wl = workload_class_for("constant:1024:512", 2048, kv_capacity_tokens=10**8, max_num_seqs=1024,
                            max_model_len=8192)
    assert wl.num_tokens == 2048 and wl.num_decode == 682  # token-budget-bound: decode share 512/1536
    mixed = workload_class_for("mixed", 512, kv_capacity_tokens=10**6, max_num_seqs=1024, max_model_len=2048)
    assert mixed.name == "mixed" and mixed.num_decode == 256 and mixed.num_prefill_tokens == 256
    small = workload_class_for("mixed", 512, kv_capacity_tokens=4096, max_num_seqs=1024, max_model_len=2048)
    assert small.num_decode * (small.decode_context + 16) <= 0.9 * 4096  # fits the cache
    with pytest.raises(ValueError, match="workload"):
        workload_class_for("bogus", 512, kv_capacity_tokens=4096, max_num_seqs=8, max_model_len=64)


def _fake_engine(layer_ops, budget=512):
    return SimpleNamespace(
        device=torch.device("cpu"), model_config=PRESETS["default"],
        model=SimpleNamespace(dtype=torch.float32, layers=[SimpleNamespace(ops=layer_ops)]),
        scheduler=SimpleNamespace(config=SimpleNamespace(token_budget=budget, max_num_seqs=64, kv_admission_ratio=1.0)),
        kv=SimpleNamespace(pool=SimpleNamespace(num_blocks=1024), block_size=16), max_model_len=2048)


def test_cache_store_and_lookup(layer_ops, tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(cache.WORKLOAD_ENV, raising=False)
    engine = _fake_engine(layer_ops)
    assert cache.lookup_plan(engine) is None
    overlap = Plan.from_dict({**resolve_plan("overlap-2", engine).to_dict(), "name": "tuned-a"})
    nano4 = Plan.from_dict({**resolve_plan("nano-4", engine).to_dict(), "name": "tuned-mixed"})
    key = cache.engine_key(engine, "dec65-ctx1024")
    path = cache.store_plan(overlap, key, {"measured_ms_per_step": 1.0})
    assert path.parent == tmp_path and path.is_file()
    assert cache.lookup_plan(engine) == overlap  # the only class: taken when nothing better fits
    cache.store_plan(nano4, key.with_class("mixed"))
    assert cache.lookup_plan(engine) == nano4  # serving default: the mixed class
    assert cache.lookup_plan(engine, workload="dec65-ctx1024") == overlap
    monkeypatch.setenv(cache.WORKLOAD_ENV, "dec65-ctx1024")
    assert cache.lookup_plan(engine) == overlap
    monkeypatch.delenv(cache.WORKLOAD_ENV)
    assert cache.lookup_plan(_fake_engine(layer_ops, budget=256)) is None  # another dense batch
    (tmp_path / (key.prefix() + "_broken.json")).write_text("{not json")
    assert cache.lookup_plan(engine) == nano4
    # resolve_plan('auto'): the cached plan, or sequential with a warning
    assert resolve_plan("auto", engine) == nano4
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match="no tuned plan"):
        assert resolve_plan("auto", engine) is SEQUENTIAL


def test_cache_key_separates_shapes():
    a = cache.model_shape_hash(PRESETS["llama-3-8b"])
    assert a == cache.model_shape_hash(PRESETS["llama-3.1-8b"])  # same layer work, other rope
    assert a != cache.model_shape_hash(PRESETS["qwen2-7b"]) and a != cache.model_shape_hash(PRESETS["mistral-7b"])


def test_cache_key_separates_expert_shapes():
    """Two MoE models that differ only in their experts do different work per layer: no shared plan."""
    base = PRESETS["mixtral-8x7b"]
    keys = {cache.model_shape_hash(base)}
    for change in (dict(num_local_experts=16), dict(num_experts_per_tok=1), dict(moe_intermediate_size=7168),
                   dict(shared_expert_intermediate_size=4096)):
        keys.add(cache.model_shape_hash(replace(base, **change)))
    assert len(keys) == 5
    # dense models hash as they did before the expert fields existed (their cached plans stay valid)
    dense = {k: getattr(PRESETS["llama-3-8b"], k) for k in cache._SHAPE_FIELDS}
    assert cache.model_shape_hash(dense) == cache.model_shape_hash(PRESETS["llama-3-8b"])


def test_tune_cli_end_to_end_on_cpu(tmp_path, monkeypatch, capsys):
    from nanoflow.engine.engine import LLMEngine
    from nanoflow.config import EngineConfig
    from nanoflow.entrypoints.cli import main
    out = tmp_path / "plan.json"
    profile = tmp_path / "profile.json"
    plans_dir = tmp_path / "plans"
    args = ["tune", "--model", "default", "--max-num-batched-tokens", "128", "--context", "32", "--quick",
            "--reps", "1", "--cache-dir", str(plans_dir), "--no-progress", "--no-hand-plans",
            "--output", str(out), "--profile-json", str(profile), "--device", "cpu"]
    # On CPU nothing is cached unless asked: CPU timings say nothing about a GPU.
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "vs seq" in text and "sequential" in text and "plan cache not written (on CPU; pass --store" in text
    assert not plans_dir.exists() or not list(plans_dir.glob("*.json"))
    assert profile.is_file() and ProfileTable.load(profile).device == "cpu" and out.is_file()
    # --store caches it (and a second tune reuses the stored profile)
    assert main(args + ["--store"]) == 0
    text = capsys.readouterr().out
    assert "[tune] cached" in text and "reusing profile" in text and "* sequential" in text  # CPU: sequential
    stored = Plan.load(out)
    files = sorted(p.name for p in plans_dir.glob("*.json"))
    assert len(files) == 2 and any(f.endswith("_mixed.json") for f in files)
    # --plan auto picks it up (no warning)
    monkeypatch.setenv(cache.CACHE_ENV, str(plans_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = LLMEngine(EngineConfig(model="default", device="cpu", max_num_batched_tokens=128, plan="auto"))
    assert engine.plan_name == stored.name
    # ... and the stored profile drives its per-step plan choice
    assert "profile stored for per-step plan choice" in text
    assert cache.lookup_profile(engine, plans_dir) is not None
    # 8 heads do not split over 3 ranks: a clear error before any worker starts
    assert main(["tune", "--model", "default", "--device", "cpu", "--tensor-parallel-size", "3"]) == 2
    assert "cannot be split over 3" in capsys.readouterr().err


def test_tune_never_stores_a_plan_picked_from_noise():
    from nanoflow.entrypoints.tune import MIN_STORED_SPEEDUP, choose_winner, required_speedup
    seq, plan = SimpleNamespace(name="sequential"), SimpleNamespace(name="auto-2")
    assert required_speedup(100.0, 100.0) == MIN_STORED_SPEEDUP
    assert required_speedup(100.0, 103.0) == pytest.approx(1.06)
    # A 1.014x 'win' while sequential's own two timings differ by 3% is noise.
    winner, ms, why = choose_winner(seq, 100.0, 103.0, [(plan, 100.0 / 1.014)], "cuda")
    assert winner is seq and ms == 100.0 and "1.060x" in why
    winner, _, _ = choose_winner(seq, 100.0, 100.5, [(plan, 80.0)], "cuda")
    assert winner is plan
    assert choose_winner(seq, 100.0, 100.0, [], "cuda")[0] is seq
    # On CPU streams do not overlap: even a 9x 'win' (seen on a busy 2-core host) is noise.
    winner, _, why = choose_winner(seq, 19_000.0, 19_500.0, [(plan, 2_000.0)], "cpu")
    assert winner is seq and "noise" in why
