"""Qwen3 (dense), Qwen3-MoE and Qwen2-MoE: every plan and the graph form give the sequential tokens, the
q/k norm's op declares what it writes, the routing follows norm_topk_prob, configs parse or fail clearly,
the presets' active parameters, memory estimate and export. (Logits and greedy parity with transformers
on tiny random checkpoints: tests/test_model_parity.py, the 'qwen3', 'qwen3-moe', 'qwen2-moe' entries of
TINY_CONFIGS; tensor parallelism: tests/test_tp_sharding.py, tests/test_tensor_parallel.py; the Triton
kernels on these models: tests/kernels/test_qwen_triton.py.)"""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow import EngineConfig
from nanoflow.memory_check import estimate_need
from nanoflow.models.config import UNSUPPORTED_MOE, ModelConfig
from nanoflow.models.llama import LlamaForCausalLM
from nanoflow.models.loader import iter_safetensors, load_model
from nanoflow.models.presets import PRESETS
from nanoflow.models.qwen_moe import QwenMoeForCausalLM
from nanoflow.models.registry import model_class
from nanoflow.pipeline.graphs import GraphSet
from tests.greedy import greedy_run, plan_on_every_step
from tests.test_model_parity import LOGITS_ATOL, _all_position_logits, _engine, _prompt
from tests.tiny_checkpoints import make_checkpoint

CPU = torch.device("cpu")
NAMES = ("qwen3", "qwen3-moe", "qwen2-moe")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {name: make_checkpoint(name, root, num_layers=3) for name in NAMES}


# ---- plans and graphs ---------------------------------------------------------------------------


def _tokens(path, plan: str, prompts, graphs: bool = False) -> list[list[int]]:
    def graph_form(llm):  # fixed buffers, device-side counts and padding, without capture (CPU)
        r = llm.engine.runner
        r.graphs = GraphSet(r.model, r.workspace, r.kv_caches, r.block_size, 64, capture=False)
    tokens, llm = greedy_run(path, prompts, 6, graph_form if graphs else None, max_num_batched_tokens=24,
                             plan=plan)
    log = llm.engine.runner.step_log
    assert all(s.graph for s in log) if graphs else True
    assert all(s.plan for s in log) == (plan != "sequential")  # min_attn_share 0: the plan ran every step
    return tokens


@pytest.mark.parametrize("name", NAMES)
def test_every_builtin_plan_and_the_graph_form_give_the_sequential_tokens(ckpts, name, tmp_path):
    rng = random.Random(1)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.randrange(2, 25))] for _ in range(6)]
    reference = _tokens(ckpts[name], "sequential", prompts)
    for plan in ("overlap-2", "nano-4", "overlap-split"):
        assert _tokens(ckpts[name], plan_on_every_step(plan, tmp_path), prompts) == reference, plan
    assert _tokens(ckpts[name], "sequential", prompts, graphs=True) == reference
    assert _tokens(ckpts[name], plan_on_every_step("overlap-2", tmp_path), prompts, graphs=True) == reference


def test_qk_norm_runs_in_rope_kv_write_and_declares_the_qkv_write():
    cfg = dataclasses.replace(PRESETS["qwen3-8b"], vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              torch_dtype="float32")
    ops = LlamaForCausalLM(cfg, torch.float32, CPU).layers[0].ops
    dense = LlamaForCausalLM(dataclasses.replace(cfg, architecture="Qwen2ForCausalLM"), torch.float32, CPU).layers[0]
    assert [o.name for o in ops] == [o.name for o in dense.ops]        # same ops: every plan applies
    rope = next(o for o in ops if o.name == "rope_kv_write")
    assert rope.reads == ("qkv",) and rope.writes == ("qkv", "q_rot", "kv")
    assert next(o for o in dense.ops if o.name == "rope_kv_write").writes == ("q_rot", "kv")
    assert dense.q_norm is None and dense.k_norm is None


