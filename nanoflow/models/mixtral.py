"""Mixtral: the Llama layer (same attention ops, same code) with a mixture-of-experts block as its MLP.

The block is one op, `moe` (compute): router logits (x @ router.T in the model's dtype, as
transformers), top-k routing with renormalised weights (kernels.moe_reference.route), then the experts
as one grouped GEMM (kernels.moe_experts: Triton on the GPU, the torch reference elsewhere). It reads
rows lo:hi of `normed` and writes the same rows of `hidden`, so a plan cuts it into nano-batches like
any GEMM, and plans written for the dense layer run it in place of gate_up_gemm / act / down_gemm
(nanoflow.pipeline.plan_fold).

Weights: router [E, H], experts_gate_up [E, 2I, H] (gate rows 0:I, up rows I:2I), experts_down
[E, H, I]. Checkpoint names (what Mistral's repos and save_pretrained write):
block_sparse_moe.gate.weight, block_sparse_moe.experts.{e}.w1 / w3 / w2.weight (gate / up / down).
transformers >= 5 holds the same tensors stacked in memory (mlp.gate.weight, mlp.experts.gate_up_proj,
mlp.experts.down_proj): those names load too, and export uses whichever the installed transformers has.
"""
from __future__ import annotations

import torch
from torch import nn

from nanoflow.kernels.moe_reference import route
from nanoflow.models.config import ModelConfig
from nanoflow.models.llama import LlamaForCausalLM, StepState
from nanoflow.pipeline.ops import Op, Resource

DENSE_MLP_OPS = ("gate_up_gemm", "act", "down_gemm")
_CKPT = "block_sparse_moe."
_MODULE = "mlp."


def transformers_stacks_experts() -> bool:
    """Whether the installed transformers holds Mixtral's experts as stacked 3-D tensors (>= 5)."""
    try:
        from transformers.models.mixtral import modeling_mixtral
    except ImportError:
        return False
    return not hasattr(modeling_mixtral, "MixtralBlockSparseTop2MLP")


class MoEBlock(nn.Module):
    """Top-k routed SiLU experts (Mixtral's MixtralSparseMoeBlock, without training-time jitter)."""

    def __init__(self, cfg: ModelConfig, model: LlamaForCausalLM, dtype, device):
        super().__init__()
        if cfg.num_local_experts < 1 or not 1 <= cfg.num_experts_per_tok <= cfg.num_local_experts:
            raise ValueError(f"a MoE block needs 1 <= num_experts_per_tok <= num_local_experts, got "
                             f"{cfg.num_experts_per_tok} of {cfg.num_local_experts}")
        object.__setattr__(self, "model", model)  # kernels; outside the module tree (no cycle)
        e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.expert_intermediate_size
        self.num_experts, self.top_k, self.inter = e, cfg.num_experts_per_tok, i
        def p(*shape):  # allocated on `device` directly; filled in place by the loader
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
        self.router_weight = p(e, h)
        self.experts_gate_up = p(e, 2 * i, h)
        self.experts_down = p(e, h, i)

    @staticmethod
    def workspace_buffers(cfg: ModelConfig) -> dict[str, int]:
        return {}  # the expert intermediates depend on the routing: allocated per call

    def _moe(self, s: StepState, lo: int, hi: int) -> None:
        x = s.ws.normed[lo:hi]
        weights, ids = route(torch.nn.functional.linear(x, self.router_weight), self.top_k)
        self.model.kernels.moe_experts(x, weights, ids, self.experts_gate_up, self.experts_down,
                                       out=s.ws.hidden[lo:hi], sm_budget=s.sm_budget)

    def ops(self) -> list[Op]:
        return [Op("moe", Resource.COMPUTE, self._moe, reads=("normed",), writes=("hidden",),
                   replaces=DENSE_MLP_OPS)]

    def hf_weight_names(self, prefix: str) -> list[str]:
        names = [f"{prefix}{_CKPT}gate.weight"]
        for e in range(self.num_experts):
            names += [f"{prefix}{_CKPT}experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")]
        return names

    def weight_table(self) -> dict[str, tuple[torch.Tensor, tuple | None]]:
        i = self.inter
        table = {f"{_CKPT}gate.weight": (self.router_weight, None),
                 f"{_MODULE}gate.weight": (self.router_weight, None),
                 f"{_MODULE}experts.gate_up_proj": (self.experts_gate_up, None),
                 f"{_MODULE}experts.down_proj": (self.experts_down, None)}
        for e in range(self.num_experts):
            pre = f"{_CKPT}experts.{e}."
            table[pre + "w1.weight"] = (self.experts_gate_up, (e, slice(0, i)))
            table[pre + "w3.weight"] = (self.experts_gate_up, (e, slice(i, 2 * i)))
            table[pre + "w2.weight"] = (self.experts_down, (e,))
        return table

    def weight_aliases(self) -> dict[str, list[str]]:
        experts = range(self.num_experts)
        return {f"{_MODULE}gate.weight": [f"{_CKPT}gate.weight"],
                f"{_MODULE}experts.gate_up_proj": [f"{_CKPT}experts.{e}.{w}.weight" for e in experts
                                                   for w in ("w1", "w3")],
                f"{_MODULE}experts.down_proj": [f"{_CKPT}experts.{e}.w2.weight" for e in experts]}

    def module_weight_names(self) -> list[str]:
        if transformers_stacks_experts():
            return list(self.weight_aliases())
        return self.hf_weight_names("")


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral 8x7B / 8x22B: Mistral attention, a MoE block per layer."""
    MLP_BLOCK = MoEBlock
