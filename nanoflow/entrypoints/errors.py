"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, for every way a request
can fail (bad input, overload, a dead or stopping engine, a failed generation, a bug), and the app's
exception handlers, so no answer is ever text/plain."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoflow.engine.engine import PromptError, QueueFullError
from nanoflow.entrypoints import protocol as p
from nanoflow.entrypoints.async_engine import EngineDeadError, RequestCancelledError
from nanoflow.entrypoints.metrics import ServerMetrics

logger = logging.getLogger(__name__)
# Parts of a pydantic error location that name a union member, not a field ('str', 'list[int]', ...).
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "null"})


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

    def sse(self) -> str:
        """The error as a server-sent event (for a stream that already answered 200)."""
        return f"data: {self.body().model_dump_json()}\n\n"

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"Invalid JSON body: {first['msg']}", code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object", code="invalid_value")
    loc = [str(part) for part in first["loc"]
           if isinstance(part, int) or ("[" not in str(part) and str(part) not in _TYPE_TAGS)]
    where = ".".join(loc)
    return APIError(400, f"{where}: {first['msg']}" if where else first["msg"],
                    param=loc[0] if loc else None, code="invalid_value")


def engine_dead(exc: BaseException) -> APIError:
    return APIError(503, str(exc), type="server_error", code="engine_dead")


def shutting_down(detail: str = "the server is shutting down") -> APIError:
    return APIError(503, f"{detail}; retry on another replica or later", type="server_error",
                    code="server_shutting_down", headers={"Retry-After": "1"})


def generation_failed() -> APIError:
    # As vLLM: the engine failed this request's step (it logged why); other requests were unharmed.
    return APIError(500, "Internal server error: generation failed for this request; it was stopped",
                    type="server_error", code="generation_failed")


def internal(exc: BaseException) -> APIError:
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error",
                    code="internal_error")


def stream_error(exc: BaseException) -> APIError:
    """The error event that ends a stream interrupted by `exc`."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return engine_dead(exc)
    if isinstance(exc, RequestCancelledError):
        return shutting_down(str(exc))
    logger.error("stream failed", exc_info=exc)
    return internal(exc)


def prompt_error(exc: PromptError) -> APIError:
    """The 400 for a prompt the engine refuses (same message as LLMEngine.add_request's)."""
    return APIError(400, str(exc), param=exc.param, code=exc.code)


def engine_error(exc: BaseException, retry_after_s: int) -> APIError | BaseException:
    """The APIError for what AsyncEngine.add_request raised (other exceptions pass through)."""
    if isinstance(exc, QueueFullError):
        return APIError(503, f"server overloaded: {exc}; retry later", type="server_overloaded",
                        code="server_overloaded", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineDeadError):
        return engine_dead(exc)
    if isinstance(exc, RequestCancelledError):
        return shutting_down(str(exc))
    if isinstance(exc, PromptError):
        return prompt_error(exc)
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    return exc


def install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Every error the app can raise answers in OpenAI's JSON shape."""

    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.record_rejected(exc.status)
        return exc.response()

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.record_rejected(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.record_rejected(400)
        return APIError(400, str(exc.errors()), code="invalid_value").response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        metrics.record_rejected(500)
        return internal(exc).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
