"""Per-step plan choice from a device profile (synthetic ProfileTables whose answer is known), its
cache of decisions, the fixed-rate fallback, and the profile lookup the engine does."""
from __future__ import annotations

import random
import warnings

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.autosearch.profile import op_meta
from nanoflow.pipeline import plan_cache as cache
from nanoflow.forward_batch import ForwardBatch
from nanoflow.models.llama import LlamaForCausalLM
from nanoflow.models.presets import PRESETS
from nanoflow.pipeline.executor import make_executor, synthetic_batch
from nanoflow.pipeline.plan import load_plan
from nanoflow.pipeline.plan_choice import PlanChooser, StepCostModel, StepFeatures
from tests.test_autosearch import GEMM_LIKE, synthetic_table

LAYERS = 32


@pytest.fixture(scope="module")
def layer_ops():
    return LlamaForCausalLM(PRESETS["default"], torch.float32, torch.device("meta")).layers[0].ops


@pytest.fixture(scope="module")
def metas(layer_ops):
    return [op_meta(op) for op in layer_ops]


def _batch(num_decode: int, prefill: tuple[int, ...], context: int) -> ForwardBatch:
    b = synthetic_batch(num_decode, prefill)
    b.decode_context_tokens = num_decode * context
    return b


def test_sequential_prediction_is_the_sum_of_op_times(metas, layer_ops):
    table = synthetic_table(metas, phi_free=0.0)
    cost = StepCostModel(table, layer_ops, LAYERS)
    f = StepFeatures(1024, 1024, 1024 * 1024)  # the profiled batch
    want = LAYERS * (sum(table.op_time(m["name"], 1024) for m in metas if m["scope"] == "all")
                     + table.op_time("decode_attn", 1024))
    assert cost.sequential_ms(f) == pytest.approx(want)
    longer = StepFeatures(1024, 1024, 1024 * 4096)  # 4x the context: 4x the attention
    assert cost.sequential_ms(longer) - cost.sequential_ms(f) == pytest.approx(3 * LAYERS * table.op_time("decode_attn", 1024))
    assert 0 < cost.attention_share(f) < cost.attention_share(longer) < 1


def test_plan_runs_only_where_it_is_predicted_to_win(metas, layer_ops):
    """Overlap hides decode attention behind the GEMMs: it wins on decode-heavy steps with long
    contexts, not on a prefill-heavy step with little attention (its nano-batches cost more)."""
    table = synthetic_table(metas, phi_free=0.1, per_1k={"qkv_gemm": 0.2})
    ex = make_executor(load_plan("overlap-2"), layer_ops, torch.device("cpu"))
    chooser = PlanChooser(ex, StepCostModel(table, layer_ops, LAYERS))
    assert chooser.runs_plan(_batch(512, (), 2048))
    assert not chooser.runs_plan(_batch(4, (1020,), 64))
    for (seq, plan) in chooser.predictions.values():
        assert seq > 0 and plan > 0
    # the compute stream stalls whenever attention runs beside it: overlap never pays
    stalled = PlanChooser(ex, StepCostModel(synthetic_table(metas, phi_free=1.0), layer_ops, LAYERS))
    assert not stalled.runs_plan(_batch(512, (), 2048)) and not stalled.runs_plan(_batch(4, (1020,), 64))


def test_decisions_are_cached_per_bucket(metas, layer_ops):
    table = synthetic_table(metas, phi_free=0.1)
    ex = make_executor(load_plan("nano-4"), layer_ops, torch.device("cpu"))
    chooser = PlanChooser(ex, StepCostModel(table, layer_ops, LAYERS))
    builds = ex.num_builds
    rng = random.Random(0)
    for _ in range(200):  # 500..512 decode rows, contexts 1000..1100: one bucket
        d = rng.randrange(500, 513)
        chooser.runs_plan(_batch(d, (), rng.randrange(1000, 1100)))
    assert len(chooser.predictions) == 1 and ex.num_builds - builds == 1


def test_green_split_plans_use_partition_budgets(metas, layer_ops):
    table = synthetic_table(metas, phi_free=1.0)  # 'free' interference is irrelevant on disjoint SMs
    ex = make_executor(load_plan("overlap-split"), layer_ops, torch.device("cpu"))
    cost = StepCostModel(table, layer_ops, LAYERS)
    node = next(n for n in ex.build([layer_ops] * 3, synthetic_batch(64, ())) if n.op.name == "decode_attn")
    assert cost._budget(ex, node) == 64 and cost._factors(ex) == (1.0, 0.0)
    gemm = next(n for n in ex.build([layer_ops] * 3, synthetic_batch(64, ())) if n.op.name == "gate_up_gemm")
    assert cost._budget(ex, gemm) == 132 - 64
    # a budget the profile did not time: the nearest timed one, scaled by the SM ratio
    op = next(o for o in layer_ops if o.name == "gate_up_gemm")
    f = StepFeatures(1024, 0, 0)
    assert cost.op_ms(op, 1024, 50, f) == pytest.approx(table.op_time("gate_up_gemm", 1024, 68) * 68 / 50)
    assert cost.op_ms(op, 1024, 66, f) == pytest.approx(GEMM_LIKE["gate_up_gemm"] * 132 / 68 * 68 / 66)


def test_no_profile_falls_back_to_fixed_rates_and_says_so_once(layer_ops):
    ex = make_executor(load_plan("overlap-split"), layer_ops, torch.device("cpu"))
    chooser = PlanChooser(ex, None, fixed_share=lambda b: b.num_decode / b.num_tokens)
    with pytest.warns(UserWarning, match="no profile"):
        assert chooser.runs_plan(_batch(10, (), 100))        # share 1.0 >= 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not chooser.runs_plan(_batch(1, (9,), 100))   # share 0.1: sequential, and no second warning


def test_a_profile_of_another_model_is_refused(metas, layer_ops):
    table = synthetic_table([m for m in metas if m["name"] != "gate_up_gemm"])
    with pytest.raises(ValueError, match="gate_up_gemm"):
        StepCostModel(table, layer_ops, LAYERS)


def test_engine_finds_the_profile_and_keeps_the_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "plans"))
    llm = LLM(model="default", device="cpu", dtype="float32", num_kv_blocks=128, block_size=4,
              max_num_batched_tokens=32, plan="sequential")
    runner = llm.engine.runner
    metas = [op_meta(op) for op in runner.model.layers[0].ops]
    table = synthetic_table(metas, T=32, D=16, phi_free=0.05, per_1k={"qkv_gemm": 0.2})
    key = cache.engine_key(llm.engine)
    table.save(cache.profile_dir() / key.filename())
    assert cache.lookup_profile(llm.engine) is not None
    prompts = [[random.Random(i).randrange(10, 400) for _ in range(5 + 3 * i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                               use_tqdm=False)]
    llm.set_plan("overlap-2")
    assert runner.profile is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a profile: no fixed-rate warning
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert runner._chooser.predictions  # decisions came from the profile
