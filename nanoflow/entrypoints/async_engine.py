"""AsyncEngine: one LLMEngine stepped by one background thread, fed by asyncio callers.

LLMEngine is not thread-safe, so every engine call (add / abort / step) happens on the engine thread;
callers post typed commands (AddRequest, AbortRequest, CallInEngine) to it through a lock-protected
list and it sleeps on a condition when it has no work. After each step it hands the outputs to the event loop with a single `call_soon_threadsafe`, and
the loop routes them to per-request mailboxes: the thread never waits on HTTP, and HTTP never waits on a
step. Per-request timing (TTFT, inter-token, end-to-end) is measured on the loop side with the time the
step ended and reported to observers once per step (a StepRecord).

Requests are submitted and read on one event loop (the one of the first add_request).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter as _Tally
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, get_args

from nanoflow.engine.engine import EngineStats, LLMEngine
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
# When the engine has unfinished requests but its step scheduled nothing (it cannot admit anyone
# yet), wait this long before trying again instead of spinning.
_STALL_WAIT_S = 0.002


class EngineDeadError(RuntimeError):
    """The engine loop thread is not running (stopped, or a step raised)."""


class RequestCancelledError(RuntimeError):
    """The server ended the request before it finished (it is shutting down)."""


# ---- commands the event loop posts to the engine thread (one class each, dispatched by _apply)
@dataclass(frozen=True)
class AddRequest:
    """Add a request to the engine; the outcome is posted back to the loop's `accepted` future."""
    request_id: str
    prompt: str | list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    """Abort a request (frees its KV blocks); an unknown id is ignored."""
    request_id: str


@dataclass(frozen=True)
class CallInEngine:
    """Run fn(engine) between steps and deliver its result (or exception) to `future`."""
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future


EngineCommand = AddRequest | AbortRequest | CallInEngine
COMMAND_TYPES: tuple[type, ...] = get_args(EngineCommand)
"""Every command class the engine thread handles (a test checks each is dispatched)."""


@dataclass
class StepRecord:
    """What changed in one step, for metrics."""
    step_time_s: float | None
    """Wall time of the engine.step() call; None when it scheduled no new batch."""
    ttft_s: list[float] = field(default_factory=list)
    """Time to first token of each request that got its first token."""
    itl_s: list[float] = field(default_factory=list)
    """Time since the previous output of each request that advanced (one per request per step)."""
    e2e_s: list[float] = field(default_factory=list)
    """Arrival-to-finish time of each request that finished (aborts excluded)."""
    prompt_tokens: int = 0
    """Prompt tokens of the requests that got their first token (prefill completed)."""
    generation_tokens: int = 0
    """Tokens generated in this step, over all requests and sequences."""
    finished: dict[str, int] = field(default_factory=dict)
    """Finished sequences by finish reason ('stop', 'length', 'abort')."""


class EngineObserver(Protocol):
    def record(self, rec: StepRecord) -> None: ...


def _unknown_command(command: object) -> str:
    return (f"unknown engine command {command!r}; expected one of "
            f"{', '.join(t.__name__ for t in COMMAND_TYPES)}")


class _Mailbox:
    """The newest undelivered output of a request. Outputs are cumulative (text, token ids, logprobs),
    so a newer one replaces an unread one: a slow reader costs one output of memory, not one per step."""

    __slots__ = ("_item", "_ready")

    def __init__(self) -> None:
        self._item: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        if not isinstance(self._item, BaseException):  # an error is never overwritten
            self._item = item
            self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        item, self._item = self._item, None
        self._ready.clear()
        return item  # type: ignore[return-value]


@dataclass
class _Tracked:
    """Loop-side state of one request."""
    mailbox: _Mailbox
    accepted: asyncio.Future
    arrival: float
    num_seqs: int
    first_token_time: float | None = None
    last_token_time: float = 0.0
    num_tokens: int = 0


