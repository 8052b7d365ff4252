"""Qwen2-MoE and Qwen3-MoE: the Llama layer (Qwen3-MoE with its per-head q/k norm, Qwen2-MoE with
q/k/v biases) with a mixture-of-experts block as its MLP.

The block is Mixtral's (nanoflow.models.mixtral.MoEBlock: one `moe` compute op, routed experts as one
grouped GEMM) with the Qwen routing and, for Qwen2-MoE, a shared expert:
- routing: softmax in fp32, top-k, renormalised only when the config's norm_topk_prob says so
  (Qwen3-MoE checkpoints: true; Qwen2-MoE: false), then rounded to the activations' dtype as
  transformers' Qwen routers do;
- experts of moe_intermediate_size (not intermediate_size);
- Qwen2-MoE: a dense SwiGLU MLP of shared_expert_intermediate_size that every token runs, scaled by
  sigmoid(x @ shared_expert_gate.T) and added to the routed experts' output. It runs inside the same
  op (GEMMs on the op's SM budget), so the op's reads / writes stay normed -> hidden.
Every layer is a MoE layer (configs with dense layers among them are refused by ModelConfig).

Checkpoint names (what Qwen's repos and save_pretrained write): mlp.gate.weight (router),
mlp.experts.{e}.gate_proj / up_proj / down_proj.weight, and for Qwen2-MoE
mlp.shared_expert.gate_proj / up_proj / down_proj.weight and mlp.shared_expert_gate.weight.
transformers >= 5 holds the experts stacked in memory (mlp.experts.gate_up_proj, mlp.experts.down_proj):
those names load too, and export uses whichever the installed transformers has.
"""
from __future__ import annotations

import torch
from torch import nn

from nanoflow.kernels.moe_reference import route
from nanoflow.models.config import ModelConfig
from nanoflow.models.llama import LlamaForCausalLM, StepState
from nanoflow.models.mixtral import MoEBlock, transformers_stacks_experts

_PROJ = ("gate_proj", "up_proj", "down_proj")


class QwenMoEBlock(MoEBlock):
    """Qwen2MoeSparseMoeBlock / Qwen3MoeSparseMoeBlock (inference: no router jitter, no aux loss)."""

    def __init__(self, cfg: ModelConfig, model: LlamaForCausalLM, dtype, device):
        super().__init__(cfg, model, dtype, device)
        self.renormalize = cfg.norm_topk_prob
        h, s = cfg.hidden_size, cfg.shared_expert_intermediate_size
        self.shared_inter = s
        def p(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
        self.shared_gate_up = p(2 * s, h) if s else None   # gate rows 0:S, up rows S:2S
        self.shared_down = p(h, s) if s else None
        self.shared_gate = p(1, h) if s else None

    def _moe(self, s: StepState, lo: int, hi: int) -> None:
        k = self.model.kernels
        x, out = s.ws.normed[lo:hi], s.ws.hidden[lo:hi]
        weights, ids = route(torch.nn.functional.linear(x, self.router_weight), self.top_k, self.renormalize)
        weights = weights.to(x.dtype).float()  # transformers' Qwen routers round the weights to x's dtype
        k.moe_experts(x, weights, ids, self.experts_gate_up, self.experts_down, out=out, sm_budget=s.sm_budget)
        if self.shared_inter:
            act = k.silu_and_mul(k.linear(x, self.shared_gate_up, None, sm_budget=s.sm_budget))
            shared = k.linear(act, self.shared_down, None, sm_budget=s.sm_budget)
            gate = torch.sigmoid(torch.nn.functional.linear(x, self.shared_gate))
            out.add_(gate * shared)  # both terms in x's dtype, as transformers adds them

    # ---- weight names ------------------------------------------------------------------------------
    def _expert_names(self, e: int) -> list[str]:
        return [f"mlp.experts.{e}.{w}.weight" for w in _PROJ]

    def _shared_names(self) -> list[str]:
        if not self.shared_inter:
            return []
        return [f"mlp.shared_expert.{w}.weight" for w in _PROJ] + ["mlp.shared_expert_gate.weight"]

    def hf_weight_names(self, prefix: str) -> list[str]:
        names = ["mlp.gate.weight"] + [n for e in range(self.num_experts) for n in self._expert_names(e)]
        return [prefix + n for n in names + self._shared_names()]

    def weight_table(self) -> dict[str, tuple[torch.Tensor, tuple | None]]:
        i = self.inter
        table = {"mlp.gate.weight": (self.router_weight, None),
                 "mlp.experts.gate_up_proj": (self.experts_gate_up, None),
                 "mlp.experts.down_proj": (self.experts_down, None)}
        for e in range(self.num_experts):
            gate, up, down = self._expert_names(e)
            table[gate] = (self.experts_gate_up, (e, slice(0, i)))
            table[up] = (self.experts_gate_up, (e, slice(i, 2 * i)))
            table[down] = (self.experts_down, (e,))
        if self.shared_inter:
            s = self.shared_inter
            table.update({"mlp.shared_expert.gate_proj.weight": (self.shared_gate_up, (slice(0, s),)),
                          "mlp.shared_expert.up_proj.weight": (self.shared_gate_up, (slice(s, 2 * s),)),
                          "mlp.shared_expert.down_proj.weight": (self.shared_down, None),
                          "mlp.shared_expert_gate.weight": (self.shared_gate, None)})
        return table

    def weight_aliases(self) -> dict[str, list[str]]:
        experts = range(self.num_experts)
        return {"mlp.experts.gate_up_proj": [n for e in experts for n in self._expert_names(e)[:2]],
                "mlp.experts.down_proj": [self._expert_names(e)[2] for e in experts]}

    def module_weight_names(self) -> list[str]:
        if transformers_stacks_experts():
            return ["mlp.gate.weight", *self.weight_aliases()] + self._shared_names()
        return self.hf_weight_names("")


class QwenMoeForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B) and Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the
    attention is chosen by the config (q/k norm, biases), the MLP is the MoE block."""
    MLP_BLOCK = QwenMoEBlock
