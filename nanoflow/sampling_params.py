"""Per-request sampling options, with vLLM's names, defaults and value ranges.

Every invalid value raises ValueError naming the field, so the server can turn it into an HTTP 400.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Below this temperature a request is sampled greedily (dividing by ~0 would overflow).
GREEDY_TEMPERATURE = 1e-5
# vLLM's cap on the number of top logprobs a request may ask for.
MAX_LOGPROBS = 20
# torch.Generator.manual_seed accepts this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions to return for the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 (or below 1e-5) means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of top tokens whose probability mass reaches top_p; in (0, 1]."""
    top_k: int = 0
    """Keep only the top_k most likely tokens; 0 or -1 turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's; in [0, 1]."""
    seed: int | None = None
    """Seed of this request's own random generator: the same seed gives the same tokens in any batch."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context limit."""
    min_tokens: int = 0
    """EOS and stop_token_ids cannot be generated (and stop strings are not checked) before this many tokens."""
    stop: str | list[str] | None = None
    """Strings that end generation; the output ends right before the match. Normalized to a list."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (besides EOS). Normalized to a list."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks use it to force max_tokens)."""
    logprobs: int | None = None
    """Return the chosen token's logprob and this many top logprobs per output token (0: the chosen one only)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob (given the tokens before it) and this many top logprobs per
    prompt token (0: the prompt token's only); what `echo` with `logprobs` and lm-eval's loglikelihood need."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already in the output; in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the output; in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Divides positive / multiplies negative logits of tokens in the prompt or output; > 0, 1 is off."""
    skip_special_tokens: bool = True
    """Leave special tokens (EOS, BOS, ...) out of the output text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""

    def __post_init__(self) -> None:
        self._check_types()
        self._check_ranges()

    def _check_types(self) -> None:
        for name in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise ValueError(f"{name} must be an int or None, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self.stop = self._normalized_stop(self.stop)
        self.stop_token_ids = self._normalized_stop_token_ids(self.stop_token_ids)

    @staticmethod
    def _normalized_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string, a list of strings or None, got {stop!r}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only strings, got {s!r}")
            if not s:
                raise ValueError("stop must not contain empty strings")
        return list(stop)

    @staticmethod
    def _normalized_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of ints or None, got {ids!r}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must contain non-negative ints, got {t!r}")
        return list(ids)

    def _check_ranges(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        """Decoded by argmax: temperature 0 (or so small that dividing by it would overflow)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        """Any of the presence / frequency / repetition penalties is active."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def top_k_enabled(self) -> bool:
        """top_k filters tokens (0 and -1 mean off)."""
        return self.top_k > 0

    @property
    def max_stop_len(self) -> int:
        """Length in characters of the longest stop string (0 without stop strings)."""
        return max((len(s) for s in self.stop), default=0)
