"""Tensor-parallel sharding without processes: who holds which heads, reading only a rank's slices of
a checkpoint, the shard models' weights against the full model, and plans folded onto TP layers."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow.config import EngineConfig
from nanoflow.distributed.context import TPContext
from nanoflow.distributed.sharding import (ShardLayout, WeightSharder, iter_sharded_safetensors, shard_config,
                                           split_rule)
from nanoflow.models.loader import iter_safetensors, load_model, resolve_model_source
from nanoflow.models.presets import PRESETS
from nanoflow.pipeline.executor import PlanExecutor, synthetic_batch
from nanoflow.pipeline.ops import COLLECTIVE_OPS, Resource
from nanoflow.pipeline.plan import load_plan
from nanoflow.pipeline.plan_fold import fold_plan
from tests.tiny_checkpoints import make_checkpoint


def _ctx(rank: int, world: int) -> TPContext:
    """A rank's context without process groups: enough to build and load its shard."""
    return TPContext(rank, world, rank, torch.device("cpu"), group=None, control=None)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8, 16]), st.integers(1, 4))
def test_every_q_head_keeps_its_kv_head(world, kv, group):
    """On every rank, local q head i reads local KV head i // (local group size): the same KV head as
    q head (rank offset + i) reads in the whole model (GQA groups never straddle ranks)."""
    hq = kv * group
    cfg = dataclasses.replace(PRESETS["default"], num_attention_heads=hq, num_key_value_heads=kv, head_dim=8)
    if hq % world or (kv % world and world % kv):
        with pytest.raises(ValueError, match="cannot be split"):
            shard_config(cfg, world)
        return
    local = shard_config(cfg, world)
    for rank in range(world):
        lay = ShardLayout(cfg, rank, world)
        q0, q1 = lay.q_heads
        k0, k1 = lay.kv_heads
        assert q1 - q0 == local.num_attention_heads and k1 - k0 == local.num_key_value_heads
        per_kv = local.num_attention_heads // local.num_key_value_heads
        for i in range(q1 - q0):
            assert k0 + i // per_kv == (q0 + i) // group


def test_shard_config_of_presets_and_errors():
    big = shard_config(PRESETS["llama-3-70b"], 4)
    assert (big.num_attention_heads, big.num_key_value_heads, big.intermediate_size) == (16, 2, 7168)
    assert big.hidden_size == 8192 and big.vocab_size == 128256  # unchanged: vocab split by the model
    assert shard_config(PRESETS["llama-3-70b"], 8).num_key_value_heads == 1
    assert shard_config(PRESETS["qwen2-7b"], 4).num_key_value_heads == 1  # 28 q heads / 4, kv 4 / 4
    with pytest.raises(ValueError, match="28 attention heads"):
        shard_config(PRESETS["qwen2-7b"], 8)
    with pytest.raises(ValueError, match="KV heads"):
        shard_config(dataclasses.replace(PRESETS["default"], num_attention_heads=12, num_key_value_heads=3), 2)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=True)
    with pytest.raises(ValueError, match="tp_collective_max_ctas"):
        EngineConfig(tp_collective_max_ctas=0)
    assert split_rule("model.layers.3.self_attn.o_proj.weight") == ("cols", "q")
    assert split_rule("model.layers.3.block_sparse_moe.gate.weight") is None  # router: replicated
    assert split_rule("model.norm.weight") is None
    assert split_rule("model.layers.3.mlp.gate.weight") is None                # Qwen MoE router
    assert split_rule("model.layers.3.self_attn.q_norm.weight") is None        # Qwen3 per-head norms
    assert split_rule("model.layers.3.mlp.shared_expert_gate.weight") is None
    assert split_rule("model.layers.3.mlp.experts.7.up_proj.weight") == ("rows", "expert_inter")
    assert split_rule("model.layers.3.mlp.experts.7.down_proj.weight") == ("cols", "expert_inter")
    assert split_rule("model.layers.3.mlp.shared_expert.gate_proj.weight") == ("rows", "shared_inter")
    assert split_rule("model.layers.3.mlp.shared_expert.down_proj.weight") == ("cols", "shared_inter")
    assert split_rule("model.layers.3.mlp.gate_proj.weight") == ("rows", "inter")  # dense MLPs unchanged
    moe = shard_config(PRESETS["qwen3-30b-a3b"], 4)
    assert (moe.num_attention_heads, moe.num_key_value_heads, moe.moe_intermediate_size) == (8, 1, 192)
    qwen2 = shard_config(PRESETS["qwen1.5-moe-a2.7b"], 4)
    assert (qwen2.moe_intermediate_size, qwen2.shared_expert_intermediate_size) == (352, 1408)
    with pytest.raises(ValueError, match="expert width.*30"):
        shard_config(dataclasses.replace(PRESETS["qwen3-30b-a3b"], moe_intermediate_size=30), 4)
    with pytest.raises(ValueError, match="shared expert width 30"):
        shard_config(dataclasses.replace(PRESETS["qwen1.5-moe-a2.7b"], shared_expert_intermediate_size=30), 4)


