"""Server configuration: one typed dataclass, a docstring per field (`nanoflow serve` turns them into
flags, as EngineConfig's)."""
from __future__ import annotations

from dataclasses import dataclass

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on /v1/* (None: no key)."""
    served_model_name: str | None = None
    """The model name clients use (None: the --model value)."""
    retry_after: int = 1
    """Retry-After (seconds) of 503 answers when the waiting queue is full."""
    max_request_bytes: int = 8 << 20
    """Largest request body in bytes; larger ones get 413 before they are read."""
    max_prompt_chars: int | None = None
    """Longest prompt text (or chat messages' text) in characters, checked before tokenizing; default
    max_model_len x the longest token of the vocabulary, so only prompts that cannot fit are refused."""
    tokenizer_threads: int = 4
    """Threads that tokenize prompts, render chat templates and format logprobs (never the event loop)."""
    engine_stall_timeout: float = 120.0
    """/health answers 503 once the engine has had work for this many seconds without finishing a step
    (0 turns the check off)."""
    shutdown_timeout: float = 20.0
    """On SIGTERM / SIGINT: seconds running requests may take to finish (new ones get 503); the rest then
    end with an error (streams: an error event and [DONE]). Keep it below the supervisor's kill timeout."""
    keep_alive_on_engine_death: bool = False
    """Keep answering 503 after the engine loop died instead of exiting with status 1 (so that a
    supervisor restarts the process), as vLLM's VLLM_KEEP_ALIVE_ON_ENGINE_DEATH."""
    log_level: str = "info"
    """One of critical, error, warning, info, debug."""

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "tokenizer_threads", "retry_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_prompt_chars is not None and self.max_prompt_chars <= 0:
            raise ValueError(f"max_prompt_chars must be positive, got {self.max_prompt_chars}")
        for name in ("engine_stall_timeout", "shutdown_timeout"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