def rope_op_outputs(model, positions: torch.Tensor, qkv: torch.Tensor):
    """Runs layer 0's rope_kv_write on `qkv` rows (one slot per row): (q_rot, k cache rows, v cache rows)."""
    from types import SimpleNamespace
    from nanoflow.models.llama import StepState
    layer, t = model.layers[0], qkv.shape[0]
    ws = model.new_workspace(t)
    ws.qkv.copy_(qkv)
    caches = [(torch.zeros(t, 1, layer.num_kv, layer.head_dim), torch.zeros(t, 1, layer.num_kv, layer.head_dim))]
    batch = SimpleNamespace(positions=positions, slot_mapping=torch.arange(t))
    next(o for o in layer.ops if o.name == "rope_kv_write").fn(StepState(batch, ws, caches), 0, t)
    return ws.q_rot.view(t, layer.num_q, layer.head_dim), caches[0][0][:, 0], caches[0][1][:, 0]


def expected_rope_outputs(model, positions: torch.Tensor, qkv: torch.Tensor):
    """rope(rms_norm(head)) of every q and k head with the layer's q_norm / k_norm (transformers' order)."""
    from nanoflow.kernels import reference
    layer, t = model.layers[0], qkv.shape[0]
    hq, hk, d = layer.num_q, layer.num_kv, layer.head_dim
    q = qkv[:, :hq * d].reshape(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].reshape(t, hk, d)
    v = qkv[:, (hq + hk) * d:].reshape(t, hk, d)
    rope = lambda x: reference.apply_rope(x, positions, model.cos_sin)  # noqa: E731
    return (rope(reference.rms_norm(q, layer.q_norm, layer.eps)), rope(reference.rms_norm(k, layer.k_norm, layer.eps)),
            v)


