"""nanoflow: a throughput-first LLM serving engine (NanoFlow's nano-batch pipeline)."""
from nanoflow.config import EngineConfig
from nanoflow.llm import LLM
from nanoflow.outputs import CompletionOutput, RequestOutput
from nanoflow.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
