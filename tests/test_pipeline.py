"""Pipeline plans: validation, JSON round trip, derived dependencies, and the same greedy tokens as the
sequential plan for every plan (the executor runs nano-ops in issue order on CPU)."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.models.llama import LlamaForCausalLM
from nanoflow.models.presets import PRESETS
from nanoflow.pipeline.executor import make_executor, synthetic_batch
from nanoflow.pipeline.plan import Plan, load_plan
from tests.greedy import greedy_tokens
from tests.tiny_checkpoints import make_checkpoint

OPS = ["input_norm", "qkv_gemm", "rope_kv_write", "decode_attn", "prefill_attn", "o_gemm", "post_norm",
       "gate_up_gemm", "act", "down_gemm"]
TOKEN_OPS = [o for o in OPS if o not in ("decode_attn", "prefill_attn")]


@pytest.fixture(scope="module")
def layer_ops():
    return LlamaForCausalLM(PRESETS["default"], torch.float32, torch.device("cpu")).layers[0].ops


def two_stream_plan(cut_of="decode", at=0.5, qkv_attn_nano=2) -> dict:
    cut = [{"of": cut_of, "at": at}]
    ops = {name: {"stream": "compute", "cuts": cut} for name in TOKEN_OPS}
    attn_cuts = [{"of": "decode", "at": k / qkv_attn_nano} for k in range(1, qkv_attn_nano)]
    ops["decode_attn"] = {"stream": "memory", "cuts": attn_cuts, "sm_budget": 44}
    ops["prefill_attn"] = {"stream": "compute"}
    return {"name": "test", "streams": [{"name": "compute"}, {"name": "memory", "priority": -1}], "ops": ops}


def test_json_round_trip_and_builtin_plans(tmp_path, layer_ops):
    plan = load_plan("overlap-2")
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    path = tmp_path / "p.json"
    plan.save(path)
    assert Plan.load(path) == plan
    make_executor(plan, layer_ops, torch.device("cpu"))  # validates against the model's data flow


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["ops"].update(bogus={}), "unknown op"),
    (lambda d: d["ops"]["qkv_gemm"].update(stream="nope"), "unknown stream"),
    (lambda d: d["ops"]["qkv_gemm"].update(cuts=[{"of": "decode", "at": 1.5}]), "fraction"),
    (lambda d: d["ops"]["qkv_gemm"].update(cuts=[{"of": "decode", "at": 0.6}, {"of": "decode", "at": 0.2}]),
     "increase"),
    (lambda d: d["ops"]["qkv_gemm"].update(cuts=[{"of": "rows"}]), "a cut is"),
    (lambda d: d["ops"]["decode_attn"].update(sm_budget=0), "sm_budget"),
    (lambda d: d.update(order=["qkv_gemm.0"]), "exactly once"),
    (lambda d: d.update(order=["qkv_gemm.0x"]), "order entry"),
    (lambda d: d["streams"][1].update(sms="half"), "sms must be one of"),
    (lambda d: d["streams"][1].update(sms="split"), "go together"),
    (lambda d: d.update(sm_split=64), "go together"),
    (lambda d: d.update(min_attn_share=1.5), "min_attn_share"),
])
def test_invalid_plans_raise_clear_errors(layer_ops, mutate, message):
    d = two_stream_plan()
    mutate(d)
    with pytest.raises(ValueError, match=message):
        make_executor(Plan.from_dict(d), layer_ops, torch.device("cpu"))


def test_sm_split_plans_round_trip_and_check_the_device(layer_ops):
    d = load_plan("overlap-2").to_dict()
    d.update(sm_split=64, min_attn_share=0.3)
    d["streams"][0]["sms"], d["streams"][1]["sms"] = "rest", "split"
    plan = Plan.from_dict(d)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.uses_sm_split() and plan.applies(0.3) and not plan.applies(0.29)
    names = [op.name for op in layer_ops]
    plan.validate(names, num_sms=132)
    with pytest.raises(ValueError, match="both sides"):
        dataclasses.replace(plan, sm_split=132).validate(names, num_sms=132)
    ex = make_executor(plan, layer_ops, torch.device("cpu"))  # CPU: ordinary nano-ops in issue order
    assert not ex.is_sequential() and ex.partition is None
    budgeted = Plan.from_dict(two_stream_plan())
    green = budgeted.with_sm_split(48)
    assert green.sm_split == 48 and [s.sms for s in green.streams] == ["rest", "split"]
    assert all(o.sm_budget is None for o in green.ops.values()) and green.order == budgeted.order
    green.validate(names, num_sms=132)


def test_order_that_breaks_data_flow_is_rejected(layer_ops):
    d = load_plan("overlap-2").to_dict()
    order = d["order"]
    # o_gemm.0 moved before decode_attn.0: it would read attention output not yet computed.
    order.remove("o_gemm.0")
    order.insert(order.index("decode_attn.0"), "o_gemm.0")
    with pytest.raises(ValueError, match="before all of its input"):
        make_executor(Plan.from_dict(d), layer_ops, torch.device("cpu"))


def test_dependencies_cross_streams_only_where_data_flows(layer_ops):
    ex = make_executor(load_plan("overlap-2"), layer_ops, torch.device("cpu"))
    nodes = ex.build([layer_ops] * 2, synthetic_batch(decode=8, prefill=(6,)))
    attn = [n for n in nodes if n.op.name == "decode_attn" and n.layer == 0]
    assert [(n.lo, n.hi, n.stream) for n in attn] == [(0, 4, 1), (4, 8, 1)]
    # decode attention of rows 0:4 waits for the rope of exactly those rows, on the other stream
    assert [(d.op.name, d.lo, d.hi) for d in attn[0].deps] == [("rope_kv_write", 0, 4)]
    o_first = next(n for n in nodes if n.op.name == "o_gemm" and n.layer == 0)
    assert attn[0] in o_first.deps and attn[1] not in o_first.deps


def test_replicated_rounds_equal_full_hazard_tracking():
    """Deep models replicate the generic round instead of tracking every layer: same result."""
    cfg = dataclasses.replace(PRESETS["default"], num_hidden_layers=11)
    model = LlamaForCausalLM(cfg, torch.float32, torch.device("meta"))
    layers = [layer.ops for layer in model.layers]
    for plan in ("overlap-2", "nano-4"):
        ex = make_executor(load_plan(plan), layers[0], torch.device("cpu"))
        for batch in (synthetic_batch(decode=9, prefill=(4, 6)), synthetic_batch(decode=0, prefill=(5,)),
                      synthetic_batch(decode=6, prefill=())):
            full = ex.build(layers, batch)
            grouped: dict[int, list] = {}
            for n in full:
                grouped.setdefault(n.layer - n.op_offset, []).append(n)
            key = lambda n: (n.layer, n.op.name, n.lo, n.hi, n.stream, n.cross_deps)  # noqa: E731
            expected = [[key(n) for n in grouped.get(r, [])] for r in range(len(layers) + 1)]
            rounds = ex.rounds(layers, batch)
            assert [[key(n) for n in nodes] for nodes in rounds] == expected
            # every waited-on nano-op records its event (the last layer may record one unused)
            for r, nodes in enumerate(rounds):
                for n in nodes:
                    assert all(rounds[r + dr][pos].needs_event for dr, pos in n.cross_deps)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("pipe"), num_layers=7)


def _greedy(ckpt, plan: str, prompts, budget: int) -> list[list[int]]:
    return greedy_tokens(ckpt, prompts, 8, max_num_batched_tokens=budget, plan=plan)


def test_every_plan_gives_the_sequential_tokens(ckpt, tmp_path):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.randrange(2, 30))] for _ in range(7)]
    reference = _greedy(ckpt, "sequential", prompts, 24)
    plans = ["overlap-2", "nano-4"]
    for i, (cut_of, at, nano) in enumerate([("tokens", 0.3, 3), ("prefill", 0.5, 4), ("decode", 0.25, 1)]):
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps(two_stream_plan(cut_of, at, nano)))
        plans.append(str(path))
    # Ops that write the same buffers (both norms write normed and residual) cut differently.
    mixed = two_stream_plan("tokens", 0.3, 2)
    mixed["ops"]["post_norm"]["cuts"] = [{"of": "tokens", "at": 0.6}]
    mixed["ops"]["input_norm"]["cuts"] = [{"of": "tokens", "at": 0.2}, {"of": "tokens", "at": 0.7}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(mixed))
    plans.append(str(path))
    split = load_plan("overlap-2").to_dict()
    split.update(sm_split=8)
    split["streams"][0]["sms"], split["streams"][1]["sms"] = "rest", "split"
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    plans.append(str(path))
    for plan in plans:
        assert _greedy(ckpt, plan, prompts, 24) == reference, plan


def test_min_attn_share_runs_other_steps_sequentially(ckpt, tmp_path):
    """A plan applies only to steps whose estimated decode-attention share reaches its threshold; the
    others run sequentially. The tokens are the same either way."""
    rng = random.Random(1)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.randrange(2, 30))] for _ in range(5)]
    reference = _greedy(ckpt, "sequential", prompts, 24)
    counts = {}
    for share in (0.0, 0.5, 0.999):
        d = load_plan("overlap-2").to_dict()
        d["min_attn_share"] = share
        path = tmp_path / f"share{share}.json"
        path.write_text(json.dumps(d))
        llm = LLM(model=str(ckpt), dtype="float32", device="cpu", num_kv_blocks=256, block_size=4,
                  max_num_batched_tokens=24, plan=str(path), plan_choice="predicted")
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == reference
        counts[share] = (llm.engine.stats().plan_steps, llm.engine.stats().num_steps)
    assert counts[0.0][0] == counts[0.0][1] > 0
    assert 0 < counts[0.5][0] < counts[0.5][1]  # prefill steps sequential, decode steps under the plan
    assert counts[0.999][0] == 0


def test_attention_share_grows_with_decode_context(ckpt):
    llm = LLM(model=str(ckpt), dtype="float32", device="cpu", num_kv_blocks=64, block_size=4)
    runner = llm.engine.runner
    batch = synthetic_batch(decode=4, prefill=(12,))
    shares = []
    for ctx in (0, 40, 400):
        batch.decode_context_tokens = ctx
        shares.append(runner.attention_share(batch))
    assert shares[0] == 0.0 and 0.0 < shares[1] < shares[2] < 1.0
