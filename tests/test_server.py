"""The OpenAI-compatible server, end to end: a real uvicorn server on a free port, the built-in default
model on CPU, the official `openai` client for the happy paths and raw httpx for the error shapes."""
from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from nanoflow.config import EngineConfig
from nanoflow.engine.engine import LLMEngine
from nanoflow.entrypoints.server_config import ServerConfig
from tests.server_helpers import API_KEY, MODEL, SMALL, Served, _error


@pytest.fixture(scope="module")
def served():
    s = Served(LLMEngine(EngineConfig(**SMALL)), api_key=API_KEY)
    yield s
    s.close()


def _prompt_len(served: Served, text: str) -> int:
    return len(served.llm_engine.tokenizer.encode(text))


def _chat_prompt_len(served: Served, messages: list[dict]) -> int:
    tok = served.llm_engine.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok.encode(text, add_special_tokens=False))


# ---- happy paths (official client) ----------------------------------------------------------------
def test_models_and_health(served):
    assert [m.id for m in served.client.models.list().data] == [MODEL]
    assert served.raw.get("/health").status_code == 200


def test_completion_usage_is_exact(served):
    prompt = "The quick brown fox"
    r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    assert r.usage.prompt_tokens == _prompt_len(served, prompt)
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_completion_accepts_token_ids(served):
    r = served.client.completions.create(model=MODEL, prompt=[11, 12, 13, 14], max_tokens=3,
                                         extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3


def test_chat_completion(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = served.client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5,
                                              temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == _chat_prompt_len(served, messages)
    assert r.usage.completion_tokens == 5


def test_streaming_completion_matches_non_streaming(served):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True})
    full = served.client.completions.create(**kwargs)
    chunks = list(served.client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert usage.prompt_tokens == _prompt_len(served, "Once upon a time")
    assert usage.completion_tokens == 8 and usage.total_tokens == usage.prompt_tokens + 8


def test_streaming_chat_with_usage(served):
    messages = [{"role": "user", "content": "Count to three"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    full = served.client.chat.completions.create(**kwargs)
    chunks = list(served.client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == _chat_prompt_len(served, messages)
    assert chunks[-1].usage.completion_tokens == 6


def test_n_choices_streaming_and_not(served):
    kwargs = dict(model=MODEL, prompt="Pick a color:", max_tokens=4, n=3, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    r = served.client.completions.create(**kwargs)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 12
    chunks = list(served.client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = {i: "" for i in range(3)}
    for c in chunks[:-1]:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert chunks[-1].usage.completion_tokens == 12
    # Seeded sampling: the same seed gives the same three texts, streamed or not.
    assert texts == {c.index: c.text for c in r.choices}


def test_stop_string_cuts_the_text(served):
    kwargs = dict(model=MODEL, prompt="A list of words:", max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True})
    text = served.client.completions.create(**kwargs).choices[0].text
    assert len(text) > 10
    stop = text[6:9]
    expected = text[:text.find(stop)]
    r = served.client.completions.create(stop=[stop], **kwargs)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(served.client.completions.create(stop=[stop], stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(served):
    r = served.client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=2,
                                         extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    # chosen + top 2 (fewer when the chosen one is among them, or two tokens decode alike)
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    chat = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_sampling_fields_are_accepted(served):
    r = served.client.completions.create(
        model=MODEL, prompt="Tell me", max_tokens=5, temperature=0.8, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, seed=3,
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 5,
                    "stop_token_ids": [1, 3]})
    assert r.usage.completion_tokens == 5


def test_concurrent_requests(served):
    async def main():
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0)
        async with client:
            return await asyncio.gather(*(
                client.completions.create(model=MODEL, prompt=f"Request number {i}", max_tokens=5 + i % 3,
                                          extra_body={"ignore_eos": True}) for i in range(12)))
    results = asyncio.run(main())
    assert [r.usage.completion_tokens for r in results] == [5 + i % 3 for i in range(12)]
    assert len({r.id for r in results}) == 12
    served.wait_idle()
    assert served.kv_blocks_used() == 0


# ---- errors (raw HTTP) ----------------------------------------------------------------------------
def test_invalid_json_is_400(served):
    r = served.raw.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "JSON" in _error(r)["message"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [5, 999_999]}, "prompt"),
])
def test_bad_fields_are_400(served, body, param):
    r = served.raw.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == param


def test_bad_chat_fields_are_400(served):
    r = served.raw.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    r = served.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                     "top_logprobs": 2})
    assert r.status_code == 400 and _error(r)["param"] == "top_logprobs"
    r = served.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                     "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and _error(r)["param"] == "top_logprobs"
    r = served.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert r.status_code == 400 and "text only" in _error(r)["message"]


def test_too_long_prompt_is_400(served):
    max_len = served.llm_engine.max_model_len
    r = served.raw.post("/v1/completions", json={"prompt": [20] * (max_len + 5), "max_tokens": 1})
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded"
    assert str(max_len) in _error(r)["message"]
    r = served.raw.post("/v1/completions", json={"prompt": [20] * 10, "max_tokens": max_len})
    assert r.status_code == 400 and _error(r)["param"] == "max_tokens"


def test_unknown_model_is_404(served):
    r = served.raw.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    assert served.raw.get("/v1/nothing-here").status_code == 404


def test_chat_without_template_is_400(served, monkeypatch):
    monkeypatch.setattr(served.llm_engine.tokenizer, "chat_template", None)
    r = served.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and _error(r)["code"] == "no_chat_template"


