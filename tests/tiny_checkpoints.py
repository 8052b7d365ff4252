"""Tiny random Hugging Face checkpoints written with save_pretrained, for parity tests."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

from nanoflow.models.loader import default_model_dir

# name -> (transformers config class, kwargs)
TINY_CONFIGS = {
    "llama-gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mha-tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                           tie_word_embeddings=True)),
    "llama3-scaled": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    # 6 experts, top-2 (renormalised): with 37-token prompts some experts get few tokens, some none.
    "mixtral": ("MixtralConfig", dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                                      num_experts_per_tok=2, sliding_window=None, rope_theta=10000.0)),
    # head_dim 24 != hidden / heads (16): Qwen3 states it; q/k norms of head_dim.
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    # 6 experts of width 48, top-3 renormalised (Qwen3-30B-A3B's norm_topk_prob), head_dim 24.
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=6,
                                         num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=True)),
    # 5 experts top-2 left unnormalised (Qwen2-MoE's default), a shared expert of width 96, qkv biases.
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_attention_heads=4, num_key_value_heads=2, num_experts=5,
                                         num_experts_per_tok=2, moe_intermediate_size=40,
                                         shared_expert_intermediate_size=96, norm_topk_prob=False)),
}


def make_checkpoint(name: str, root: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """Writes a tiny random model (and the built-in tokenizer) to root/name; returns the directory."""
    cls_name, extra = TINY_CONFIGS[name]
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    vocab_size = len(tok)
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=num_layers,
                  max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    kwargs.update(extra)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init so logits are far from uniform
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            else:  # norms (Qwen3's q/k norms are head_dim wide) near 1, biases small
                p.uniform_(0.5, 1.5) if p.shape[0] == kwargs["hidden_size"] or "norm" in pname else p.normal_(0, 0.1)
    out = root / f"{name}-{num_layers}l"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
