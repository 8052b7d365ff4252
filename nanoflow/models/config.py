"""ModelConfig: the shape of a Llama-family model, parsed from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "mixtral": "MixtralForCausalLM"}
# Mixture-of-experts families whose blocks differ from Mixtral's (shared experts, other routing, per-head
# q/k norms): named so the error says what is missing rather than only "unsupported".
UNSUPPORTED_MOE = {
    "Qwen2MoeForCausalLM": "shared experts with a sigmoid gate, unnormalised top-k weights",
    "Qwen3MoeForCausalLM": "per-head q/k RMSNorm in attention",
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
    """Experts per MoE layer (Mixtral); 0 = a dense MLP."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k, weights renormalised); 0 for dense models."""

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            arch = MODEL_TYPES.get(d.get("model_type"))
        moe = next((a for a in archs if a in UNSUPPORTED_MOE), None)
        if arch is None and moe is not None:
            raise ValueError(f"{moe} is a mixture-of-experts variant nanoflow does not support "
                             f"({UNSUPPORTED_MOE[moe]}); the supported MoE architecture is MixtralForCausalLM")
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or d.get('model_type')!r}; "
                f"nanoflow supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
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
            attention_bias=d.get("attention_bias", arch == "Qwen2ForCausalLM"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **(_moe_fields(d) if arch == "MixtralForCausalLM" else {}),
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
        if not self.num_local_experts:
            del d["num_local_experts"], d["num_experts_per_tok"]
        eos = list(d.pop("eos_token_ids"))
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        return d

    def num_parameters(self) -> int:
        """All parameters, embeddings and LM head included (every expert of a MoE model)."""
        return self._count(self.num_local_experts)

    def num_active_parameters(self) -> int:
        """Parameters each token computes with (NanoFlow's P for % of optimal): a MoE layer counts its
        router and the num_experts_per_tok experts a token is routed to (Mixtral 8x7B: 12.9e9 of
        46.7e9). Equal to num_parameters() for a dense model."""
        return self._count(self.num_experts_per_tok)

    def _count(self, experts: int) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        mlp = 3 * h * i * experts + h * self.num_local_experts if self.num_local_experts else 3 * h * i
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return self.num_hidden_layers * per_layer + v * h + head + h


def _moe_fields(d: dict) -> dict:
    """Mixtral's expert count and top-k, checked: the block implements SiLU experts with top-k
    weights renormalised, nothing else."""
    experts, top_k = d.get("num_local_experts"), d.get("num_experts_per_tok")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (experts, top_k)) or not 1 <= top_k <= experts:
        raise ValueError(f"a Mixtral config needs integers 1 <= num_experts_per_tok <= num_local_experts, "
                         f"got num_experts_per_tok={top_k!r}, num_local_experts={experts!r}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported Mixtral expert activation {act!r}: nanoflow's experts use silu")
    return {"num_local_experts": experts, "num_experts_per_tok": top_k}


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
