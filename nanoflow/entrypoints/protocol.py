"""Request and response bodies of the OpenAI-compatible API (the OpenAI shapes, plus vLLM's extra
sampling fields).

Requests are strict as OpenAI is: a bool is not an int, a string is not a number, and the ranges
OpenAI documents (temperature in [0, 2], penalties in [-2, 2], top_logprobs in [0, 20]) are checked
here; the others (top_p > 0, top_k, seed, ...) are SamplingParams' job, so the offline API and the
server reject them with the same message. Lists a client could make huge for the engine to scan per
token (stop strings, stop token ids) have bounds too; the body itself is bounded by the server.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from nanoflow.sampling_params import MAX_LOGPROBS, SamplingParams

# vLLM clamps -inf logprobs to this so the JSON stays numeric.
MIN_LOGPROB = -9999.0
# The engine checks every stop string against the new text of every token: bound their number and size.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024

TokenIds = Annotated[list[int], Field(min_length=1)]


class OpenAIBaseModel(BaseModel):
    # Unknown fields are accepted (and ignored) as vLLM does, so clients that send newer OpenAI
    # fields keep working; `ignored_fields()` lets the server log them.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, use_attribute_docstrings=True)

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


# ---- errors ---------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- shared request fields ------------------------------------------------------------------------
class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    """Send a last chunk with the usage of the whole request (and `usage: null` on the others)."""


class _SamplingRequest(OpenAIBaseModel):
    """Fields that completions and chat share; they map onto SamplingParams."""
    model: str | None = None
    n: int = Field(default=1, ge=1)
    """Choices per prompt; prompts x n is bounded by the server's max_seqs_per_request."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    """Up to 64 strings (MAX_STOP_STRINGS) of at most 256 characters (MAX_STOP_STRING_CHARS)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Not supported: a non-empty map is rejected."""
    user: str | None = None
    # vLLM's extra sampling fields.
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of a field we accept by name but cannot honour (or values that do not go
        together), else None."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            return "stop", f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}"
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            return "stop", f"each stop string may have at most {MAX_STOP_STRING_CHARS} characters"
        return None

    def param_for(self, sampling_field: str) -> str | None:
        """The request field behind a SamplingParams field (for the error's `param`)."""
        return sampling_field if sampling_field in type(self).model_fields else None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises ValueError (naming the field) for out-of-range values."""
        optional = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
        }
        return SamplingParams(
            n=self.n, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            **{k: v for k, v in optional.items() if v is not None})


# ---- completions ----------------------------------------------------------------------------------
class CompletionRequest(_SamplingRequest):
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    """A text, token ids, or a batch of either (each prompt gets n choices)."""
    max_tokens: int | None = Field(default=16, ge=0)
    """0 only with echo: the prompt is returned (with its logprobs), nothing is generated."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Top-k logprobs per output token (0: only the chosen token's). OpenAI documents at most 5;
    nanoflow allows vLLM's 20."""
    echo: bool = False
    """Return the prompt before the completion; with logprobs, the prompt tokens' logprobs too (the
    first token's is null)."""
    suffix: str | None = None
    """Not supported: a non-empty suffix is rejected."""
    best_of: int | None = Field(default=None, ge=1)
    """Only best_of == n is supported (no server-side ranking)."""

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported (it must equal n when given)"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens must be at least 1 (0 is only allowed with echo)"
        return super().unsupported()

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: return the prompt only (the engine samples one token, dropped)."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        prompt_logprobs = self.logprobs if self.echo else None
        return self._sampling_params(1 if self.echo_only else max_tokens, self.logprobs, prompt_logprobs)


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


# ---- chat -----------------------------------------------------------------------------------------
class ChatContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[ChatContentPart] | None = None
    name: str | None = None

    def num_chars(self) -> int:
        """Characters of its text (a bound on what tokenizing it costs)."""
        if isinstance(self.content, list):
            return sum(len(part.text or "") for part in self.content)
        return len(self.content or "")

    def text(self) -> str:
        """The content as one string; ValueError for non-text parts (images, audio, ...)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"message content of type {part.type!r} is not supported (text only)")
            pieces.append(part.text)
        return "".join(pieces)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    """Deprecated by OpenAI in favour of max_completion_tokens."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    """Only {"type": "text"}."""
    tools: list[dict[str, Any]] | None = None
    """Accepted with tool_choice "none" (the chat template sees them, as in vLLM); there is no
    tool-call parser, so any other tool_choice is rejected."""
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    """OpenAI's deprecated function calling: not supported, rejected when given."""
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    """OpenAI's deprecated function calling: not supported, rejected unless "none"."""
    # vLLM's chat extras.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def effective_tool_choice(self) -> str | dict[str, Any]:
        # OpenAI (and vLLM): "auto" when tools are given, "none" otherwise.
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def unsupported(self) -> tuple[str, str] | None:
        if self.functions is not None or self.function_call not in (None, "none"):
            return ("functions" if self.functions is not None else "function_call"), \
                "function calling (functions / function_call) is not supported: nanoflow has no tool-call parser"
        choice = self.effective_tool_choice
        if choice != "none":
            if not self.tools:
                return "tool_choice", "When using `tool_choice`, `tools` must be set."
            return "tool_choice", (f"tool_choice {choice!r} is not supported: nanoflow has no tool-call parser "
                                   "(tools are accepted only with tool_choice \"none\")")
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format {'type': 'text'} is supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs to be true"
        if self.add_generation_prompt and self.continue_final_message:
            return "continue_final_message", \
                "continue_final_message and add_generation_prompt cannot both be true"
        return super().unsupported()

    @property
    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens replaces the deprecated max_tokens in OpenAI's API.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def param_for(self, sampling_field: str) -> str | None:
        if sampling_field == "logprobs":
            return "top_logprobs"
        if sampling_field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return super().param_for(sampling_field)

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        # OpenAI sends the role once, in the first delta, and leaves it out afterwards.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- models ---------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nanoflow"
    root: str | None = None
    max_model_len: int | None = None
    """vLLM's extension: the longest prompt + output the server accepts."""
    vocab_size: int | None = None
    """nanoflow's extension: prompt token ids must lie in [0, vocab_size) (the benchmark client uses it)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