def test_q_and_k_are_normalised_per_head_before_rope(ckpts):
    model, _ = load_model(EngineConfig(model=str(ckpts["qwen3"])), CPU, torch.float32)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(7, model.layers[0].qkv_weight.shape[0], generator=g) * 3
    positions = torch.tensor([0, 1, 2, 5, 9, 40, 100])
    got = rope_op_outputs(model, positions, qkv)
    want = expected_rope_outputs(model, positions, qkv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    from nanoflow.kernels import reference  # not the rotation of the raw heads: the norm is applied
    raw_q = reference.apply_rope(qkv[:, :4 * 24].reshape(7, 4, 24), positions, model.cos_sin)
    assert (got[0] - raw_q).abs().max() > 0.5


# ---- routing ------------------------------------------------------------------------------------
def test_norm_topk_prob_is_honoured_and_matters(ckpts, tmp_path):
    """The tiny Qwen3-MoE renormalises (as the real checkpoints), the Qwen2-MoE does not; flipping the
    flag in config.json changes the logits well past the parity bound (so parity tests see it)."""
    for name, want in (("qwen3-moe", True), ("qwen2-moe", False)):
        src = ckpts[name]
        assert ModelConfig.from_pretrained_dir(src).norm_topk_prob is want
        flipped = tmp_path / name
        flipped.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        cfg["norm_topk_prob"] = not want
        (flipped / "config.json").write_text(json.dumps(cfg))
        for f in src.iterdir():
            if f.name != "config.json":
                (flipped / f.name).symlink_to(f)
        prompt = _prompt(30, seed=2, vocab=4096)
        a = _all_position_logits(_engine(src), prompt)
        b = _all_position_logits(_engine(flipped), prompt)
        assert (a - b).abs().max() > 100 * LOGITS_ATOL, name


def test_shared_expert_is_gated_and_added(ckpts):
    """Zeroing the shared expert's gate weights makes its scale sigmoid(0) = 1/2 on every token: the
    logits move well past the parity bound (the gate is applied)."""
    engine = _engine(ckpts["qwen2-moe"])
    prompt = _prompt(25, seed=4, vocab=engine.model_config.vocab_size)
    base = _all_position_logits(engine, prompt)
    mlp = engine.runner.model.layers[1].mlp
    assert mlp.shared_gate.shape == (1, 64) and mlp.shared_gate_up.shape == (2 * 96, 64)
    with torch.no_grad():
        mlp.shared_gate.zero_()
    engine2 = _engine(ckpts["qwen2-moe"])
    engine2.runner.model.load_state_dict(engine.runner.model.state_dict())
    assert (base - _all_position_logits(engine2, prompt)).abs().max() > 100 * LOGITS_ATOL


# ---- weights ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_names_and_export(ckpts, name):
    from nanoflow.bench.hf_baseline import build_hf_model
    path = ckpts[name]
    model, src = load_model(EngineConfig(model=str(path)), CPU, torch.float32)
    assert set(model.hf_weight_names()) == set(dict(iter_safetensors(path)))
    hf = build_hf_model({k: v.clone() for k, v in model.export_hf_state_dict().items()}, src.model_config, CPU,
                        torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.arange(10, 30).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_stacked_expert_names_load_the_same_weights(ckpts, tmp_path):
    """transformers >= 5's in-memory names (stacked experts) load like the per-expert checkpoint."""
    from safetensors.torch import save_file
    src = ckpts["qwen2-moe"]
    model, _ = load_model(EngineConfig(model=str(src)), CPU, torch.float32)
    out = tmp_path / "stacked"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    tensors = {n: t for n, t in iter_safetensors(src) if ".mlp.experts." not in n}
    for i, layer in enumerate(model.layers):
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = layer.mlp.experts_gate_up.clone()
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = layer.mlp.experts_down.clone()
    save_file(tensors, str(out / "model.safetensors"))
    again, _ = load_model(EngineConfig(model=str(out)), CPU, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    weights = dict(iter_safetensors(src))
    i = model.layers[2].mlp.inter
    assert torch.equal(model.layers[2].mlp.experts_gate_up[4, i:], weights["model.layers.2.mlp.experts.4.up_proj.weight"])


# ---- configs ------------------------------------------------------------------------------------
def _hf_dict(name: str, **kw) -> dict:
    d = PRESETS[name].to_hf_dict()
    d.update(kw)
    return d


def test_configs_round_trip_and_registry():
    for name in ("qwen3-8b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b"):
        cfg = PRESETS[name]
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
        by_type = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
        assert ModelConfig.from_hf_dict(by_type) == cfg
    assert model_class("Qwen3ForCausalLM") is LlamaForCausalLM
    assert model_class("Qwen3MoeForCausalLM") is model_class("Qwen2MoeForCausalLM") is QwenMoeForCausalLM
    assert not {"Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"} & set(UNSUPPORTED_MOE)
    assert PRESETS["qwen3-8b"].qk_norm and PRESETS["qwen3-30b-a3b"].qk_norm
    assert not PRESETS["qwen1.5-moe-a2.7b"].qk_norm and PRESETS["qwen1.5-moe-a2.7b"].attention_bias
    d = PRESETS["qwen3-30b-a3b"].to_hf_dict()
    assert d["num_experts"] == 128 and "num_local_experts" not in d
    assert "moe_intermediate_size" not in PRESETS["qwen3-8b"].to_hf_dict()


def test_config_field_spellings_of_real_checkpoints():
    """Qwen3-30B-A3B's config.json says num_experts; transformers 5's save_pretrained writes
    num_local_experts for Qwen3-MoE. Qwen3 without head_dim means 128 (its config class default);
    Qwen2-MoE's biases come from qkv_bias (default true)."""
    d = _hf_dict("qwen3-30b-a3b")
    d["num_local_experts"] = d.pop("num_experts")
    assert ModelConfig.from_hf_dict(d) == PRESETS["qwen3-30b-a3b"]
    d = _hf_dict("qwen3-8b", hidden_size=2048)
    d.pop("head_dim")
    assert ModelConfig.from_hf_dict(d).head_dim == 128
    d = _hf_dict("qwen1.5-moe-a2.7b")
    d.pop("qkv_bias")
    assert ModelConfig.from_hf_dict(d).attention_bias
    assert not ModelConfig.from_hf_dict(_hf_dict("qwen1.5-moe-a2.7b", qkv_bias=False)).attention_bias
    d = _hf_dict("qwen1.5-moe-a2.7b")
    d.pop("norm_topk_prob")
    assert ModelConfig.from_hf_dict(d).norm_topk_prob is False  # transformers' default


@pytest.mark.parametrize("name, kw, message", [
    ("qwen3-30b-a3b", dict(decoder_sparse_step=2), r"dense MLP layers among the MoE layers.*decoder_sparse_step=2"),
    ("qwen3-30b-a3b", dict(mlp_only_layers=[0, 3]), r"mlp_only_layers=\[0, 3\]"),
    ("qwen1.5-moe-a2.7b", dict(mlp_only_layers=[1]), "Qwen2-MoE configs with dense MLP layers"),
    ("qwen3-30b-a3b", dict(num_experts=0), "1 <= num_experts_per_tok <= num_experts"),
    ("qwen3-30b-a3b", dict(num_experts_per_tok=200), "num_experts_per_tok=200"),
    ("qwen3-30b-a3b", dict(moe_intermediate_size=None), "positive integer moe_intermediate_size"),
    ("qwen1.5-moe-a2.7b", dict(shared_expert_intermediate_size=0), "positive integer shared_expert_intermediate_size"),
    ("qwen3-30b-a3b", dict(norm_topk_prob="yes"), "norm_topk_prob must be true or false"),
    ("qwen3-30b-a3b", dict(hidden_act="gelu"), "unsupported Qwen3-MoE expert activation 'gelu'"),
    ("qwen3-8b", dict(use_sliding_window=True), "use_sliding_window is not supported"),
    ("qwen1.5-moe-a2.7b", dict(use_sliding_window=True), "Qwen2MoeForCausalLM with use_sliding_window"),
    ("qwen3-8b", dict(attention_bias=True), "o_proj bias"),
])
def test_unsupported_qwen_configs_are_refused_clearly(name, kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(_hf_dict(name, **kw))


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2, 300), st.floats(allow_nan=True), st.text(max_size=5),
                 st.lists(st.integers(0, 3), max_size=2))


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(["qwen3-30b-a3b", "qwen1.5-moe-a2.7b"]), experts=_ANY, top_k=_ANY, width=_ANY,
       shared=_ANY, norm=_ANY, step=_ANY, dense=_ANY)
def test_fuzz_qwen_moe_config_fields_parse_or_raise_value_error(name, experts, top_k, width, shared, norm, step,
                                                                dense):
    d = _hf_dict(name, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
                 shared_expert_intermediate_size=shared, norm_topk_prob=norm, decoder_sparse_step=step,
                 mlp_only_layers=dense)
    try:
        cfg = ModelConfig.from_hf_dict(d)
    except ValueError:
        return
    assert 1 <= cfg.num_experts_per_tok <= cfg.num_local_experts and cfg.moe_intermediate_size >= 1
    assert isinstance(cfg.norm_topk_prob, bool) and step == 1 and not dense
    assert (cfg.shared_expert_intermediate_size >= 1) == (name == "qwen1.5-moe-a2.7b")
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


# ---- presets: active parameters, memory, meta build ---------------------------------------------
def test_active_parameters_of_the_moe_presets():
    """Routed top-k experts + router + shared expert and its gate + attention (q/k norms included) +
    embeddings, as Mixtral's count (Qwen3-30B-A3B: the '3B active' of its name)."""
    q3 = PRESETS["qwen3-30b-a3b"]
    h, v, layers = 2048, 151936, 48
    attn = h * (32 * 128 + 2 * 4 * 128) + 32 * 128 * h + 2 * 128
    per_layer = attn + 8 * 3 * h * 768 + 128 * h + 2 * h
    assert q3.num_active_parameters() == layers * per_layer + 2 * v * h + h == 3_353_032_704
    q2 = PRESETS["qwen1.5-moe-a2.7b"]
    attn = 4 * h * h + 3 * h
    per_layer = attn + 4 * 3 * h * 1408 + 60 * h + 3 * h * 5632 + h + 2 * h
    assert q2.num_active_parameters() == 24 * per_layer + 2 * v * h + h == 2_689_173_504
    dense = PRESETS["qwen3-8b"]
    assert dense.num_active_parameters() == dense.num_parameters()


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b"])
def test_meta_build_and_memory_estimate_count_every_weight(name):
    cfg = PRESETS[name]
    model = model_class(cfg.architecture)(cfg, torch.bfloat16, torch.device("meta"))
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_parameters()
    need = estimate_need(EngineConfig(model=name, num_kv_blocks=4), cfg, CPU, torch.bfloat16)
    assert need.weights == 2 * n
