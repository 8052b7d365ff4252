"""The server's life: health, graceful shutdown, and exiting when the engine dies.

- /health is 200 with a JSON body while the engine serves; 503 (OpenAI error shape) when its loop is
  dead, when it has had work without finishing a step for `engine_stall_timeout` seconds (wedged), or
  while the server shuts down.
- SIGTERM / SIGINT: new work gets 503 at once; running requests get `shutdown_timeout` seconds to
  finish; whatever still runs then ends with an error (streams: an error event, then [DONE];
  others: a JSON 503), and the process exits 0. A second signal stops at once (uvicorn's way).
- The engine loop died (a step broke the engine itself): the in-flight requests were already answered
  with errors; a watchdog then stops the server and the process exits 1, so a supervisor restarts it
  (vLLM's behaviour; `keep_alive_on_engine_death` keeps it up answering 503 instead).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator

import uvicorn
from fastapi.responses import JSONResponse

from nanoflow.entrypoints import errors
from nanoflow.entrypoints.async_engine import AsyncEngine, RequestCancelledError
from nanoflow.entrypoints.errors import APIError
from nanoflow.entrypoints.server_config import ServerConfig

logger = logging.getLogger(__name__)
_WATCHDOG_INTERVAL_S = 0.5
# After the engine died or the drain ended: how long answered requests get to write their last bytes.
_FLUSH_TIMEOUT_S = 5.0


class ServerLifecycle:
    """Admission, health and shutdown state of one app (touched on its event loop only)."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.draining = False
        """Shutting down: new work is refused."""
        self.exit_code = 0
        self._active = 0
        self._request_exit: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Task] = set()

    def bind(self, request_exit: Callable[[], None]) -> None:
        """`request_exit()` stops the HTTP server (uvicorn's should_exit)."""
        self._request_exit = request_exit

    # ---- admission
    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    @property
    def num_in_flight(self) -> int:
        return self._active

    def admission_error(self) -> APIError | None:
        if self.draining:
            return errors.shutting_down()
        if not self.engine.is_alive():
            return errors.engine_dead(RuntimeError(self._dead_message()))
        return None

    def _dead_message(self) -> str:
        error = self.engine.error
        return f"engine loop is not running ({type(error).__name__}: {error})" if error else \
            "engine loop is not running"

    # ---- health
    def health(self) -> JSONResponse:
        if not self.engine.is_alive():
            return errors.engine_dead(RuntimeError(self._dead_message())).response()
        if self.draining:
            return errors.shutting_down().response()
        stalled = self.engine.seconds_without_progress()
        limit = self.config.engine_stall_timeout
        if limit and stalled > limit:
            return APIError(503, f"engine has had work for {stalled:.1f} s without finishing a step "
                                 f"(engine_stall_timeout is {limit:g} s)", type="server_error",
                            code="engine_stalled").response()
        s = self.engine.stats()
        return JSONResponse({"status": "ok", "num_running": s.num_running, "num_waiting": s.num_waiting,
                             "kv_cache_usage": s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0,
                             "requests_in_flight": self._active})

    # ---- shutdown
    def begin_shutdown(self) -> None:
        """Starts the graceful shutdown (call on the event loop; a second call does nothing)."""
        if self.draining:
            return
        self.draining = True
        logger.info("shutting down: refusing new requests, %d in flight get %g s to finish",
                    self._active, self.config.shutdown_timeout)
        self._spawn(self._drain())

    async def _drain(self) -> None:
        await self._wait_idle(self.config.shutdown_timeout)
        if self._active:
            n = self.engine.cancel_all(RequestCancelledError(
                f"the server is shutting down and the request did not finish within "
                f"{self.config.shutdown_timeout:g} s"))
            logger.warning("shutdown: ended %d unfinished requests with an error", n)
            await self._wait_idle(_FLUSH_TIMEOUT_S)
        self._request_exit()

    async def watchdog(self) -> None:
        """Stops the server with exit code 1 once the engine loop is dead (unless kept alive)."""
        while self.engine.is_alive() or self.config.keep_alive_on_engine_death:
            await asyncio.sleep(_WATCHDOG_INTERVAL_S)
        logger.error("%s: stopping the server (exit status 1) so that a supervisor restarts it",
                     self._dead_message())
        self.exit_code = 1
        self.draining = True
        await self._wait_idle(_FLUSH_TIMEOUT_S)  # their errors are on the way already
        self._request_exit()

    def start_watchdog(self) -> None:
        self._spawn(self.watchdog())

    async def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class UvicornServer(uvicorn.Server):
    """uvicorn, with the first SIGTERM / SIGINT starting the lifecycle's graceful shutdown instead of
    uvicorn's (which cuts streams and answers unfinished requests with a text/plain 500)."""

    def __init__(self, config: uvicorn.Config, lifecycle: ServerLifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        lifecycle.bind(self._exit)

    def _exit(self) -> None:
        self.should_exit = True

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        self.lifecycle.start_watchdog()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded for uvicorn to re-raise after serving: the exit status is the lifecycle's.
        self._signals += 1
        if self._signals == 1 and self.loop is not None:
            logger.info("received %s", signal.Signals(sig).name)
            self.loop.call_soon_threadsafe(self.lifecycle.begin_shutdown)
        elif self._signals == 2:
            self.should_exit = True
        else:
            self.force_exit = True

    def begin_shutdown(self) -> None:
        """The graceful shutdown, from any thread (what the first signal does)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.lifecycle.begin_shutdown)
