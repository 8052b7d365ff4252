"""Where a model comes from (local directory, preset, built-in default), its weights and its tokenizer.

`config.model` is read as: a preset name (see nanoflow.models.presets; 'default' is the built-in tiny
model), else a local Hugging Face directory (config.json + *.safetensors, single file or sharded). To use a
directory whose name is also a preset name, write it as a path ('./llama-3-8b'). Nothing is downloaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from nanoflow.config import EngineConfig
from nanoflow.kernels import select_kernels
from nanoflow.memory_check import check_model_fits
from nanoflow.models.config import ModelConfig
from nanoflow.models.presets import PRESETS

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_INIT_STD = 0.02  # like transformers' initializer_range: keeps random-weight logits finite in bf16


@dataclass(frozen=True)
class ModelSource:
    """A resolved `EngineConfig.model`: the shape, where the weights and the tokenizer are."""
    model_config: ModelConfig
    """The model's shape."""
    weights_dir: Path | None
    """Directory of the *.safetensors files; None means random (dummy) weights."""
    tokenizer_dir: Path
    """Directory AutoTokenizer loads from."""
    dummy: bool
    """True when the weights are random (a preset, the default model, or load_format='dummy')."""


def default_model_dir() -> Path:
    """The built-in assets (the tokenizer of the `default` model), shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets"


def resolve_model_source(config: EngineConfig) -> ModelSource:
    """Reads config.model / load_format / tokenizer into a ModelSource; raises on anything unusable."""
    name = config.model
    if not name:
        raise ValueError(f"model must be a directory or a preset name; presets: {', '.join(sorted(PRESETS))}")
    if name in PRESETS:
        if config.load_format == "safetensors":
            raise ValueError(f"model {name!r} is a preset with random weights; load_format='safetensors' "
                             f"needs a model directory (write './{name}' for a directory of that name)")
        return ModelSource(PRESETS[name], None, _tokenizer_dir(config, default_model_dir()), dummy=True)
    model_dir = Path(name).expanduser()
    if not model_dir.is_dir():
        looks_like_hub_id = "/" in name and not name.startswith(("/", ".", "~"))
        hint = " (downloads are not supported: pass a local directory)" if looks_like_hub_id else ""
        raise ValueError(f"model {name!r} is neither a directory nor a preset{hint}; "
                         f"presets: {', '.join(sorted(PRESETS))}")
    model_config = ModelConfig.from_pretrained_dir(model_dir)
    tokenizer_dir = _tokenizer_dir(config, model_dir)
    if config.load_format == "dummy":
        return ModelSource(model_config, None, tokenizer_dir, dummy=True)
    checkpoint_files(model_dir)  # fail now, before the model is allocated, if the weights are incomplete
    return ModelSource(model_config, model_dir, tokenizer_dir, dummy=False)


def _tokenizer_dir(config: EngineConfig, fallback: Path) -> Path:
    if config.tokenizer is None:
        return fallback
    if config.tokenizer == "default":
        return default_model_dir()
    path = Path(config.tokenizer).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {config.tokenizer!r} does not exist "
                                "(pass a local directory, or 'default' for the built-in tokenizer)")
    return path


def checkpoint_files(weights_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in load order: the shards of the index if there is one."""
    weights_dir = Path(weights_dir)
    index_path = weights_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        shards = [weights_dir / shard for shard in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} names shards that are missing from {weights_dir}: "
                                    f"{', '.join(missing)}")
        return shards
    files = sorted(weights_dir.glob("*.safetensors"))
    # Mistral's repos ship consolidated.safetensors (their own names) beside the Hugging Face files.
    hf_files = [p for p in files if not p.name.startswith("consolidated")]
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {weights_dir} "
                                "(use load_format='dummy' for random weights of this shape)")
    return hf_files or files


def iter_safetensors(weights_dir: Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) of a single-file or sharded checkpoint, one tensor at a time (memory-mapped)."""
    from safetensors import safe_open

    for path in checkpoint_files(weights_dir):
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Fills every parameter with random values from `seed`, generated on the parameter's device.

    Matrices and biases get normal(0, 0.02); norm weights get normal(1, 0.02) (ones plus a little noise).
    The same seed on the same device type and torch version gives the same weights.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(device=param.device)
            gen.manual_seed(seed)
        mean = 1.0 if param.dim() == 1 and "norm" in name else 0.0
        param.normal_(mean, _INIT_STD, generator=gen)


def load_model(config: EngineConfig, device: torch.device, dtype: torch.dtype,
               source: ModelSource | None = None, tp=None) -> tuple[nn.Module, ModelSource]:
    """Builds the model on `device` in `dtype`, running the kernels config.use_triton selects, and fills
    its weights (checkpoint or random from config.seed).

    Pass `source` when it was already resolved (e.g. to pick the dtype from its torch_dtype).
    `tp` (a nanoflow.distributed.TPContext): build this rank's shard only, reading only its slices of
    the checkpoint (dummy weights: random values of the shard's shape).
    """
    from nanoflow.models.registry import model_class

    if source is None:
        source = resolve_model_source(config)
    check_model_fits(config, source.model_config, device, dtype)  # fail now, not in the OOM killer's hands
    # Parameters are allocated on `device` and filled in place there (dummy: a device generator;
    # checkpoint: one memory-mapped tensor at a time): no host copy, no second copy of the weights.
    cls = model_class(source.model_config.architecture)
    kernels = select_kernels(config.use_triton, device)
    if tp is None:
        model = cls(source.model_config, dtype=dtype, device=device, kernels=kernels)
    else:
        model = cls(tp.shard_config(source.model_config), dtype=dtype, device=device, kernels=kernels, tp=tp)
    with torch.no_grad():
        if source.weights_dir is None:
            init_dummy_weights(model, config.seed)
        elif tp is None:
            model.load_weights(iter_safetensors(source.weights_dir))
        else:
            model.load_weights(tp.read_weights(source.weights_dir, source.model_config))
    return model, source


def load_tokenizer(source: ModelSource):
    """The tokenizer of `source` (a transformers PreTrainedTokenizerFast), loaded offline."""
    from transformers import AutoTokenizer

    tok_dir = source.tokenizer_dir
    if not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {tok_dir} (expected one of {', '.join(TOKENIZER_FILES)}); "
                                "pass tokenizer=<directory>, or tokenizer='default' for the built-in one")
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        raise ValueError(f"could not load the tokenizer in {tok_dir}: {e}") from e
