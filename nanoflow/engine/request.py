"""A request's state through its life: waiting, running (maybe preempted and recomputed), finished."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from nanoflow.sampling_params import SamplingParams


PENDING_TOKEN = -1
"""Placeholder id of an output token still on the device."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"
    """A step that ran this request failed; it was stopped and its KV freed (the engine goes on)."""

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


@dataclass(eq=False)
class Request:
    """One sequence. A user request with n > 1 becomes n of these sharing a parent id."""
    request_id: str
    """Unique sequence id (parent id, or 'parent#i' for n > 1)."""
    prompt_token_ids: list[int]
    """The prompt."""
    params: SamplingParams
    """Sampling options."""
    max_tokens: int
    """Output tokens allowed (max_tokens resolved against the context limit)."""
    arrival: int
    """Monotonic arrival number: lower is older (admission order, preemption victim choice)."""
    output_token_ids: list[int] = field(default_factory=list)
    """Generated tokens so far."""
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache (prompt and outputs alike: preemption recomputes both)."""
    status: RequestStatus = RequestStatus.WAITING
    """Where the request is."""
    stop_reason: int | str | None = None
    """The stop token or string that finished it."""
    num_pending_tokens: int = 0
    """Sampled on the device but not yet seen by the host (async scheduling); their ids are
    PENDING_TOKEN placeholders at the end of output_token_ids."""
    num_preemptions: int = 0
    """How often it lost its KV blocks."""
    engine_state: Any = None
    """Engine-side per-request extras (detokenizer, generator, logprobs); opaque here."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Tokens the request can hold at its end: the projection used for admission."""
        return len(self.prompt_token_ids) + self.max_tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens start:end of prompt + output, without concatenating the whole sequence."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]
