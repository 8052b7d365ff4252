"""Which model class implements each supported Hugging Face architecture."""
from __future__ import annotations

from nanoflow.models.config import SUPPORTED_ARCHITECTURES
from nanoflow.models.llama import LlamaForCausalLM
from nanoflow.models.mixtral import MixtralForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    """The class for `architecture` (ValueError naming the supported ones otherwise)."""
    cls = MODEL_CLASSES.get(architecture)
    if cls is None:
        raise ValueError(f"unsupported architecture {architecture!r}; nanoflow supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return cls
