"""Preset shapes: published parameter counts, agreement with transformers, config.json round trip."""
from __future__ import annotations

import pytest
import torch
import transformers

from nanoflow.models.config import ModelConfig
from nanoflow.models.presets import PRESETS

# Published / Hugging Face-reported parameter counts (embeddings and LM head included).
KNOWN_COUNTS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2-7b": 7_615_616_512,
    "mixtral-8x7b": 46_702_792_704,   # every expert (12_879_925_248 active per token: test_mixtral.py)
    "qwen3-8b": 8_190_735_360,
    "qwen3-30b-a3b": 30_532_122_624,  # every expert (active per token: test_qwen.py)
    "qwen1.5-moe-a2.7b": 14_315_784_192,
}


def test_every_real_preset_has_a_known_count():
    assert set(PRESETS) - {"default"} == set(KNOWN_COUNTS)


@pytest.mark.parametrize("name", sorted(KNOWN_COUNTS))
def test_num_parameters_matches_published_count(name):
    assert PRESETS[name].num_parameters() == KNOWN_COUNTS[name]


def _hf_meta_model(cfg: ModelConfig) -> torch.nn.Module:
    d = cfg.to_hf_dict()
    hf_config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):  # shapes only: no memory, no init time
        return transformers.AutoModelForCausalLM.from_config(hf_config)


@pytest.mark.parametrize("name", ["default", "llama-3-8b", "llama-2-70b", "qwen2-7b", "mistral-7b", "mixtral-8x7b",
                                  "qwen3-8b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b"])
def test_num_parameters_matches_transformers_model(name):
    model = _hf_meta_model(PRESETS[name])
    assert type(model).__name__ == PRESETS[name].architecture
    assert sum(p.numel() for p in model.parameters()) == PRESETS[name].num_parameters()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_config_json(name):
    assert ModelConfig.from_hf_dict(PRESETS[name].to_hf_dict()) == PRESETS[name]


def test_real_shapes():
    l3, l31, qwen, mistral = PRESETS["llama-3-8b"], PRESETS["llama-3.1-8b"], PRESETS["qwen2-7b"], PRESETS["mistral-7b"]
    assert (l3.vocab_size, l3.hidden_size, l3.intermediate_size, l3.num_hidden_layers) == (128256, 4096, 14336, 32)
    assert (l3.num_attention_heads, l3.num_key_value_heads, l3.head_dim) == (32, 8, 128)
    assert l3.rope_theta == 500000.0 and l3.max_position_embeddings == 8192
    assert set(l3.eos_token_ids) == {128001, 128009}
    assert l31.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert l31.max_position_embeddings == 131072
    assert qwen.attention_bias and not qwen.tie_word_embeddings and qwen.rope_theta == 1e6
    assert (qwen.vocab_size, qwen.hidden_size, qwen.num_key_value_heads) == (152064, 3584, 4)
    assert mistral.architecture == "MistralForCausalLM" and mistral.max_position_embeddings == 32768


def test_default_model_is_tiny():
    cfg = PRESETS["default"]
    assert cfg.num_parameters() < 10_000_000
    assert cfg.num_attention_heads * cfg.head_dim == cfg.hidden_size
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