def test_metrics_exposes_every_family(served):
    served.client.completions.create(model=MODEL, prompt="metrics", max_tokens=2)
    text = served.raw.get("/metrics").text
    for name in ("nanoflow:request_success_total", "nanoflow:prompt_tokens_total",
                 "nanoflow:generation_tokens_total", "nanoflow:time_to_first_token_seconds_bucket",
                 "nanoflow:inter_token_latency_seconds_bucket", "nanoflow:e2e_request_latency_seconds_bucket",
                 "nanoflow:kv_cache_usage_perc", "nanoflow:num_requests_running",
                 "nanoflow:num_requests_waiting", "nanoflow:step_time_seconds_bucket",
                 "nanoflow:request_rejected_total"):
        assert name in text, name
    assert 'finished_reason="length"' in text


def test_api_key(served):
    # The module's server runs with --api-key; a client without it is refused on /v1/* only.
    with httpx.Client(base_url=served.url, timeout=60) as raw:
        body = {"prompt": "x", "max_tokens": 2}
        missing = raw.post("/v1/completions", json=body)
        assert missing.status_code == 401 and _error(missing)["code"] == "invalid_api_key"
        wrong = raw.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert raw.get("/v1/models").status_code == 401
        # An unauthenticated request is refused before its body is even parsed.
        assert raw.post("/v1/completions", content=b"{", headers={"Authorization": "x"}).status_code == 401
        ok = raw.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 0
        assert raw.get("/health").status_code == 200 and raw.get("/metrics").status_code == 200


# ---- overload and a dead engine -------------------------------------------------------------------
def test_overload_is_503_with_retry_after_then_shutdown_is_503():
    # One running request at a time and one waiting slot: the third concurrent request is refused.
    s = Served(LLMEngine(EngineConfig(**SMALL, max_num_seqs=1, max_waiting_requests=1)),
               config=ServerConfig(keep_alive_on_engine_death=True))
    try:
        with httpx.Client(base_url=s.url, timeout=120) as a, httpx.Client(base_url=s.url, timeout=120) as b:
            long = {"prompt": "running", "max_tokens": 1500, "ignore_eos": True, "stream": True}
            with a.stream("POST", "/v1/completions", json=long) as running:
                assert running.status_code == 200
                # Keep the line iterator referenced: a collected one closes the connection (= abort).
                lines = running.iter_lines()
                next(lines)  # it produced a token, so it runs and holds the only seat
                with b.stream("POST", "/v1/completions", json={**long, "prompt": "waiting"}) as waiting:
                    assert waiting.status_code == 200
                    r = s.raw.post("/v1/completions", json={"prompt": "refused", "max_tokens": 2})
                    assert r.status_code == 503
                    assert int(r.headers["Retry-After"]) >= 1
                    assert _error(r)["code"] == "server_overloaded"
        s.wait_idle()  # closing both streams aborted them
        assert s.kv_blocks_used() == 0
        assert 'status="503"' in s.raw.get("/metrics").text
        # A stopped engine loop: health and requests answer 503.
        s.engine.shutdown()
        assert s.raw.get("/health").status_code == 503
        r = s.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503
    finally:
        s.close()


def test_engine_loop_death_ends_streams_and_turns_health_503(monkeypatch):
    # Kept alive after the death (as vLLM's VLLM_KEEP_ALIVE_ON_ENGINE_DEATH) to look at its answers;
    # by default the server exits (test_server_hardening).
    s = Served(LLMEngine(EngineConfig(**SMALL)), config=ServerConfig(keep_alive_on_engine_death=True))
    try:
        assert s.raw.get("/health").status_code == 200
        real_step = s.llm_engine.step
        calls = {"n": 0}

        def step_then_fail():  # the test-only way to kill the loop thread: a step that raises
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("simulated device failure")
            return real_step()
        monkeypatch.setattr(s.llm_engine, "step", step_then_fail)
        body = {"prompt": "x", "max_tokens": 50, "ignore_eos": True, "stream": True}
        with s.raw.stream("POST", "/v1/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][5:])["error"]["code"] == "engine_dead"
        health = s.raw.get("/health")
        assert health.status_code == 503 and "simulated device failure" in _error(health)["message"]
        assert not s.engine.is_alive()
        r = s.raw.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and _error(r)["code"] == "engine_dead"
    finally:
        s.close()


# ---- `nanoflow serve` -----------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_nanoflow_serve_command_and_graceful_shutdown(tmp_path, sig):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "nanoflow.entrypoints.cli", "serve", "--port", "0", "--num-kv-blocks", "256",
           "--api-key", "k", "--served-model-name", "tiny", "--device", "cpu", "--log-level", "info",
           "--shutdown-timeout", "0.5"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url, deadline, seen = None, time.monotonic() + 120, []
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            match = re.search(r"Uvicorn running on (http://\S+)", seen[-1])
            url = match.group(1) if match else None
        assert url, "server did not start:\n" + "".join(seen)
        auth = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        r = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # A stream still running when the signal comes: after the drain it ends with an error and [DONE].
        body = {"prompt": "long", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", headers=auth, json=body, timeout=60) as stream:
            events = stream.iter_lines()
            assert next(events).startswith("data: {")
            proc.send_signal(sig)
            rest = [line for line in events if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "server_shutting_down"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_nanoflow_serve_rejects_bad_engine_flags(capsys):
    from nanoflow.entrypoints.cli import main
    assert main(["serve", "--block-size", "3"]) == 2
    assert "block_size" in capsys.readouterr().err
