"""What the engine returns for a request (vLLM-compatible shapes)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    """Log-probability of the token under the model's raw distribution."""
    rank: int | None = None
    """1-based rank of the token among the vocabulary (1 = most likely), when known."""
    decoded_token: str | None = None
    """The token's text."""


class KnownPrefix(Sequence):
    """The first `length` items of a list that only grows past them (a running sequence's tokens or
    logprob entries), without copying it: a streamed output of a running request costs O(1) per step,
    not O(tokens so far). Slices and list() give plain lists; compares equal to the same list."""

    __slots__ = ("_items", "_length")

    def __init__(self, items: list, length: int):
        self._items, self._length = items, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._items[i] for i in range(*index.indices(self._length))] if index.step not in (None, 1) \
                else self._items[slice(*index.indices(self._length)[:2])]
        if not -self._length <= index < self._length:
            raise IndexError("index out of range")
        return self._items[index % self._length]

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple, KnownPrefix)):
            return len(other) == self._length and list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self[:])


@dataclass
class CompletionOutput:
    index: int
    """Which of the request's n sequences this is."""
    text: str
    """Generated text so far (cumulative)."""
    token_ids: Sequence[int]
    """Generated token ids so far (cumulative): a list once finished, a KnownPrefix view while running."""
    cumulative_logprob: float | None = None
    """Sum of the chosen tokens' logprobs, when logprobs were requested."""
    logprobs: Sequence[dict[int, Logprob]] | None = None
    """Per generated token: the chosen token and the top-k alternatives (a KnownPrefix while running)."""
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
