"""A served engine for the server tests: a real uvicorn server on a free port, the built-in model on CPU,
the official `openai` client and raw httpx."""
from __future__ import annotations

import time

import httpx
import openai

from nanoflow.engine.engine import LLMEngine
from nanoflow.entrypoints.async_engine import AsyncEngine
from nanoflow.entrypoints.openai_server import ServerThread, build_app
from nanoflow.entrypoints.server_config import ServerConfig

MODEL = "default"
API_KEY = "s3cret"
# A small KV cache keeps each engine's memory low; 1024 blocks of 16 tokens is plenty here.
SMALL = dict(model=MODEL, device="cpu", num_kv_blocks=1024)


class Served:
    """An engine served over HTTP, with clients."""

    def __init__(self, llm_engine: LLMEngine, api_key: str | None = None, config: ServerConfig | None = None):
        self.llm_engine = llm_engine
        self.engine = AsyncEngine(llm_engine).start()
        self.app = build_app(self.engine, MODEL, api_key=api_key, config=config)
        self.http = ServerThread(self.app).start()
        self.url = self.http.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0)
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.raw = httpx.Client(base_url=self.url, timeout=120, headers=auth)

    def close(self) -> None:
        self.raw.close()
        self.client.close()
        self.http.stop()
        self.engine.shutdown()

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.engine.stats()
            if s.num_running == 0 and s.num_waiting == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"engine still busy after {timeout} s: {self.engine.stats()}")

    def kv_blocks_used(self) -> int:
        """Checks the KV accounting on the engine thread and returns the blocks in use."""
        def check(engine: LLMEngine) -> int:
            engine.check_kv_invariant()
            return engine.stats().kv_blocks_used
        return self.engine.call_in_engine_thread(check).result(timeout=30)



def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


