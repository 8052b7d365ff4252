"""Clients that go away abort their requests: 64 concurrent streams, half of them closed midway (and a
few non-streaming requests cancelled), and afterwards every KV block is free."""
from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from nanoflow.config import EngineConfig
from nanoflow.engine.engine import LLMEngine
from nanoflow.entrypoints.async_engine import AsyncEngine
from nanoflow.entrypoints.openai_server import ServerThread, build_app
from nanoflow.sampling_params import SamplingParams

NUM_STREAMS = 64
FINISHED_TOKENS = 8
# Long enough that an un-aborted request would keep the engine busy far past the test's deadline.
ABORTED_TOKENS = 1500
NUM_CANCELLED_PLAIN = 4


async def _stream(client: httpx.AsyncClient, i: int, abort_after: int | None) -> tuple[int, int]:
    """(data chunks read, completion tokens reported) of one streamed completion; closes the connection
    after `abort_after` chunks when given."""
    body = {"prompt": f"stream {i} says", "max_tokens": ABORTED_TOKENS if abort_after else FINISHED_TOKENS,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks, usage = 0, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if '"usage":{' in line:
                usage = int(re.search(r'"completion_tokens":(\d+)', line).group(1))
                continue
            chunks += 1
            if abort_after is not None and chunks >= abort_after:
                break  # leaving the block closes the unfinished response's connection
    return chunks, usage


async def _scenario(url: str) -> list[tuple[int, int]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        plain = [asyncio.create_task(client.post("/v1/completions", json={
            "prompt": f"plain {i}", "max_tokens": ABORTED_TOKENS, "ignore_eos": True}))
            for i in range(NUM_CANCELLED_PLAIN)]
        results = await asyncio.gather(*(
            _stream(client, i, abort_after=2 if i % 2 else None) for i in range(NUM_STREAMS)))
        for task in plain:  # still generating: cancelling closes their connections
            assert not task.done()
            task.cancel()
        await asyncio.gather(*plain, return_exceptions=True)
    return results


@pytest.fixture(scope="module")
def engine():
    # Each test wraps it in its own AsyncEngine and stops that before the next test starts.
    return LLMEngine(EngineConfig(model="default", device="cpu", num_kv_blocks=4096))


def _wait_idle_and_count_kv(async_engine: AsyncEngine) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = async_engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"aborted requests still run: {async_engine.stats()}")

    def kv_used(e: LLMEngine) -> int:
        e.check_kv_invariant()
        return e.stats().kv_blocks_used
    return async_engine.call_in_engine_thread(kv_used).result(timeout=30)


def test_disconnects_abort_requests_and_free_every_kv_block(engine):
    async_engine = AsyncEngine(engine).start()
    steps_before = engine.stats().num_steps
    app = build_app(async_engine, "default")
    try:
        with ServerThread(app) as server:
            results = asyncio.run(_scenario(server.url))
            for i, (chunks, usage) in enumerate(results):
                if i % 2:
                    assert chunks == 2
                else:
                    assert usage == FINISHED_TOKENS and chunks >= 1
            assert _wait_idle_and_count_kv(async_engine) == 0
            metrics = httpx.get(server.url + "/metrics").text
            aborted = re.search(r'nanoflow:request_success_total\{finished_reason="abort".*\} (\S+)', metrics)
            assert aborted and float(aborted.group(1)) == NUM_STREAMS // 2 + NUM_CANCELLED_PLAIN
            assert engine.stats().num_steps - steps_before < ABORTED_TOKENS  # nobody ran to its full length
    finally:
        async_engine.shutdown()


def test_generate_left_early_is_aborted(engine):
    async_engine = AsyncEngine(engine).start()
    steps_before = engine.stats().num_steps
    try:
        async def main():
            lengths = []
            gen = async_engine.generate("early", "hello there", SamplingParams(max_tokens=ABORTED_TOKENS,
                                                                             ignore_eos=True))
            async for out in gen:
                lengths.append(len(out.outputs[0].token_ids))
                if len(lengths) == 3:
                    break
            await gen.aclose()
            full = [o async for o in async_engine.generate("full", [5, 6, 7], SamplingParams(max_tokens=4,
                                                                                          ignore_eos=True))]
            with pytest.raises(ValueError, match="vocabulary"):
                await async_engine.add_request("bad", [10**9], SamplingParams())
            return lengths, full
        lengths, full = asyncio.run(main())
        assert lengths == sorted(lengths) and lengths[0] >= 1
        assert full[-1].finished and not any(o.finished for o in full[:-1])
        assert len(full[-1].outputs[0].token_ids) == 4 and full[-1].outputs[0].finish_reason == "length"
        assert _wait_idle_and_count_kv(async_engine) == 0
        assert engine.stats().num_steps - steps_before < ABORTED_TOKENS  # "early" stopped when left
    finally:
        async_engine.shutdown()
