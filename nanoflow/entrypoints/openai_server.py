"""The OpenAI-compatible HTTP server: `build_app` (routes, middlewares, OpenAPI schemas),
`ServerThread` (run an app in the background), and `nanoflow serve` (`add_cli_args`, `run_from_args`).

All engine work goes through one AsyncEngine (one engine thread shared by every request); handlers
(serving_completion, serving_chat) validate, tokenize on a thread pool, and format. Every error reaches
the client as `{"error": {"message", "type", "param", "code"}}` (errors.py), every way a request can end
early (client gone, error, shutdown) aborts it in the engine so no KV block leaks, and lifecycle.py
drains on SIGTERM and exits when the engine dies.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from nanoflow.config import EngineConfig
from nanoflow.entrypoints import protocol as p
from nanoflow.entrypoints.async_engine import AsyncEngine
from nanoflow.entrypoints.errors import APIError, install_error_handlers
from nanoflow.entrypoints.lifecycle import ServerLifecycle, UvicornServer
from nanoflow.entrypoints.metrics import ServerMetrics
from nanoflow.entrypoints.middleware import AdmissionGate, APIKeyMiddleware, BodyLimitMiddleware
from nanoflow.entrypoints.serving_chat import ChatServing
from nanoflow.entrypoints.serving_completion import CompletionServing
from nanoflow.entrypoints.server_config import LOG_LEVELS, ServerConfig

logger = logging.getLogger(__name__)
# uvicorn's own graceful stop, after ours has drained: only connections to close remain.
_UVICORN_GRACEFUL_S = 5


def _json_body(model: type[BaseModel]) -> dict:
    """OpenAPI `requestBody` of a handler that parses its body itself (to bound and offload it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _install_openapi(app: FastAPI, request_models: list[type[BaseModel]]) -> None:
    """/openapi.json documents the request bodies (with their $defs) beside FastAPI's own schemas."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in request_models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi  # type: ignore[method-assign]


class _Serving(CompletionServing, ChatServing):
    """Both endpoints over one tokenizer pool and one token-text cache."""


class _Routes:
    """The small endpoints (health, models, metrics)."""

    def __init__(self, serving: _Serving, lifecycle: ServerLifecycle, metrics: ServerMetrics):
        self._serving, self._lifecycle, self._metrics = serving, lifecycle, metrics

    def _card(self) -> p.ModelCard:
        s = self._serving
        return p.ModelCard(id=s.model_name, root=s.model_name, max_model_len=s.max_model_len, vocab_size=s.vocab_size)

    async def health(self) -> JSONResponse:
        return self._lifecycle.health()

    async def list_models(self) -> JSONResponse:
        return JSONResponse(p.ModelList(data=[self._card()]).model_dump())

    async def get_model(self, model_id: str) -> JSONResponse:
        if model_id != self._serving.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return JSONResponse(self._card().model_dump())

    async def prometheus(self) -> Response:
        return Response(self._metrics.render(), media_type=CONTENT_TYPE_LATEST)


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None, *,
              retry_after_s: int | None = None, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `async_engine` (already started) under the name `served_model_name`.
    Its metrics live in their own registry (app.state.metrics), its lifecycle in app.state.lifecycle."""
    config = config or ServerConfig()
    changes = {k: v for k, v in (("api_key", api_key), ("retry_after", retry_after_s)) if v is not None}
    config = dataclasses.replace(config, **changes)
    metrics = ServerMetrics(served_model_name, async_engine.stats)
    async_engine.add_observer(metrics)
    lifecycle = ServerLifecycle(async_engine, config)
    pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="nanoflow-tokenize")
    serving = _Serving(async_engine, served_model_name, metrics, config, lifecycle, pool)
    routes = _Routes(serving, lifecycle, metrics)
    app = FastAPI(title="nanoflow", summary="OpenAI-compatible LLM server")
    app.state.metrics, app.state.lifecycle, app.state.config = metrics, lifecycle, config
    app.state.serving = serving

    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/metrics", routes.prometheus, methods=["GET"])
    app.add_api_route("/v1/models", routes.list_models, methods=["GET"], response_model=p.ModelList)
    app.add_api_route("/v1/models/{model_id:path}", routes.get_model, methods=["GET"], response_model=p.ModelCard)
    app.add_api_route("/v1/completions", serving.create_completion, methods=["POST"],
                      openapi_extra=_json_body(p.CompletionRequest), response_model=p.CompletionResponse)
    app.add_api_route("/v1/chat/completions", serving.create_chat_completion, methods=["POST"],
                      openapi_extra=_json_body(p.ChatCompletionRequest), response_model=p.ChatCompletionResponse)
    _install_openapi(app, [p.CompletionRequest, p.ChatCompletionRequest])
    install_error_handlers(app, metrics)
    # The last added runs first: the key, then admission, then the body bound.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes, metrics=metrics)
    app.add_middleware(AdmissionGate, lifecycle=lifecycle, metrics=metrics)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key, metrics=metrics)
    return app


def _uvicorn_config(app: FastAPI, log_level: str, **kwargs) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, lifespan="off",
                          timeout_graceful_shutdown=_UVICORN_GRACEFUL_S, **kwargs)


class ServerThread:
    """Runs an app with uvicorn on a background thread (tests, notebooks). The socket is bound before
    the thread starts, so port=0 picks a free port without a race."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family)
        self.host, self.port = self._sock.getsockname()[:2]
        self.lifecycle: ServerLifecycle = app.state.lifecycle
        self._server = UvicornServer(_uvicorn_config(app, log_level), self.lifecycle)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="nanoflow-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def exit_code(self) -> int:
        return self.lifecycle.exit_code

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def begin_shutdown(self) -> None:
        """What SIGTERM does to `nanoflow serve`: refuse new work, drain, end the rest, stop."""
        self._server.begin_shutdown()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the server to stop by itself; True when it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

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
    """Adds the `nanoflow serve` options (one flag per ServerConfig and EngineConfig field)."""
    from nanoflow.engine_args import add_engine_args, field_docs
    docs = field_docs(ServerConfig)
    hints = typing.get_type_hints(ServerConfig)
    group = parser.add_argument_group("server")
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        base = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        help_text = f"{docs.get(f.name, '')} (default: {f.default})"
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(flag, type=base, default=f.default, help=help_text,
                               choices=LOG_LEVELS if f.name == "log_level" else None)
    add_engine_args(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Loads the model, starts the engine thread and serves until a signal (0) or the engine's death
    (1); 2 on bad options."""
    from nanoflow.engine.engine import LLMEngine
    from nanoflow.engine_args import engine_config_from_args
    server_config = ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})
    logging.basicConfig(level=server_config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config: EngineConfig = engine_config_from_args(args)  # ValueError -> the CLI prints it, exit 2
    engine = LLMEngine(config)
    async_engine = AsyncEngine(engine).start()
    name = server_config.served_model_name or config.model
    app = build_app(async_engine, name, config=server_config)
    server = UvicornServer(_uvicorn_config(app, server_config.log_level, host=server_config.host,
                                           port=server_config.port), app.state.lifecycle)
    logger.info("serving %s on http://%s:%d", name, server_config.host, server_config.port)
    try:
        server.run()
    finally:
        async_engine.shutdown()
    return app.state.lifecycle.exit_code
