"""Streaming plumbing shared by completions and chat: the SSE response that always aborts its requests,
merging several request streams, waiting with an eye on the client, and per-choice diffing of the
engine's cumulative outputs."""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from nanoflow.entrypoints.async_engine import RequestStream
from nanoflow.outputs import CompletionOutput, RequestOutput

SSE_DONE = "data: [DONE]\n\n"
_T = TypeVar("_T")
_END = object()


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


class SSEResponse(StreamingResponse):
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


async def _next_or_end(stream: RequestStream) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


async def merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T | None:
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


async def collect(streams: list[RequestStream]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merge(streams):
        finals[i] = out
    return [f for f in finals if f is not None]


def abort_all(streams: Sequence[RequestStream]) -> None:
    for s in streams:
        s.abort()


@dataclasses.dataclass
class ChoiceState:
    """Streaming progress of one choice."""
    tokens_sent: int = 0
    text_sent: int = 0
    finished: bool = False
    started: bool = False
    """Its first chunk went out (echo sends the prompt there)."""


def advance(st: ChoiceState, c: CompletionOutput) -> tuple[str, int] | None:
    """(new text, index of the first new token) of c since the last chunk, or None when nothing to send.
    The engine's outputs are cumulative and list only tokens it has read, so each token (and its
    logprob entry) is sent exactly once however many land in one output."""
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
