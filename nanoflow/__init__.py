"""nanoflow: a throughput-first LLM serving engine (NanoFlow's nano-batch pipeline)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

# Imported on first use (PEP 562), so `import nanoflow.entrypoints.cli` (the `nanoflow` command) does
# not pay seconds for torch before it knows which command runs.
_LAZY = {"LLM": "nanoflow.llm", "SamplingParams": "nanoflow.sampling_params", "EngineConfig": "nanoflow.config",
         "RequestOutput": "nanoflow.outputs", "CompletionOutput": "nanoflow.outputs"}

if TYPE_CHECKING:
    from nanoflow.config import EngineConfig
    from nanoflow.llm import LLM
    from nanoflow.outputs import CompletionOutput, RequestOutput
    from nanoflow.sampling_params import SamplingParams


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanoflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
