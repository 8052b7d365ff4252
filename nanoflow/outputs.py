"""What the engine returns for a request (vLLM-compatible shapes)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    """Log-probability of the token under the model's raw distribution."""
    rank: int | None = None
    """1-based rank of the token among the vocabulary (1 = most likely), when known."""
    decoded_token: str | None = None
    """The token's text."""


@dataclass
class CompletionOutput:
    index: int
    """Which of the request's n sequences this is."""
    text: str
    """Generated text so far (cumulative)."""
    token_ids: list[int]
    """Generated token ids so far (cumulative)."""
    cumulative_logprob: float | None = None
    """Sum of the chosen tokens' logprobs, when logprobs were requested."""
    logprobs: list[dict[int, Logprob]] | None = None
    """Per generated token: the chosen token and the top-k alternatives."""
    finish_reason: str | None = None
    """'stop', 'length', 'abort' or 'error' (a step that ran it failed) once finished."""
    stop_reason: int | str | None = None
    """The stop string or stop token that ended the sequence."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    """The id given to add_request."""
    prompt: str | None
    """The prompt text, when a string was given."""
    prompt_token_ids: list[int]
    """The tokenised prompt."""
    outputs: list[CompletionOutput] = field(default_factory=list)
    """One per sequence (n of them)."""
    finished: bool = False
    """All sequences finished."""
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """With SamplingParams.prompt_logprobs: per prompt token, its logprob given the tokens before it
    and the top-k alternatives (None for the first token, which has no context). Set once complete."""
