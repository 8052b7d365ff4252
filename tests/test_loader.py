"""Model sources, safetensors loading (single file and sharded), dummy weights, tokenizers, and errors."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nanoflow.config import EngineConfig
from nanoflow.models.loader import (default_model_dir, init_dummy_weights, iter_safetensors, load_model,
                                    load_tokenizer, resolve_model_source)
from nanoflow.models.presets import PRESETS

CPU = torch.device("cpu")
TINY = dataclasses.replace(PRESETS["default"], vocab_size=64, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
TINY_QWEN = dataclasses.replace(TINY, architecture="Qwen2ForCausalLM", attention_bias=True)


def _write_config(path: Path, cfg=TINY) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return path


def _reference_weights(tmp_path: Path, cfg=TINY, seed: int = 7) -> dict[str, torch.Tensor]:
    """Hugging Face-named weights of a dummy model (independent copies, as a checkpoint holds them)."""
    model, _ = load_model(EngineConfig(model=str(_write_config(tmp_path / "shape", cfg)), load_format="dummy",
                                       seed=seed), CPU, torch.float32)
    return {name: t.clone() for name, t in model.export_hf_state_dict().items()
            if not (cfg.tie_word_embeddings and name == "lm_head.weight")}


def _write_single(path: Path, weights: dict[str, torch.Tensor], cfg=TINY) -> Path:
    save_file(weights, str(_write_config(path, cfg) / "model.safetensors"))
    return path


def _write_sharded(path: Path, weights: dict[str, torch.Tensor], num_shards: int = 3, cfg=TINY) -> Path:
    _write_config(path, cfg)
    names = sorted(weights)
    weight_map = {}
    for i in range(num_shards):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[i::num_shards]
        save_file({n: weights[n] for n in part}, str(path / shard))
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- resolving config.model ----------------------------------------------------------------------------------

def test_default_model_and_presets_resolve_to_random_weights_and_builtin_tokenizer():
    src = resolve_model_source(EngineConfig())
    assert src.model_config == PRESETS["default"] and src.dummy and src.weights_dir is None
    assert src.tokenizer_dir == default_model_dir()
    src = resolve_model_source(EngineConfig(model="llama-3-8b", load_format="dummy"))
    assert src.model_config == PRESETS["llama-3-8b"] and src.dummy and src.tokenizer_dir == default_model_dir()


def test_directory_resolves_to_its_weights_and_tokenizer(tmp_path):
    path = _write_single(tmp_path / "m", _reference_weights(tmp_path))
    src = resolve_model_source(EngineConfig(model=str(path)))
    assert src.model_config == TINY and src.weights_dir == path and src.tokenizer_dir == path and not src.dummy
    dummy = resolve_model_source(EngineConfig(model=str(path), load_format="dummy"))
    assert dummy.dummy and dummy.weights_dir is None and dummy.model_config == TINY
    builtin = resolve_model_source(EngineConfig(model=str(path), tokenizer="default"))
    assert builtin.tokenizer_dir == default_model_dir()


def test_dummy_directory_needs_only_config_json(tmp_path):
    src = resolve_model_source(EngineConfig(model=str(_write_config(tmp_path / "m")), load_format="dummy"))
    assert src.model_config == TINY and src.dummy


def test_unknown_model_lists_presets():
    with pytest.raises(ValueError, match=r"neither a directory nor a preset.*llama-3-8b.*qwen2-7b"):
        resolve_model_source(EngineConfig(model="no-such-model"))
    with pytest.raises(ValueError, match=r"directory or a preset name; presets: default"):
        resolve_model_source(EngineConfig(model=""))


def test_hub_id_says_downloads_are_not_supported():
    with pytest.raises(ValueError, match="downloads are not supported"):
        resolve_model_source(EngineConfig(model="meta-llama/Meta-Llama-3-8B"))


def test_preset_with_load_format_safetensors_is_refused():
    with pytest.raises(ValueError, match="preset with random weights"):
        resolve_model_source(EngineConfig(model="llama-3-8b", load_format="safetensors"))


def test_missing_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_source(EngineConfig(model=str(tmp_path / "m"), load_format="dummy"))


def test_no_safetensors_files(tmp_path):
    path = _write_config(tmp_path / "m")
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files in .*load_format='dummy'"):
        resolve_model_source(EngineConfig(model=str(path)))


def test_missing_shard_is_named(tmp_path):
    path = _write_sharded(tmp_path / "m", _reference_weights(tmp_path))
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing.*model-00002-of-00003.safetensors"):
        resolve_model_source(EngineConfig(model=str(path)))


def test_malformed_index(tmp_path):
    path = _write_sharded(tmp_path / "m", _reference_weights(tmp_path))
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a valid safetensors index"):
        resolve_model_source(EngineConfig(model=str(path)))


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        resolve_model_source(EngineConfig(model=str(path), load_format="dummy"))


def test_missing_tokenizer_directory():
    with pytest.raises(FileNotFoundError, match="tokenizer directory '/no/such/dir' does not exist"):
        resolve_model_source(EngineConfig(tokenizer="/no/such/dir"))


# --- reading safetensors -------------------------------------------------------------------------------------

def test_sharded_and_single_file_give_identical_tensors(tmp_path):
    weights = _reference_weights(tmp_path)
    single = dict(iter_safetensors(_write_single(tmp_path / "single", weights)))
    sharded = dict(iter_safetensors(_write_sharded(tmp_path / "sharded", weights)))
    assert set(single) == set(sharded) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(single[name], tensor) and torch.equal(sharded[name], tensor), name


def test_index_decides_which_files_are_read(tmp_path):
    weights = _reference_weights(tmp_path)
    path = _write_sharded(tmp_path / "m", weights)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2)}, str(path / "consolidated.safetensors"))
    assert set(dict(iter_safetensors(path))) == set(weights)


def test_consolidated_file_is_skipped_beside_hugging_face_files(tmp_path):
    weights = _reference_weights(tmp_path)
    path = _write_single(tmp_path / "m", weights)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2)}, str(path / "consolidated.safetensors"))
    assert set(dict(iter_safetensors(path))) == set(weights)


# --- load_model ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TINY, TINY_QWEN], ids=["llama", "qwen2-bias"])
def test_load_model_from_single_and_sharded_checkpoints(tmp_path, cfg):
    weights = _reference_weights(tmp_path, cfg)
    loaded = []
    for path in (_write_single(tmp_path / "single", weights, cfg), _write_sharded(tmp_path / "sharded", weights, 2, cfg)):
        model, src = load_model(EngineConfig(model=str(path)), CPU, torch.float32)
        assert not src.dummy and src.weights_dir == path
        exported = model.export_hf_state_dict()
        for name, tensor in weights.items():
            assert torch.equal(exported[name], tensor), name
        loaded.append(_params(model))
    assert all(torch.equal(loaded[0][n], loaded[1][n]) for n in loaded[0])


def test_load_model_casts_to_the_requested_dtype(tmp_path):
    weights = _reference_weights(tmp_path)
    model, _ = load_model(EngineConfig(model=str(_write_single(tmp_path / "m", weights))), CPU, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    exported = model.export_hf_state_dict()
    assert torch.equal(exported["model.norm.weight"], weights["model.norm.weight"].bfloat16())


def test_checkpoint_missing_a_weight_is_refused(tmp_path):
    weights = _reference_weights(tmp_path)
    del weights["model.layers.1.mlp.down_proj.weight"]
    path = _write_single(tmp_path / "m", weights)
    with pytest.raises(ValueError, match="missing.*model.layers.1.mlp.down_proj.weight"):
        load_model(EngineConfig(model=str(path)), CPU, torch.float32)


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    weights = _reference_weights(tmp_path)
    path = _write_single(tmp_path / "m", weights)
    _write_config(path, dataclasses.replace(TINY, intermediate_size=64))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(EngineConfig(model=str(path)), CPU, torch.float32)


# --- dummy weights ---------------------------------------------------------------------------------------------

def test_dummy_weights_are_deterministic_per_seed():
    first, _ = load_model(EngineConfig(seed=3), CPU, torch.float32)
    again, _ = load_model(EngineConfig(seed=3), CPU, torch.float32)
    other, _ = load_model(EngineConfig(seed=4), CPU, torch.float32)
    a, b, c = _params(first), _params(again), _params(other)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(not torch.equal(a[n], c[n]) for n in a)


def test_dummy_weight_statistics():
    model, _ = load_model(EngineConfig(), CPU, torch.float32)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if "norm" in name:
            assert abs(p.mean().item() - 1.0) < 0.01 and p.std().item() < 0.05, name
        else:
            assert abs(p.mean().item()) < 0.01 and 0.015 < p.std().item() < 0.025, name


def test_init_dummy_weights_covers_every_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    for p in model.parameters():
        p.data.fill_(float("nan"))
    init_dummy_weights(model, seed=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dummy_weights_give_finite_bf16_logits_at_real_width():
    """One Llama-3-8B-wide layer in bf16 (transformers' forward on our random weights): no inf / nan."""
    import transformers

    cfg = dataclasses.replace(PRESETS["llama-3-8b"], vocab_size=256, num_hidden_layers=1, bos_token_id=None,
                              eos_token_ids=())
    source = dataclasses.replace(resolve_model_source(EngineConfig(model="llama-3-8b")), model_config=cfg)
    model, _ = load_model(EngineConfig(model="llama-3-8b"), CPU, torch.bfloat16, source=source)
    hf_dict = cfg.to_hf_dict()
    hf_config = transformers.AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    with torch.device("meta"):  # no second random init: our tensors are assigned
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf.load_state_dict(model.export_hf_state_dict(), assign=True, strict=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_config)  # its buffer was left on meta
    with torch.no_grad():
        logits = hf(torch.arange(16).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()  # computed in bf16 (transformers < 4.46 upcasts the output)
    assert logits.float().std() > 0.1  # not collapsed to a constant


# --- tokenizers ------------------------------------------------------------------------------------------------

def test_load_tokenizer_of_a_checkpoint_directory(tmp_path):
    path = _write_single(tmp_path / "m", _reference_weights(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_dir() / name, path / name)
    tok = load_tokenizer(resolve_model_source(EngineConfig(model=str(path))))
    assert tok.decode(tok.encode("héllo 世界 🚀"), skip_special_tokens=True) == "héllo 世界 🚀"


def test_load_tokenizer_refuses_a_directory_without_one(tmp_path):
    path = _write_single(tmp_path / "m", _reference_weights(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*tokenizer='default'"):
        load_tokenizer(resolve_model_source(EngineConfig(model=str(path))))
