"""Plain ASGI middlewares of the server (they never wrap responses, so streaming and disconnects are
untouched): the API key, the admission gate (503 while shutting down; counts requests in flight for
the drain), and the request-body bound (413)."""
from __future__ import annotations

import hmac

from nanoflow.entrypoints.errors import APIError
from nanoflow.entrypoints.lifecycle import ServerLifecycle
from nanoflow.entrypoints.metrics import ServerMetrics


def _is_api(scope) -> bool:
    return scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS"


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/* (health and metrics stay open, as in vLLM)."""

    def __init__(self, app, api_key: str, metrics: ServerMetrics):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if _is_api(scope):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                self._metrics.record_rejected(401)
                error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AdmissionGate:
    """Refuses work (503, before the body is read) while the server shuts down or its engine is dead,
    and counts the /v1 requests in flight (streams until their last byte) for the drain."""

    def __init__(self, app, lifecycle: ServerLifecycle, metrics: ServerMetrics):
        self.app = app
        self._lifecycle = lifecycle
        self._metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if not (_is_api(scope) and scope["method"] == "POST"):
            await self.app(scope, receive, send)
            return
        error = self._lifecycle.admission_error()
        if error is not None:
            self._metrics.record_rejected(error.status)
            await error.response()(scope, receive, send)
            return
        with self._lifecycle.in_flight():
            await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, or as soon as a chunked body
    grows past it (the handler reading it gets the APIError)."""

    def __init__(self, app, max_bytes: int, metrics: ServerMetrics):
        self.app = app
        self._max = max_bytes
        self._metrics = metrics

    def _error(self, size: str) -> APIError:
        return APIError(413, f"request body of {size} exceeds the server's limit of {self._max} bytes "
                             "(--max-request-bytes)", code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self._max:
            self._metrics.record_rejected(413)
            await self._error(f"{int(length)} bytes").response()(scope, receive, send)
            return
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max:
                    raise self._error(f"more than {self._max} bytes")
            return message
        await self.app(scope, bounded_receive, send)