class _SpyFile:
    """safe_open stand-in that records every slice read and forbids whole-tensor reads."""

    def __init__(self, path, reads):
        from safetensors import safe_open
        self._cm = safe_open(str(path), framework="pt", device="cpu")
        self.reads = reads

    def __enter__(self):
        self.f = self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        raise AssertionError(f"whole tensor {name} read")

    def get_slice(self, name):
        inner, reads = self.f.get_slice(name), self.reads

        class Slice:
            def get_shape(self):
                return inner.get_shape()

            def __getitem__(self, index):
                out = inner[index]
                reads.setdefault(name, []).append(out.numel())
                return out
        return Slice()


@pytest.mark.parametrize("name", ["mixtral", "mistral", "llama-mha-tied", "qwen3-moe", "qwen2-moe"])
def test_sharded_loading_reads_only_its_slices(name, tmp_path):
    """Each rank reads its slice of every split tensor (no more elements than the slice), all of the
    replicated ones; the ranks' slices put together are the checkpoint; the shard model loads them."""
    ckpt = make_checkpoint(name, tmp_path)
    full = dict(iter_safetensors(ckpt))
    source = resolve_model_source(EngineConfig(model=str(ckpt)))
    cfg = source.model_config
    world = 2
    per_rank = []
    for rank in range(world):
        reads: dict[str, list[int]] = {}
        sharder = WeightSharder(ShardLayout(cfg, rank, world))
        shards = dict(iter_sharded_safetensors(ckpt, sharder, open_file=lambda p, reads=reads: _SpyFile(p, reads)))
        for n, t in shards.items():
            rule = split_rule(n)
            expect = full[n].numel() if rule is None else t.numel()
            if rule is not None and rule[0] == "vocab":
                expect = min(t.numel(), full[n].numel() - rank * t.numel())  # the padding is not read
            assert sum(reads[n]) == expect, n
        per_rank.append(shards)
    for n, t in full.items():
        rule = split_rule(n)
        parts = [r[n] for r in per_rank]
        if rule is None:
            assert all(torch.equal(p, t) for p in parts), n
        elif rule[1] == "kv" and cfg.num_key_value_heads < world:
            assert all(torch.equal(p, t) for p in parts), n  # one KV head, replicated
        elif rule[0] == "cols":
            assert torch.equal(torch.cat(parts, dim=1), t), n
        else:  # rows, or vocabulary rows with the last rank's padding
            assert torch.equal(torch.cat(parts)[:t.shape[0]], t), n
    # The shard models load them (shape checks) and hold what the layout says.
    config = EngineConfig(model=str(ckpt), dtype="float32", device="cpu")
    d, q, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for rank in range(world):
        model, _ = load_model(config, torch.device("cpu"), torch.float32, source, tp=_ctx(rank, world))
        layer = model.layers[1]
        qw = full["model.layers.1.self_attn.q_proj.weight"]
        assert torch.equal(layer.qkv_weight[:q // world * d], qw[rank * q // world * d:(rank + 1) * q // world * d])
        assert torch.equal(layer.o_weight, full["model.layers.1.self_attn.o_proj.weight"][:, rank * q // world * d:
                                                                                      (rank + 1) * q // world * d])
        assert layer.num_kv == max(1, kv // world)
        assert model.embed_tokens.shape[0] == -(-cfg.vocab_size // world)
        names = [op.name for op in layer.ops]
        assert names[names.index("o_gemm") + 1] == "o_allreduce" and names[-1] == "mlp_allreduce"
        if name == "mixtral":
            i = cfg.intermediate_size // world
            w1 = full["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
            assert torch.equal(layer.mlp.experts_gate_up[3, :i], w1[rank * i:(rank + 1) * i])
            assert torch.equal(layer.mlp.router_weight, full["model.layers.1.block_sparse_moe.gate.weight"])
        if name in ("qwen3-moe", "qwen2-moe"):
            i = cfg.moe_intermediate_size // world
            pre = "model.layers.1.mlp."
            up, down = full[pre + "experts.3.up_proj.weight"], full[pre + "experts.3.down_proj.weight"]
            assert torch.equal(layer.mlp.experts_gate_up[3, i:], up[rank * i:(rank + 1) * i])
            assert torch.equal(layer.mlp.experts_down[3], down[:, rank * i:(rank + 1) * i])
            assert torch.equal(layer.mlp.router_weight, full[pre + "gate.weight"])
        if name == "qwen3-moe":  # per-head norms: every rank holds all of them
            assert torch.equal(layer.q_norm, full["model.layers.1.self_attn.q_norm.weight"])
            assert torch.equal(layer.k_norm, full["model.layers.1.self_attn.k_norm.weight"])
        if name == "qwen2-moe":  # the shared expert is split like a dense MLP; its gate is replicated
            s = cfg.shared_expert_intermediate_size // world
            pre = "model.layers.1.mlp.shared_expert"
            assert torch.equal(layer.mlp.shared_gate_up[:s], full[pre + ".gate_proj.weight"][rank * s:(rank + 1) * s])
            assert torch.equal(layer.mlp.shared_down, full[pre + ".down_proj.weight"][:, rank * s:(rank + 1) * s])
            assert torch.equal(layer.mlp.shared_gate, full[pre + "_gate.weight"])


def test_stacked_expert_tensors_split_over_the_inner_dimension():
    """transformers >= 5's stacked layout: gate_up [E, 2I, H] keeps gate and up halves per rank."""
    cfg = dataclasses.replace(PRESETS["default"], intermediate_size=8)
    e, i, h = 3, 8, 5
    gate_up = torch.arange(e * 2 * i * h, dtype=torch.float32).view(e, 2 * i, h)
    down = torch.arange(e * h * i, dtype=torch.float32).view(e, h, i)
    s1 = WeightSharder(ShardLayout(cfg, 1, 2))
    got = s1.read("model.layers.0.mlp.experts.gate_up_proj", gate_up)
    assert torch.equal(got, torch.cat([gate_up[:, 4:8], gate_up[:, 12:16]], dim=1))
    assert torch.equal(s1.read("model.layers.0.mlp.experts.down_proj", down), down[:, :, 4:8])


def _tp_layer_ops(arch: str = "default"):
    cfg = PRESETS[arch]
    from nanoflow.models.registry import model_class
    model = model_class(cfg.architecture)(shard_config(cfg, 2), torch.float32, torch.device("meta"), tp=_ctx(0, 2))
    return model.layers[0].ops


def test_plans_fold_onto_tensor_parallel_layers():
    """Dense plans get the all-reduces right after their GEMMs (same cuts, same stream); the TP plan
    cuts them on a network stream; on one rank its collective entries are dropped. Every fold is
    checked by the executor against the layer's data flow."""
    tp_ops = _tp_layer_ops()
    assert [op.name for op in tp_ops if op.resource == Resource.NETWORK] == list(COLLECTIVE_OPS)
    dense = fold_plan(load_plan("overlap-2"), tp_ops)
    assert dense.ops["o_allreduce"] == dense.ops["o_gemm"] and dense.ops["mlp_allreduce"] == dense.ops["down_gemm"]
    order = [f"{e.op}.{e.nano}" + ("@-1" if e.layer_offset else "") for e in dense.order]
    assert order[order.index("o_gemm.1@-1") + 1] == "o_allreduce.1@-1"
    assert order[order.index("down_gemm.0") + 1] == "mlp_allreduce.0"
    tp_plan = load_plan("tp-nano-4")
    ex = PlanExecutor(tp_plan, tp_ops, torch.device("cpu"))
    nodes = ex.build([tp_ops] * 3, synthetic_batch(decode=8, prefill=(5, 9)))
    cut = sorted((n.lo, n.hi) for n in nodes if n.op.name == "o_allreduce" and n.layer == 1)
    assert cut == [(0, 4), (4, 22)]  # two nano-batches, on the network stream
    assert {tp_plan.streams[n.stream].name for n in nodes if n.op.resource == Resource.NETWORK} == {"network"}
    one_rank = PRESETS["default"]
    from nanoflow.models.llama import LlamaForCausalLM
    plain_ops = LlamaForCausalLM(one_rank, torch.float32, torch.device("meta")).layers[0].ops
    folded = fold_plan(tp_plan, plain_ops)
    assert not set(COLLECTIVE_OPS) & (set(folded.ops) | {e.op for e in folded.order})
    PlanExecutor(tp_plan, plain_ops, torch.device("cpu"))  # runs on one rank without its collectives
    moe_ops = _tp_layer_ops("mixtral-8x7b")
    folded = fold_plan(load_plan("nano-4"), moe_ops)
    order = [(e.op, e.nano) for e in folded.order]
    assert order[order.index(("moe", 0)) + 1] == ("mlp_allreduce", 0)
    for name in ("overlap-2", "nano-4", "tp-nano-4", "overlap-split"):
        PlanExecutor(load_plan(name), moe_ops, torch.device("cpu"))


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.integers(-3, 9), st.booleans(), st.floats(allow_nan=True), st.none(), st.text(max_size=3)),
       st.one_of(st.none(), st.integers(-2, 64), st.booleans(), st.floats(0, 9)),
       st.one_of(st.floats(-5, 1e4), st.just(float("nan")), st.integers(-5, 5), st.text(max_size=2), st.none()))
def test_tensor_parallel_config_fields_fuzz(size, max_ctas, timeout):
    """Any value either makes a valid config or a ValueError naming the field; never another error."""
    try:
        cfg = EngineConfig(tensor_parallel_size=size, tp_collective_max_ctas=max_ctas, tp_timeout_s=timeout)
    except ValueError as exc:
        assert any(f in str(exc) for f in ("tensor_parallel_size", "tp_collective_max_ctas", "tp_timeout_s"))
        return
    assert isinstance(cfg.tensor_parallel_size, int) and cfg.tensor_parallel_size >= 1
    assert cfg.tp_timeout_s > 0


def test_bench_optimal_counts_every_gpu():
    """% of optimal under TP: N x the one-GPU GEMM peak; the transformers baseline is refused."""
    from nanoflow.bench.gemm_peak import GemmPeak
    from nanoflow.bench.throughput_options import ThroughputOptions, TimedRun
    gemm = GemmPeak(tflops=500.0, n=8192, iters=10, dtype="bfloat16", device="cuda", device_name="x",
                    illustrative=False)
    run = TimedRun(plan="sequential", requests=1, input_tokens=1000, output_tokens=1000,
                   expected_output_tokens=1000, wall_s=1.0, steps=None, gemm=gemm, engine_stats=None)
    one, four = run.metrics(70_000_000_000), run.metrics(70_000_000_000, num_gpus=4)
    assert four["optimal_tokens_per_s"] == pytest.approx(4 * one["optimal_tokens_per_s"])
    assert four["pct_of_optimal"] == pytest.approx(one["pct_of_optimal"] / 4) and four["num_gpus"] == 4
    with pytest.raises(ValueError, match="one GPU"):
        ThroughputOptions(baseline="hf", engine_args={"tensor_parallel_size": 2})
