"""What completions and chat share: parsing and checking a request, bounds on what it may make the
engine do, tokenizing off the event loop, submitting to the engine, and formatting logprobs.

Every tokenizer call (encode, chat template, decoding tokens for logprobs) runs on a small thread
pool: a long prompt or a large logprobs answer never stalls the event loop, so other requests and
/health keep being served.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from nanoflow.engine.engine import PromptError
from nanoflow.entrypoints import errors, protocol as p
from nanoflow.entrypoints.async_engine import AsyncEngine, EngineDeadError, RequestCancelledError, RequestStream
from nanoflow.entrypoints.errors import APIError
from nanoflow.entrypoints.lifecycle import ServerLifecycle
from nanoflow.entrypoints.metrics import ServerMetrics
from nanoflow.entrypoints.server_config import ServerConfig
from nanoflow.entrypoints.streaming import abort_all, collect, unless_disconnected
from nanoflow.outputs import Logprob, RequestOutput
from nanoflow.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
LogprobEntries = Sequence[dict[int, Logprob] | None]


class OpenAIServing:
    """State and helpers one app's handlers share."""

    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics, config: ServerConfig,
                 lifecycle: ServerLifecycle, pool: ThreadPoolExecutor):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.config = config
        self.lifecycle = lifecycle
        self._pool = pool
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.max_seqs_per_request = engine.max_seqs_per_request
        self.max_prompt_chars = config.max_prompt_chars or self.max_model_len * _longest_token_chars(self.tokenizer)
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._warned_fields: set[str] = set()
        # Logprob token strings repeat a lot; decoding each one through transformers is not free.
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._decode_token)

    # ---- off the event loop
    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (call on the pool). The Rust batch encode releases the GIL."""
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- checks
    async def parse(self, request: Request, model: type[M]) -> M:
        body = await request.body()
        try:
            req = model.model_validate_json(body)
        except ValidationError as exc:
            raise errors.validation_error(exc) from None
        new = [f for f in req.ignored_fields() if f not in self._warned_fields]  # type: ignore[attr-defined]
        if new:
            self._warned_fields.update(new)
            logger.warning("ignoring unknown request fields: %s", ", ".join(new))
        return req

    def check_common(self, req: p.CompletionRequest | p.ChatCompletionRequest) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        unsupported = req.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported")

    def check_num_seqs(self, num_prompts: int, n: int) -> None:
        if num_prompts * n > self.max_seqs_per_request:
            what = f"{num_prompts} prompts x n={n}" if num_prompts > 1 else f"n={n}"
            raise APIError(400, f"{what} asks for {num_prompts * n} sequences; this server allows at most "
                                f"{self.max_seqs_per_request} per request (max_seqs_per_request)",
                           param="n", code="invalid_value")

    def check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise APIError(400, f"{param} has {num_chars} characters; this server accepts at most "
                                f"{self.max_prompt_chars} (max_prompt_chars); a longer text cannot fit the "
                                f"model's {self.max_model_len}-token context", param=param,
                           code="context_length_exceeded")

    def check_prompt(self, ids: list[int], max_tokens: int | None = None, param: str = "prompt") -> None:
        """The engine's own prompt check (LLMEngine.validate_prompt), answered as a 400."""
        try:
            self.engine.validate_prompt(ids, max_tokens, param)
        except PromptError as exc:
            raise errors.prompt_error(exc) from None

    @staticmethod
    def sampling_params(req: p.CompletionRequest | p.ChatCompletionRequest,
                        max_tokens: int | None) -> SamplingParams:
        try:
            return req.to_sampling_params(max_tokens)
        except ValueError as exc:  # SamplingParams' messages start with the field's name
            raise APIError(400, str(exc), param=req.param_for(str(exc).split(" ", 1)[0]),
                           code="invalid_value") from None

    # ---- the engine
    async def submit(self, request_id: str, prompts: list[list[int]], params: SamplingParams) -> list[RequestStream]:
        """Adds every prompt as its own engine request (all in one engine iteration)."""
        if self.lifecycle.draining:  # it began shutting down while this request was tokenized
            raise errors.shutting_down()
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(*(self.engine.add_request(rid, prompt, params)
                                         for rid, prompt in zip(ids, prompts)), return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            abort_all(streams)
            raise errors.engine_error(failure, self.config.retry_after)
        return streams

    async def collect_unless_disconnected(self, request: Request,
                                          streams: list[RequestStream]) -> list[RequestOutput] | None:
        """The final outputs, or None when the client left first (then the requests are aborted)."""
        try:
            return await unless_disconnected(request, collect(streams))
        except (EngineDeadError, RequestCancelledError) as exc:
            raise errors.stream_error(exc) from None
        finally:
            abort_all(streams)

    # ---- logprobs (call on the pool: they decode tokens)
    def completion_logprobs(self, token_ids: Sequence[int], entries: LogprobEntries,
                            text_offset: int) -> p.CompletionLogProbs:
        """OpenAI's completion logprobs of `token_ids` (entries[i] belongs to token_ids[i]; a None
        entry, the first prompt token's, has no logprob); offsets count from `text_offset`."""
        out = p.CompletionLogProbs()
        for token_id, entry in zip(token_ids, entries):
            token = self.token_text(token_id)
            out.tokens.append(token)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                out.token_logprobs.append(_clamp(entry[token_id].logprob))
                out.top_logprobs.append({self.token_text(t): _clamp(lp.logprob) for t, lp in entry.items()})
            out.text_offset.append(text_offset)
            text_offset += len(token)
        return out

    def chat_logprobs(self, token_ids: Sequence[int], entries: LogprobEntries, top_k: int) -> p.ChatCompletionLogProbs:
        content = []
        for token_id, entry in zip(token_ids, entries):
            token = self.token_text(token_id)
            ranked = sorted(((lp.rank, t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_k),
                            key=lambda x: x[0])
            top = [p.ChatCompletionLogProb(token=self.token_text(t), logprob=_clamp(lp.logprob),
                                           bytes=list(self.token_text(t).encode())) for _, t, lp in ranked]
            content.append(p.ChatCompletionLogProbsContent(
                token=token, logprob=_clamp(entry[token_id].logprob), bytes=list(token.encode()), top_logprobs=top))
        return p.ChatCompletionLogProbs(content=content)


def _clamp(logprob: float) -> float:
    return max(logprob, p.MIN_LOGPROB)


def _longest_token_chars(tokenizer) -> int:
    """Characters of the vocabulary's longest token: a text longer than max_model_len times this
    cannot tokenize into max_model_len tokens."""
    try:
        return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
    except (AttributeError, NotImplementedError, TypeError):
        return 64


def usage(prompt_tokens: int, completion_tokens: int) -> p.UsageInfo:
    return p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)
