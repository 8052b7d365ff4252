"""Which model class implements each supported Hugging Face architecture."""
from __future__ import annotations

from nanoflow.models.config import SUPPORTED_ARCHITECTURES
from nanoflow.models.llama import LlamaForCausalLM
from nanoflow.models.mixtral import MixtralForCausalLM
from nanoflow.models.qwen_moe import QwenMoeForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,  # the q/k norm comes with the config (ModelConfig.qk_norm)
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
}


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    """The class for `architecture` (ValueError naming the supported ones otherwise)."""
    cls = MODEL_CLASSES.get(architecture)
    if cls is None:
        raise ValueError(f"unsupported architecture {architecture!r}; nanoflow supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return cls