class RequestStream:
    """The outputs of one accepted request. Iterating yields RequestOutputs until `finished`; outputs
    that arrive faster than the consumer reads are coalesced into the latest one (texts, token ids and
    logprobs are cumulative, so nothing is lost)."""

    def __init__(self, request_id: str, mailbox: _Mailbox, engine: "AsyncEngine"):
        self.request_id = request_id
        self._mailbox = mailbox
        self._engine = engine
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._mailbox.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stops the request (frees its KV blocks) unless it already finished; safe to call twice."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: list[EngineCommand] = []
        self._stopping = False
        self._dead = False
        self._error: BaseException | None = None
        self._stats: EngineStats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="nanoflow-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracked: dict[str, _Tracked] = {}  # touched only on the event loop
        self._observers: tuple[EngineObserver, ...] = ()
        # Liveness, written by the engine thread and read by /health (plain attribute reads).
        self._has_work = False
        self._progress_at = time.monotonic()

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stops the loop thread (running requests end with EngineDeadError) and waits for it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._dead

    def seconds_without_progress(self) -> float:
        """How long the engine has had work without finishing a step (0 while idle)."""
        if not self._has_work:
            return 0.0
        return max(0.0, time.monotonic() - self._progress_at)

    @property
    def error(self) -> BaseException | None:
        """The exception that killed the loop thread, if one did."""
        return self._error

    def stats(self) -> EngineStats:
        """The engine's stats as of the end of its latest step or command batch (thread-safe)."""
        return self._stats

    # ---- fixed facts of the engine (set at load time, so any thread may read them) ----------------
    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer (a transformers tokenizer)."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output, in tokens."""
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        """Prompt token ids must lie in [0, vocab_size)."""
        return self.engine.model_config.vocab_size

    @property
    def max_seqs_per_request(self) -> int:
        """The most sequences (prompts x n) one request may ask for."""
        return self.engine.config.max_seqs_per_request

    def validate_prompt(self, ids: list[int], max_tokens: int | None = None, param: str = "prompt") -> None:
        """LLMEngine.validate_prompt (raises PromptError): the checks add_request makes, run early."""
        self.engine.validate_prompt(ids, max_tokens, param)

    def add_observer(self, observer: EngineObserver) -> None:
        """observer.record(StepRecord) is called on the event loop once per step."""
        self._observers = (*self._observers, observer)

    # ---- requests (event loop side) -------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int],
                          params: SamplingParams) -> RequestStream:
        """Submits a request and waits until the engine took it. Raises what LLMEngine.add_request
        raises (ValueError, QueueFullError), or EngineDeadError."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("AsyncEngine is bound to another event loop")
        if self._dead or self._stopping:
            raise EngineDeadError(self._dead_message())
        if request_id in self._tracked:
            raise ValueError(f"request_id {request_id!r} is already in use")
        state = _Tracked(_Mailbox(), loop.create_future(), time.perf_counter(), params.n)
        if not self._submit(AddRequest(request_id, prompt, params)):
            raise EngineDeadError(self._dead_message())
        self._tracked[request_id] = state
        try:
            await state.accepted
        except asyncio.CancelledError:
            # The add may still happen on the thread: the abort queued after it undoes it.
            self.abort(request_id)
            raise
        except BaseException:
            self._tracked.pop(request_id, None)
            raise
        return RequestStream(request_id, state.mailbox, self)

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs until it finishes; leaving early aborts it."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Aborts a request on the engine thread (frees its KV blocks); unknown ids are ignored.
        Call on the event loop."""
        state = self._tracked.pop(request_id, None)
        if state is None:
            return
        accepted = state.accepted
        if accepted.done() and not accepted.cancelled() and accepted.exception() is None:
            rec = StepRecord(step_time_s=None, finished={"abort": state.num_seqs})
            self._notify(rec)
        self._submit(AbortRequest(request_id))

    def cancel_all(self, error: BaseException) -> int:
        """Ends every tracked request with `error` (their streams raise it) and aborts them in the
        engine. Call on the event loop; returns how many there were."""
        states = list(self._tracked.items())
        for request_id, state in states:
            if not state.accepted.done():
                state.accepted.set_exception(error)
            else:
                state.mailbox.put(error)
            self.abort(request_id)
        return len(states)

    def call_in_engine_thread(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        """Runs fn(engine) on the engine thread between steps (for checks and admin tasks)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self._submit(CallInEngine(fn, fut)):
            fut.set_exception(EngineDeadError(self._dead_message()))
        return fut

    def _submit(self, command: EngineCommand) -> bool:
        """Queues a command for the engine thread; False once the thread has stopped taking them."""
        if not isinstance(command, COMMAND_TYPES):
            raise TypeError(_unknown_command(command))
        with self._cond:
            if self._dead or self._stopping:
                return False
            self._commands.append(command)
            self._cond.notify()
            return True

    def _dead_message(self) -> str:
        if self._error is not None:
            return f"engine loop died: {type(self._error).__name__}: {self._error}"
        return "engine is not running"

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop_body()
        except BaseException as exc:  # noqa: BLE001 - any failure ends the loop; report it to callers
            logger.exception("engine loop died")
            self._error = exc
        finally:
            with self._cond:  # under the lock: no command can slip in after the drain
                self._dead = True
                commands, self._commands = self._commands, []
            self._fail_calls(commands)
            self._post(self._fail_all)  # adds still waiting fail there, with every running request

    def _loop_body(self) -> None:
        engine = self.engine
        while True:
            busy = engine.has_unfinished_requests()
            with self._cond:
                if not self._commands and not self._stopping and not busy:
                    self._has_work = False
                    while not self._commands and not self._stopping:
                        self._cond.wait()
                    self._progress_at = time.monotonic()  # the stall clock starts with the work
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            self._has_work = True
            if commands:
                self._apply(commands)
                self._stats = engine.stats()
            if not engine.has_unfinished_requests():
                continue
            steps_before = self._stats.num_steps
            start = time.perf_counter()
            outputs = engine.step()
            end = time.perf_counter()
            self._stats = stats = engine.stats()
            # Wall time of the whole call: with async scheduling it also waits for the previous
            # batch, so it is the real time per iteration, not just the launch.
            ran = stats.num_steps != steps_before
            if ran or outputs:
                self._progress_at = time.monotonic()
                self._post(self._on_step, outputs, end - start if ran else None, end)
            if not ran and not outputs:
                with self._cond:
                    if not self._commands and not self._stopping:
                        self._cond.wait(_STALL_WAIT_S)

    def _apply(self, commands: list[EngineCommand]) -> None:
        accepted: list[tuple[str, BaseException | None]] = []
        for command in commands:
            if isinstance(command, AddRequest):
                accepted.append((command.request_id, self._add(command)))
            elif isinstance(command, AbortRequest):
                self.engine.abort_request(command.request_id)
            elif isinstance(command, CallInEngine):
                self._call(command)
            else:
                raise TypeError(_unknown_command(command))
        if accepted:  # one wake-up of the event loop for a whole burst of arrivals
            self._post(self._resolve_adds, accepted)

    def _add(self, command: AddRequest) -> BaseException | None:
        """Adds the request; returns what it raised (for the caller), None when it was taken."""
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params)
        except Exception as exc:  # noqa: BLE001 - ValueError / QueueFullError go to the caller
            return exc
        return None

    def _call(self, command: CallInEngine) -> None:
        fut = command.future
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(command.fn(self.engine))
            except Exception as exc:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(exc)

    def _fail_calls(self, commands: list[EngineCommand]) -> None:
        dead = EngineDeadError(self._dead_message())
        for command in commands:
            if isinstance(command, CallInEngine) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(dead)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to tell

    # ---- event-loop callbacks -------------------------------------------------------------------
    def _resolve_adds(self, results: list[tuple[str, BaseException | None]]) -> None:
        for request_id, exc in results:
            state = self._tracked.get(request_id)
            if state is None or state.accepted.done():
                continue
            if exc is None:
                state.accepted.set_result(None)
            else:
                state.accepted.set_exception(exc)

    def _on_step(self, outputs: list[RequestOutput], step_time_s: float | None, end: float) -> None:
        rec = StepRecord(step_time_s=step_time_s)
        finished: _Tally[str] = _Tally()
        for out in outputs:
            state = self._tracked.get(out.request_id)
            if state is None:
                continue  # aborted while this step ran
            num_tokens = sum(len(c.token_ids) for c in out.outputs)
            if num_tokens > state.num_tokens:
                if state.first_token_time is None:
                    state.first_token_time = end
                    rec.ttft_s.append(end - state.arrival)
                    rec.prompt_tokens += len(out.prompt_token_ids)
                else:
                    rec.itl_s.append(end - state.last_token_time)
                rec.generation_tokens += num_tokens - state.num_tokens
                state.num_tokens = num_tokens
                state.last_token_time = end
            if out.finished:
                del self._tracked[out.request_id]
                rec.e2e_s.append(end - state.arrival)
                finished.update(c.finish_reason or "stop" for c in out.outputs)
            state.mailbox.put(out)
        rec.finished = dict(finished)
        self._notify(rec)

    def _notify(self, rec: StepRecord) -> None:
        for observer in self._observers:
            try:
                observer.record(rec)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.exception("engine observer failed")

    def _fail_all(self) -> None:
        dead = EngineDeadError(self._dead_message())
        for state in self._tracked.values():
            if not state.accepted.done():
                state.accepted.set_exception(dead)
            else:
                state.mailbox.put(dead)
        self._tracked.clear()
