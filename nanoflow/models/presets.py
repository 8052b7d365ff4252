"""Named model shapes for load_format="dummy" (random weights), plus the built-in tiny `default` model.

The shapes are those of the published Hugging Face config.json files, so a dummy run of `llama-3-8b`
does the same work per token as the real checkpoint.
"""
from __future__ import annotations

from nanoflow.models.config import ModelConfig

# The built-in tokenizer (nanoflow/assets, built by scripts/build_tokenizer.py): its size and the ids of
# its special tokens. tests/test_tokenizer_asset.py checks these against the shipped tokenizer.json.
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_BOS_ID = 0      # <|begin_of_text|>
DEFAULT_EOS_ID = 1      # <|end_of_text|>
DEFAULT_IM_END_ID = 3   # <|im_end|>: ends an assistant turn of the chat template

_LLAMA3_EOS = (128001, 128009)  # <|end_of_text|>, <|eot_id|>
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def _llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, **extra) -> ModelConfig:
    return ModelConfig(architecture=extra.pop("architecture", "LlamaForCausalLM"), vocab_size=vocab,
                       hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=extra.pop("head_dim", hidden // heads),
                       torch_dtype=extra.pop("torch_dtype", "bfloat16"), **extra)


PRESETS: dict[str, ModelConfig] = {
    "default": _llama(DEFAULT_VOCAB_SIZE, 256, 688, 4, 8, 4, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=2048, torch_dtype="float32", bos_token_id=DEFAULT_BOS_ID,
                      eos_token_ids=(DEFAULT_EOS_ID, DEFAULT_IM_END_ID)),
    "llama-2-7b": _llama(32000, 4096, 11008, 32, 32, 32, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-70b": _llama(32000, 8192, 28672, 80, 64, 8, rms_norm_eps=1e-5, rope_theta=10000.0,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,)),
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=_LLAMA3_EOS),
    "llama-3-70b": _llama(128256, 8192, 28672, 80, 64, 8, rms_norm_eps=1e-5, rope_theta=500000.0,
                          max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=_LLAMA3_EOS),
    "llama-3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8, rms_norm_eps=1e-5, rope_theta=500000.0,
                           rope_scaling=dict(_LLAMA31_ROPE), max_position_embeddings=131072, bos_token_id=128000,
                           eos_token_ids=(128001, 128008, 128009)),
    "mistral-7b": _llama(32000, 4096, 14336, 32, 32, 8, architecture="MistralForCausalLM", rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,)),
    "qwen2-7b": _llama(152064, 3584, 18944, 28, 28, 4, architecture="Qwen2ForCausalLM", rms_norm_eps=1e-6,
                       rope_theta=1000000.0, max_position_embeddings=131072, attention_bias=True,
                       bos_token_id=151643, eos_token_ids=(151643, 151645)),
    # Mixtral-8x7B-v0.1: 46.7e9 parameters (93 GB in bf16), 12.9e9 active per token (top-2 of 8).
    "mixtral-8x7b": _llama(32000, 4096, 14336, 32, 32, 8, architecture="MixtralForCausalLM", rms_norm_eps=1e-5,
                           rope_theta=1000000.0, max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,),
                           num_local_experts=8, num_experts_per_tok=2),
    # Qwen3-8B: 8.19e9 parameters; head_dim 128 with per-head q/k norms.
    "qwen3-8b": _llama(151936, 4096, 12288, 36, 32, 8, architecture="Qwen3ForCausalLM", head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                       bos_token_id=151643, eos_token_ids=(151645,)),
    # Qwen3-30B-A3B: 30.5e9 parameters, 3.3e9 active per token (top-8 of 128 experts of width 768).
    "qwen3-30b-a3b": _llama(151936, 2048, 6144, 48, 32, 4, architecture="Qwen3MoeForCausalLM", head_dim=128,
                            rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                            bos_token_id=151643, eos_token_ids=(151645,), num_local_experts=128,
                            num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    # Qwen1.5-MoE-A2.7B: 14.3e9 parameters; top-4 of 60 experts (weights not renormalised) plus a shared
    # expert of width 5632 behind a sigmoid gate; 2.7e9 active per token (embeddings included).
    "qwen1.5-moe-a2.7b": _llama(151936, 2048, 5632, 24, 16, 16, architecture="Qwen2MoeForCausalLM",
                                rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=8192,
                                attention_bias=True, bos_token_id=151643, eos_token_ids=(151643,),
                                num_local_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                norm_topk_prob=False, shared_expert_intermediate_size=5632),
}
