"""The OpenAI-compatible HTTP server: `build_app` (FastAPI routes, SSE streaming, OpenAI error shapes),
`ServerThread` (run an app in the background), and `nanoflow serve` (`add_cli_args`, `run_from_args`).

All engine work goes through one AsyncEngine (one engine thread shared by every request); handlers only
tokenize, validate and format. Every error reaches the client as
`{"error": {"message", "type", "param", "code"}}`, and every way a request can end early (client gone,
error, server stop) aborts it in the engine so no KV block leaks.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hmac
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoflow.config import EngineConfig
from nanoflow.engine.engine import QueueFullError
from nanoflow.entrypoints import protocol as p
from nanoflow.entrypoints.async_engine import AsyncEngine, EngineDeadError, RequestStream
from nanoflow.entrypoints.metrics import ServerMetrics
from nanoflow.outputs import CompletionOutput, Logprob, RequestOutput
from nanoflow.sampling_params import SamplingParams

try:  # transformers renders chat templates with jinja2; its errors are the user's template input
    from jinja2 import TemplateError as _TemplateError
except ImportError:  # pragma: no cover - then apply_chat_template itself reports the missing package
    _TemplateError = ValueError  # type: ignore[misc,assignment]

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
_SSE_DONE = "data: [DONE]\n\n"
# Keys of chat_template_kwargs that would change what apply_chat_template returns, not the template.
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "tokenize", "return_dict", "add_generation_prompt",
                                       "continue_final_message", "chat_template", "tools", "documents"})


# ---- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> p.ErrorResponse:
        return p.ErrorResponse(error=p.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code if self.code is not None else self.status))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"Invalid JSON body: {first['msg']}", code="invalid_json")
    loc = ".".join(str(part) for part in first["loc"])
    where = f"{loc}: " if loc else ""
    return APIError(400, f"{where}{first['msg']}", param=loc or None, code="invalid_value")


def _engine_error(exc: BaseException, retry_after_s: int) -> APIError | BaseException:
    """The APIError for what AsyncEngine.add_request raised (other exceptions pass through)."""
    if isinstance(exc, QueueFullError):
        return APIError(503, f"server overloaded: {exc}; retry later", type="server_overloaded",
                        code="server_overloaded", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), type="server_error", code="engine_dead")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    return exc


# ---- streaming ------------------------------------------------------------------------------------
def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


class _SSEResponse(StreamingResponse):
    """An SSE response that runs `on_close` however it ends: done, error, or client disconnect
    (Starlette then cancels the body iterator without closing it)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            except RuntimeError:
                pass  # still running (cancelled mid-step): its own finally handles it
            self._on_close()


_END = object()


