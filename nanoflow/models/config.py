"""ModelConfig: the shape of a Llama-family model, parsed from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM"}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
QWEN_MOE_ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
"""Architectures with a per-head RMSNorm of q and k (weights of head_dim) before RoPE."""
_QWEN_ARCHITECTURES = ("Qwen3ForCausalLM",) + QWEN_MOE_ARCHITECTURES
# Mixture-of-experts families whose blocks differ from the supported ones (other routing, latent
# attention...): named so the error says what is missing rather than only "unsupported".
UNSUPPORTED_MOE = {
    "DeepseekV2ForCausalLM": "multi-head latent attention, shared experts, grouped routing",
    "DeepseekV3ForCausalLM": "multi-head latent attention, shared experts, grouped sigmoid routing",
    "OlmoeForCausalLM": "q/k norms, unnormalised top-k weights",
    "PhimoeForCausalLM": "sparsemixer routing",
    "GraniteMoeForCausalLM": "scaled embeddings and residuals",
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    """The Hugging Face class name (one of SUPPORTED_ARCHITECTURES)."""
    vocab_size: int
    """Rows of the embedding and the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the MLP (per gate / up projection)."""
    num_hidden_layers: int
    """Decoder layers."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads (GQA when fewer than query heads)."""
    head_dim: int
    """Width of one head."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict | None = None
    """RoPE scaling parameters with a 'rope_type' key ('default', 'linear', 'llama3'), or None."""
    max_position_embeddings: int = 4096
    """Longest context the model was trained for."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    attention_bias: bool = False
    """q/k/v projections have a bias (Qwen2)."""
    torch_dtype: str | None = None
    """The checkpoint's dtype, if stated."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token."""
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Tokens that end generation."""
    num_local_experts: int = 0
    """Routed experts per MoE layer (Mixtral's num_local_experts, Qwen MoE's num_experts); 0 = a dense MLP."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k); 0 for dense models."""
    moe_intermediate_size: int = 0
    """Width of one routed expert (Qwen MoE); 0 = intermediate_size (Mixtral)."""
    norm_topk_prob: bool = True
    """The top-k routing weights are renormalised to sum to 1 (Mixtral always; Qwen MoE as its config says)."""
    shared_expert_intermediate_size: int = 0
    """Width of the shared expert every token also runs, gated by sigmoid(shared_expert_gate(x))
    (Qwen2-MoE); 0 = none."""

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            arch = MODEL_TYPES.get(d.get("model_type"))
        moe = next((a for a in archs if a in UNSUPPORTED_MOE), None)
        if arch is None and moe is not None:
            raise ValueError(f"{moe} is a mixture-of-experts variant nanoflow does not support "
                             f"({UNSUPPORTED_MOE[moe]}); the supported MoE architectures are "
                             f"{', '.join(MOE_ARCHITECTURES)}")
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or d.get('model_type')!r}; "
                f"nanoflow supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = d["num_attention_heads"]
        # Qwen3's config class defaults head_dim to 128 (not hidden / heads) when config.json omits it.
        head_dim = d.get("head_dim") or (128 if arch == "Qwen3ForCausalLM" else d["hidden_size"] // heads)
        if arch in _QWEN_ARCHITECTURES:
            _check_qwen_attention(d, arch)
        rope = _rope_parameters(d)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope.pop("rope_theta"),
            rope_scaling=rope or None,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=(d.get("qkv_bias", True) if arch == "Qwen2MoeForCausalLM"
                            else d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **(_moe_fields(d, arch) if arch in MOE_ARCHITECTURES else {}),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> "ModelConfig":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        return cls.from_hf_dict(json.loads(config_path.read_text()))

    def to_hf_dict(self) -> dict:
        """A config.json transformers can load (used by tests and by `save_pretrained`-style export)."""
        d = asdict(self)
        d["architectures"] = [d.pop("architecture")]
        d["model_type"] = {arch: t for t, arch in MODEL_TYPES.items()}[self.architecture]
        moe = {k: d.pop(k) for k in ("num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                                     "norm_topk_prob", "shared_expert_intermediate_size")}
        if self.architecture == "MixtralForCausalLM":
            d.update(num_local_experts=moe["num_local_experts"], num_experts_per_tok=moe["num_experts_per_tok"])
        elif self.architecture in QWEN_MOE_ARCHITECTURES:  # every layer a MoE layer
            d.update(num_experts=moe["num_local_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
                     moe_intermediate_size=moe["moe_intermediate_size"], norm_topk_prob=moe["norm_topk_prob"],
                     decoder_sparse_step=1, mlp_only_layers=[])
        if self.architecture == "Qwen2MoeForCausalLM":
            d.update(shared_expert_intermediate_size=moe["shared_expert_intermediate_size"],
                     qkv_bias=d.pop("attention_bias"))
        eos = list(d.pop("eos_token_ids"))
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        return d

    @property
    def qk_norm(self) -> bool:
        """Attention normalises each q and k head (RMSNorm over head_dim) before RoPE (Qwen3)."""
        return self.architecture in QK_NORM_ARCHITECTURES

    @property
    def expert_intermediate_size(self) -> int:
        """Width of one routed expert (per gate / up projection)."""
        return self.moe_intermediate_size or self.intermediate_size

    def num_parameters(self) -> int:
        """All parameters, embeddings and LM head included (every expert of a MoE model)."""
        return self._count(self.num_local_experts)

    def num_active_parameters(self) -> int:
        """Parameters each token computes with (NanoFlow's P for % of optimal): a MoE layer counts its
        router, the num_experts_per_tok experts a token is routed to and the shared expert with its
        gate (Mixtral 8x7B: 12.9e9 of 46.7e9). Equal to num_parameters() for a dense model."""
        return self._count(self.num_experts_per_tok)

    def _count(self, experts: int) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        if self.num_local_experts:
            shared = self.shared_expert_intermediate_size
            mlp = (3 * h * self.expert_intermediate_size * experts + h * self.num_local_experts
                   + (3 * h * shared + h if shared else 0))
        else:
            mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return self.num_hidden_layers * per_layer + v * h + head + h


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _moe_fields(d: dict, arch: str) -> dict:
    """The MoE block's fields, checked: SiLU experts, top-k routing; Mixtral renormalises the top-k
    weights, the Qwen families as norm_topk_prob says; every layer a MoE layer."""
    family = {"MixtralForCausalLM": "Mixtral", "Qwen2MoeForCausalLM": "Qwen2-MoE",
              "Qwen3MoeForCausalLM": "Qwen3-MoE"}[arch]
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported {family} expert activation {act!r}: nanoflow's experts use silu")
    if arch == "MixtralForCausalLM":
        experts, top_k, key = d.get("num_local_experts"), d.get("num_experts_per_tok"), "num_local_experts"
    else:  # transformers' Qwen3-MoE writes num_local_experts (an alias of num_experts)
        key = "num_experts" if "num_experts" in d else "num_local_experts"
        experts, top_k = d.get(key), d.get("num_experts_per_tok")
    if not all(_is_int(v) for v in (experts, top_k)) or not 1 <= top_k <= experts:
        raise ValueError(f"a {family} config needs integers 1 <= num_experts_per_tok <= {key}, "
                         f"got num_experts_per_tok={top_k!r}, {key}={experts!r}")
    out = {"num_local_experts": experts, "num_experts_per_tok": top_k}
    if arch == "MixtralForCausalLM":
        return out
    step, dense_layers = d.get("decoder_sparse_step", 1), d.get("mlp_only_layers") or []
    if not _is_int(step) or step != 1 or dense_layers:
        raise ValueError(f"{family} configs with dense MLP layers among the MoE layers are not supported "
                         f"(decoder_sparse_step={step!r}, mlp_only_layers={dense_layers!r}; nanoflow needs "
                         "decoder_sparse_step 1 and no mlp_only_layers: every layer a MoE layer)")
    norm = d.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ValueError(f"norm_topk_prob must be true or false, got {norm!r}")
    out.update(moe_intermediate_size=_positive_int(d, "moe_intermediate_size", family), norm_topk_prob=norm)
    if arch == "Qwen2MoeForCausalLM":
        out["shared_expert_intermediate_size"] = _positive_int(d, "shared_expert_intermediate_size", family)
    return out


def _positive_int(d: dict, key: str, family: str) -> int:
    v = d.get(key)
    if not _is_int(v) or v < 1:
        raise ValueError(f"a {family} config needs a positive integer {key}, got {v!r}")
    return v


def _check_qwen_attention(d: dict, arch: str) -> None:
    """What nanoflow's attention does not implement for the Qwen families: sliding windows (it attends
    to the whole context), Qwen3's o_proj bias (attention_bias biases o_proj there too)."""
    if d.get("use_sliding_window"):
        raise ValueError(f"{arch} with use_sliding_window is not supported: nanoflow attends to the whole "
                         "context (set use_sliding_window false)")
    if arch in QK_NORM_ARCHITECTURES and d.get("attention_bias"):
        raise ValueError(f"{arch} with attention_bias is not supported (its o_proj bias is not implemented)")


def _rope_parameters(d: dict) -> dict:
    """Normalises the old (rope_theta + rope_scaling) and new (rope_parameters) config styles."""
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3)")
    out = {"rope_theta": float(theta)}
    if rope_type != "default":
        out.update(params)
        out["rope_type"] = rope_type
    return out