async def _next_or_end(stream: RequestStream) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(_next_or_end(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                out = task.result()
                if out is _END:
                    continue
                yield i, out
                pending[asyncio.ensure_future(_next_or_end(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


_T = TypeVar("_T")


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T | None:
    """Runs `work`; if the client disconnects first, cancels it and returns None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        finished = task.done()
        if not finished:
            task.cancel()
    return task.result() if finished else None


@dataclasses.dataclass
class _ChoiceState:
    """Streaming progress of one choice."""
    tokens_sent: int = 0
    text_sent: int = 0
    finished: bool = False


# ---- the server -----------------------------------------------------------------------------------
class OpenAIServer:
    """Route handlers of one app."""

    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics, retry_after_s: int = 1):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.model_config.vocab_size
        self._warned_fields: set[str] = set()
        # Logprob token strings repeat a lot; decoding each one through transformers is not free.
        self._token_text = functools.lru_cache(maxsize=1 << 16)(self._decode_token)

    # ---- plain endpoints
    async def health(self) -> Response:
        if not self.engine.is_alive():
            raise APIError(503, f"engine loop is not running ({self.engine.error or 'stopped'})",
                           type="server_error", code="engine_dead")
        return Response(status_code=200)

    async def list_models(self) -> JSONResponse:
        card = p.ModelCard(id=self.model_name, root=self.model_name, max_model_len=self.max_model_len,
                           vocab_size=self.vocab_size)
        return JSONResponse(p.ModelList(data=[card]).model_dump())

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- /v1/completions
    async def create_completion(self, request: Request) -> Response:
        req = await self._parse(request, p.CompletionRequest)
        self._check_common(req)
        prompts = self._completion_prompts(req.prompt)
        explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
        for ids in prompts:
            self._check_length(ids, req.max_tokens if explicit else None)
        params = self._sampling_params(req, req.max_tokens)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._submit(request_id, prompts, params)
        created = int(time.time())
        if req.stream:
            return _SSEResponse(self._completion_stream(req, request_id, created, prompts, streams),
                                on_close=lambda: _abort_all(streams))
        finals = await self._collect_unless_disconnected(request, streams)
        if finals is None:
            return Response(status_code=499)
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                logprobs = self._completion_logprobs(c, 0, 0) if req.logprobs is not None else None
                choices.append(p.CompletionResponseChoice(
                    index=i * req.n + c.index, text=c.text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        usage = _usage(sum(len(ids) for ids in prompts), completion_tokens)
        body = p.CompletionResponse(id=request_id, created=created, model=self.model_name,
                                    choices=choices, usage=usage)
        return Response(body.model_dump_json(), media_type="application/json")

    async def _completion_stream(self, req: p.CompletionRequest, request_id: str, created: int,
                                 prompts: list[list[int]], streams: list[RequestStream]) -> AsyncIterator[str]:
        states: dict[int, _ChoiceState] = {}
        try:
            async for i, out in _merge(streams):
                for c in out.outputs:
                    index = i * req.n + c.index
                    st = states.setdefault(index, _ChoiceState())
                    delta = _advance(st, c)
                    if delta is None:
                        continue
                    text, first_token = delta
                    logprobs = self._completion_logprobs(c, first_token, st.text_sent - len(text)) \
                        if req.logprobs is not None else None
                    choice = p.CompletionResponseChoice(index=index, text=text, logprobs=logprobs,
                                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                    yield _sse(p.CompletionStreamResponse(id=request_id, created=created, model=self.model_name,
                                                          choices=[choice]))
            if req.include_usage:
                yield _sse(p.CompletionStreamResponse(
                    id=request_id, created=created, model=self.model_name, choices=[],
                    usage=_usage(sum(len(ids) for ids in prompts), sum(s.tokens_sent for s in states.values()))))
        except EngineDeadError as exc:
            yield _sse(APIError(503, str(exc), type="server_error", code="engine_dead").body())
        yield _SSE_DONE

    # ---- /v1/chat/completions
    async def create_chat_completion(self, request: Request) -> Response:
        req = await self._parse(request, p.ChatCompletionRequest)
        self._check_common(req)
        ids = self._chat_prompt(req)
        self._check_length(ids, req.requested_max_tokens)
        params = self._sampling_params(req, req.requested_max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._submit(request_id, [ids], params)
        created = int(time.time())
        if req.stream:
            return _SSEResponse(self._chat_stream(req, request_id, created, len(ids), streams[0]),
                                on_close=lambda: _abort_all(streams))
        finals = await self._collect_unless_disconnected(request, streams)
        if finals is None:
            return Response(status_code=499)
        out = finals[0]
        choices = [p.ChatCompletionResponseChoice(
            index=c.index, message=p.ChatResponseMessage(content=c.text),
            logprobs=self._chat_logprobs(c, 0, req.top_logprobs or 0) if req.logprobs else None,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in out.outputs]
        usage = _usage(len(ids), sum(len(c.token_ids) for c in out.outputs))
        body = p.ChatCompletionResponse(id=request_id, created=created, model=self.model_name,
                                        choices=choices, usage=usage)
        return Response(body.model_dump_json(), media_type="application/json")

    async def _chat_stream(self, req: p.ChatCompletionRequest, request_id: str, created: int,
                           prompt_len: int, stream: RequestStream) -> AsyncIterator[str]:
        def chunk(choices: list[p.ChatCompletionResponseStreamChoice], usage=None) -> str:
            return _sse(p.ChatCompletionStreamResponse(id=request_id, created=created, model=self.model_name,
                                                       choices=choices, usage=usage))

        states = {i: _ChoiceState() for i in range(req.n)}
        try:
            for i in range(req.n):  # the role comes first, before any token, as OpenAI sends it
                yield chunk([p.ChatCompletionResponseStreamChoice(
                    index=i, delta=p.DeltaMessage(role="assistant", content=""))])
            async for out in stream:
                for c in out.outputs:
                    st = states[c.index]
                    delta = _advance(st, c)
                    if delta is None:
                        continue
                    text, first_token = delta
                    logprobs = self._chat_logprobs(c, first_token, req.top_logprobs or 0) if req.logprobs else None
                    yield chunk([p.ChatCompletionResponseStreamChoice(
                        index=c.index, delta=p.DeltaMessage(content=text), logprobs=logprobs,
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
            if req.include_usage:
                yield chunk([], _usage(prompt_len, sum(s.tokens_sent for s in states.values())))
        except EngineDeadError as exc:
            yield _sse(APIError(503, str(exc), type="server_error", code="engine_dead").body())
        yield _SSE_DONE

    # ---- request handling helpers
    async def _parse(self, request: Request, model: type[M]) -> M:
        body = await request.body()
        try:
            req = model.model_validate_json(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        new = [f for f in req.ignored_fields() if f not in self._warned_fields]  # type: ignore[attr-defined]
        if new:
            self._warned_fields.update(new)
            logger.warning("ignoring unknown request fields: %s", ", ".join(new))
        return req

    def _check_common(self, req: p.CompletionRequest | p.ChatCompletionRequest) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model",
                           code="model_not_found")
        unsupported = req.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported")

    def _sampling_params(self, req: p.CompletionRequest | p.ChatCompletionRequest,
                         max_tokens: int | None) -> SamplingParams:
        try:
            return req.to_sampling_params(max_tokens)
        except ValueError as exc:  # SamplingParams' messages start with the field's name
            raise APIError(400, str(exc), param=req.param_for(str(exc).split(" ", 1)[0]),
                           code="invalid_value") from None

    def _completion_prompts(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]  # type: ignore[list-item]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        out = []
        for item in items:
            ids = self.tokenizer.encode(item) if isinstance(item, str) else item
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                bad = next(t for t in ids if not 0 <= t < self.vocab_size)
                raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                               param="prompt", code="invalid_value")
            out.append(ids)
        return out

    def _chat_prompt(self, req: p.ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.model_name!r} has no chat template (its tokenizer defines "
                                "none); use /v1/completions with a plain prompt", param="messages",
                           code="no_chat_template")
        try:
            messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in req.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, **kwargs)
        except (ValueError, TypeError, KeyError, _TemplateError) as exc:
            raise APIError(400, f"chat template failed: {exc}", param="messages", code="invalid_value") from None
        # The template writes the special tokens itself (BOS included).
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_length(self, ids: list[int], max_tokens: int | None) -> None:
        limit = self.max_model_len
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                f"prompt has {len(ids)} tokens, leaving no room for output. Please shorten "
                                "the prompt.", param="prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > 0 and len(ids) + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")

    async def _submit(self, request_id: str, prompts: list[list[int]],
                      params: SamplingParams) -> list[RequestStream]:
        """Adds every prompt as its own engine request (all in one engine iteration)."""
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(*(self.engine.add_request(rid, prompt, params)
                                         for rid, prompt in zip(ids, prompts)), return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            _abort_all(streams)
            raise _engine_error(failure, self.retry_after_s)
        return streams

    async def _collect_unless_disconnected(self, request: Request,
                                           streams: list[RequestStream]) -> list[RequestOutput] | None:
        """The final outputs, or None when the client left first (then the requests are aborted)."""
        try:
            return await _unless_disconnected(request, self._collect(streams))
        except EngineDeadError as exc:
            raise APIError(503, str(exc), type="server_error", code="engine_dead") from None
        finally:
            _abort_all(streams)

    @staticmethod
    async def _collect(streams: list[RequestStream]) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for i, out in _merge(streams):
            finals[i] = out
        return [f for f in finals if f is not None]

    # ---- logprobs
    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(self, c: CompletionOutput, start: int, text_offset: int) -> p.CompletionLogProbs:
        """Logprobs of c's tokens from `start` on; offsets count from `text_offset` in the choice's text."""
        out = p.CompletionLogProbs()
        for token_id, entry in _token_entries(c, start):
            token = self._token_text(token_id)
            out.tokens.append(token)
            out.token_logprobs.append(_clamp(entry[token_id].logprob))
            out.top_logprobs.append({self._token_text(t): _clamp(lp.logprob) for t, lp in entry.items()})
            out.text_offset.append(text_offset)
            text_offset += len(token)
        return out

    def _chat_logprobs(self, c: CompletionOutput, start: int, top_k: int) -> p.ChatCompletionLogProbs:
        content = []
        for token_id, entry in _token_entries(c, start):
            token = self._token_text(token_id)
            ranked = sorted(((lp.rank, t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_k),
                            key=lambda x: x[0])
            top = [p.ChatCompletionLogProb(token=self._token_text(t), logprob=_clamp(lp.logprob),
                                           bytes=list(self._token_text(t).encode())) for _, t, lp in ranked]
            content.append(p.ChatCompletionLogProbsContent(
                token=token, logprob=_clamp(entry[token_id].logprob), bytes=list(token.encode()), top_logprobs=top))
        return p.ChatCompletionLogProbs(content=content)


def _token_entries(c: CompletionOutput, start: int) -> list[tuple[int, dict[int, Logprob]]]:
    # token_ids is a snapshot; the engine may append to the logprobs list later, so bound by it.
    end = len(c.token_ids)
    entries = (c.logprobs or [])[start:end]
    return list(zip(c.token_ids[start:end], entries))


def _clamp(logprob: float) -> float:
    return max(logprob, p.MIN_LOGPROB)


def _advance(st: _ChoiceState, c: CompletionOutput) -> tuple[str, int] | None:
    """(new text, index of the first new token) of c since the last chunk, or None when nothing to send."""
    if st.finished:
        return None
    new_tokens = len(c.token_ids) - st.tokens_sent
    text = c.text[st.text_sent:]
    if new_tokens <= 0 and not text and c.finish_reason is None:
        return None
    first = st.tokens_sent
    st.tokens_sent = max(st.tokens_sent, len(c.token_ids))
    st.text_sent += len(text)
    st.finished = c.finish_reason is not None
    return text, first


def _usage(prompt_tokens: int, completion_tokens: int) -> p.UsageInfo:
    return p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)


def _abort_all(streams: Sequence[RequestStream]) -> None:
    for s in streams:
        s.abort()


# ---- the app --------------------------------------------------------------------------------------
class _APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/* (health and metrics stay open, as in vLLM).
    A plain ASGI middleware: it never wraps responses, so streaming and disconnects are untouched."""

    def __init__(self, app, api_key: str, metrics: ServerMetrics):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                self._metrics.record_rejected(401)
                error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None, *,
              retry_after_s: int = 1) -> FastAPI:
    """The FastAPI app serving `async_engine` (already started) under the name `served_model_name`.
    Its metrics live in their own registry (app.state.metrics)."""
    metrics = ServerMetrics(served_model_name, async_engine.stats)
    async_engine.add_observer(metrics)
    server = OpenAIServer(async_engine, served_model_name, metrics, retry_after_s)
    app = FastAPI(title="nanoflow", summary="OpenAI-compatible LLM server")
    app.state.server = server
    app.state.metrics = metrics

    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"])
    app.add_api_route("/v1/models", server.list_models, methods=["GET"])
    app.add_api_route("/v1/completions", server.create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.create_chat_completion, methods=["POST"])

    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.record_rejected(exc.status)
        return exc.response()

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=None,
                        headers=getattr(exc, "headers", None)).response()

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.record_rejected(400)
        return APIError(400, str(exc.errors()), code="invalid_value").response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error",
                        code="internal_error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key, metrics=metrics)
    return app


class ServerThread:
    """Runs an app with uvicorn on a background thread (tests, notebooks). The socket is bound before
    the thread starts, so port=0 picks a free port without a race."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family)
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="nanoflow-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- `nanoflow serve` -----------------------------------------------------------------------------
def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `nanoflow serve` options (server flags + one flag per EngineConfig field)."""
    from nanoflow.entrypoints.cli import add_engine_args
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients use (default: the --model value)")
    parser.add_argument("--retry-after", type=int, default=1, metavar="SECONDS",
                        help="Retry-After of 503 answers when the waiting queue is full (default %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Loads the model, starts the engine thread and serves until interrupted; 2 on bad options."""
    from nanoflow.engine.engine import LLMEngine
    from nanoflow.entrypoints.cli import engine_config_from_args
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config: EngineConfig = engine_config_from_args(args)  # ValueError -> the CLI prints it, exit 2
    engine = LLMEngine(config)
    async_engine = AsyncEngine(engine).start()
    app = build_app(async_engine, args.served_model_name or config.model, args.api_key,
                    retry_after_s=args.retry_after)
    logger.info("serving %s on http://%s:%d", args.served_model_name or config.model, args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off",
                    timeout_graceful_shutdown=5)
    finally:
        async_engine.shutdown()
    return 0
