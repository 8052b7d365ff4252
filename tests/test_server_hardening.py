"""Issue 10, through HTTP: no request may kill, wedge or starve the engine. Each defect the issue lists
has a test here (the built-in model on CPU, async scheduling on, as served by default)."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from nanoflow.config import EngineConfig
from nanoflow.engine.engine import LLMEngine
from nanoflow.entrypoints.server_config import ServerConfig
from tests.server_helpers import MODEL, SMALL, Served, _error

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def served():
    engine = LLMEngine(EngineConfig(**SMALL, max_seqs_per_request=16))
    assert engine.config.async_scheduling
    s = Served(engine, config=ServerConfig(max_request_bytes=1 << 20, max_prompt_chars=20_000))
    yield s
    s.close()


def _sse(lines) -> list:
    """The events of an SSE body: dicts, and the final "[DONE]"."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _stream(s: Served, path: str, body: dict) -> list:
    with s.raw.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return _sse(r.iter_lines())


def _idle_and_no_kv(s: Served) -> None:
    s.wait_idle()
    assert s.kv_blocks_used() == 0


# ---- one request killed the engine: logprobs without top-k -------------------------------------
def test_logprobs_without_top_k_answer_and_the_engine_lives(served):
    chat = served.raw.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "max_tokens": 4, "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    content = chat.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(c["top_logprobs"] == [] and c["logprob"] <= 0 for c in content)
    comp = served.raw.post("/v1/completions", json={"prompt": "Hi", "logprobs": 0, "max_tokens": 3,
                                                    "ignore_eos": True})
    assert comp.status_code == 200, comp.text
    lp = comp.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(len(top) == 1 for top in lp["top_logprobs"])
    assert served.raw.get("/health").status_code == 200
    after = served.raw.post("/v1/completions", json={"prompt": "again", "max_tokens": 2})
    assert after.status_code == 200


# ---- n had no bound ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    {"prompt": "x", "n": 10**30},
    {"prompt": "x", "n": 20000},
    {"prompt": "x", "n": 17},
    {"prompt": ["a", "b", "c", "d", "e"], "n": 4},
    {"prompt": ["x"] * 17},
])
def test_n_and_prompts_x_n_are_bounded(served, body):
    start = time.monotonic()
    r = served.raw.post("/v1/completions", json={**body, "max_tokens": 2})
    assert r.status_code == 400 and _error(r)["param"] == "n", r.text
    assert "at most 16" in _error(r)["message"]
    assert time.monotonic() - start < 5
    chat = served.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 10**6})
    assert chat.status_code == 400 and _error(chat)["param"] == "n"


def test_the_bound_itself_is_served(served):
    r = served.raw.post("/v1/completions", json={"prompt": ["a", "b"], "n": 8, "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and len(r.json()["choices"]) == 16
    _idle_and_no_kv(served)


# ---- streaming logprobs lost ~94% of the tokens with async scheduling ---------------------------------
def test_streamed_logprobs_cover_every_token(served):
    body = {"prompt": PROMPT, "max_tokens": 32, "logprobs": 1, "temperature": 0, "ignore_eos": True}
    full = served.raw.post("/v1/completions", json=body).json()["choices"][0]
    events = _stream(served, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    tokens, offsets, texts = [], [], []
    for e in events[:-1]:
        lp = e["choices"][0]["logprobs"]
        tokens += lp["tokens"]
        offsets += lp["text_offset"]
        texts.append(e["choices"][0]["text"])
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert len(tokens) == 32 and tokens == full["logprobs"]["tokens"]
    assert offsets == full["logprobs"]["text_offset"]
    assert "".join(texts) == full["text"]
    chat_body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "logprobs": True,
                 "top_logprobs": 2, "temperature": 0, "ignore_eos": True}
    chat = _stream(served, "/v1/chat/completions", chat_body)
    content = [c for e in chat[:-1] if e["choices"] and e["choices"][0].get("logprobs")
               for c in e["choices"][0]["logprobs"]["content"]]
    assert len(content) == 24 and all(len(c["top_logprobs"]) == 2 for c in content)


# ---- tokenizing on the event loop; no body limit ------------------------------------------------------
def test_body_over_the_limit_is_413_json(served):
    big = {"prompt": "x" * (2 << 20), "max_tokens": 1}
    r = served.raw.post("/v1/completions", json=big)
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the bound holds while the body arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'
    r = served.raw.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert served.raw.get("/health").status_code == 200


def test_prompt_characters_are_bounded_before_tokenizing(served, monkeypatch):
    calls = []
    real_encode = served.app.state.serving.encode
    monkeypatch.setattr(served.app.state.serving, "encode", lambda texts, **kw: calls.append(1) or real_encode(texts, **kw))
    r = served.raw.post("/v1/completions", json={"prompt": "z" * 20_001, "max_tokens": 1})
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded" and "20000" in _error(r)["message"]
    r = served.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "z" * 20_001}]})
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    assert calls == []  # refused before any tokenizer work


def test_tokenizing_never_blocks_the_event_loop(served, monkeypatch):
    serving = served.app.state.serving
    real_encode = serving.encode
    started, release = threading.Event(), threading.Event()

    def slow_encode(texts, **kw):
        started.set()
        release.wait(30)
        return real_encode(texts, **kw)
    monkeypatch.setattr(serving, "encode", slow_encode)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", served.raw.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})))
    worker.start()
    try:
        assert started.wait(30)
        t0 = time.monotonic()
        assert served.raw.get("/health").status_code == 200  # served while the tokenizer works
        other = served.raw.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
        assert other.status_code == 200 and time.monotonic() - t0 < 10
    finally:
        release.set()
        worker.join(60)
    assert result["r"].status_code == 200


# ---- /health: JSON, and 503 while the engine is wedged ------------------------------------------------
def test_health_is_json_and_503_when_the_engine_stalls():
    s = Served(LLMEngine(EngineConfig(**SMALL)), config=ServerConfig(engine_stall_timeout=0.3))
    try:
        ok = s.raw.get("/health")
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        real_step, gate = s.llm_engine.step, threading.Event()

        def wedged_step():
            gate.wait(30)
            return real_step()
        s.llm_engine.step = wedged_step
        worker = threading.Thread(target=lambda: s.raw.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
        worker.start()
        deadline = time.monotonic() + 10
        while (h := s.raw.get("/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h.status_code == 503 and _error(h)["code"] == "engine_stalled"
        gate.set()
        worker.join(60)
        assert s.raw.get("/health").status_code == 200
    finally:
        s.close()


# ---- shutdown: drain, then error events and [DONE]; JSON only -----------------------------------------
def test_graceful_shutdown_drains_then_ends_every_request_with_an_error():
    s = Served(LLMEngine(EngineConfig(**SMALL)), config=ServerConfig(shutdown_timeout=1.0))
    try:
        long_body = {"prompt": "long", "max_tokens": 1500, "ignore_eos": True}
        results: dict[str, object] = {}

        def stream_long():
            with httpx.Client(base_url=s.url, timeout=60) as c, \
                    c.stream("POST", "/v1/completions", json={**long_body, "stream": True}) as r:
                results["stream"] = _sse(r.iter_lines())

        def plain_long():
            with httpx.Client(base_url=s.url, timeout=60) as c:
                results["plain"] = c.post("/v1/completions", json=long_body)
        workers = [threading.Thread(target=f) for f in (stream_long, plain_long)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while s.engine.stats().num_running < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        short = threading.Thread(target=lambda: results.setdefault("short", s.raw.post(
            "/v1/completions", json={"prompt": "short", "max_tokens": 3, "ignore_eos": True})))
        short.start()
        while s.engine.stats().num_running < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        s.http.begin_shutdown()
        time.sleep(0.2)
        refused = s.raw.post("/v1/completions", json={"prompt": "new", "max_tokens": 2})
        assert refused.status_code == 503 and _error(refused)["code"] == "server_shutting_down"
        assert s.raw.get("/health").status_code == 503
        for w in (*workers, short):
            w.join(60)
        assert results["short"].status_code == 200  # finished within the drain
        events = results["stream"]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
        plain = results["plain"]
        assert plain.status_code == 503 and plain.headers["content-type"] == "application/json"
        assert _error(plain)["code"] == "server_shutting_down"
        assert s.http.wait(10) and s.http.exit_code == 0
        s.wait_idle()
        assert s.kv_blocks_used() == 0
    finally:
        s.close()


# ---- a dead engine makes the process exit non-zero ---------------------------------------------------
def test_engine_death_answers_in_flight_requests_then_stops_with_status_1(monkeypatch):
    s = Served(LLMEngine(EngineConfig(**SMALL)))
    try:
        real_step, calls = s.llm_engine.step, {"n": 0}

        def step_then_die():
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("simulated loss of the device")
            return real_step()
        monkeypatch.setattr(s.llm_engine, "step", step_then_die)
        events = _stream(s, "/v1/completions", {"prompt": "x", "max_tokens": 50, "ignore_eos": True})
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_dead"
        assert s.http.wait(15), "the server kept running with a dead engine"
        assert s.http.exit_code == 1
    finally:
        s.close()


# ---- a failing step fails only its requests ----------------------------------------------------------
def test_a_failing_step_fails_its_requests_with_errors_and_the_engine_goes_on(served, monkeypatch):
    runner = served.llm_engine.runner
    real_forward, calls = runner.forward, {"n": 0}

    def fail_third(batch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return real_forward(batch, *args, **kwargs)
    monkeypatch.setattr(runner, "forward", fail_third)
    events = _stream(served, "/v1/completions", {"prompt": "x", "max_tokens": 20, "ignore_eos": True})
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "generation_failed"
    calls["n"] = 0
    r = served.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 20, "ignore_eos": True})
    assert r.status_code == 500 and _error(r)["code"] == "generation_failed"
    ok = served.raw.post("/v1/completions", json={"prompt": "fine", "max_tokens": 4, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    _idle_and_no_kv(served)
    assert 'finished_reason="error"' in served.raw.get("/metrics").text


# ---- strict types, ranges, unsupported fields -----------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("n", "2"), ("stream", "yes"), ("logprobs", "3"), ("logprobs", True),
    ("temperature", 1e30), ("temperature", "0.5"), ("temperature", 2.5), ("top_p", 1.5), ("n", 2.5),
    ("presence_penalty", -3), ("frequency_penalty", 2.1), ("seed", "7"), ("echo", 1), ("max_tokens", -1),
    ("stop", 3), ("stop", ["a"] * 65), ("stop", ["s" * 257]), ("stop_token_ids", list(range(1025))),
    ("ignore_eos", "true"), ("stream_options", {"include_usage": 1}), ("logit_bias", {"5": 1.0}),
    ("suffix", "tail"), ("best_of", 3), ("max_tokens", 0),
])
def test_completion_fields_are_strict(served, field, value):
    body = {"prompt": "x", "max_tokens": 2, field: value}
    if field == "stream_options":
        body["stream"] = True
    r = served.raw.post("/v1/completions", json=body)
    assert r.status_code == 400, (field, value, r.text)
    assert _error(r)["param"] == field


@pytest.mark.parametrize("extra, param", [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"logprobs": 1}, "logprobs"), ({"top_logprobs": True, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"), ({"max_completion_tokens": "3"}, "max_completion_tokens"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
])
def test_chat_fields_are_strict_and_tool_calls_refused(served, extra, param):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra}
    r = served.raw.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, (extra, r.text)
    assert _error(r)["param"] == param


def test_tools_with_tool_choice_none_are_accepted(served):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    r = served.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "time?"}],
                                                     "tools": tools, "tool_choice": "none", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_every_error_is_json(served):
    for r in (served.raw.get("/nope"), served.raw.put("/v1/completions"), served.raw.get("/v1/completions"),
              served.raw.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}),
              served.raw.post("/v1/completions", content=b"\xff\xfe", headers={"content-type": "application/json"})):
        assert r.status_code in (400, 404, 405) and r.headers["content-type"] == "application/json", r.text
        _error(r)


# ---- API surface: /openapi.json, /v1/models/{id} ------------------------------------------------------
def test_openapi_documents_the_request_bodies(served):
    spec = served.raw.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
        assert name in schemas
    completion = schemas["CompletionRequest"]
    assert "prompt" in completion["required"]
    assert completion["properties"]["temperature"]["anyOf"][0]["maximum"] == 2.0
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    refs = json.dumps(spec)
    for ref in set(part.split('"')[0] for part in refs.split('"$ref": "#/components/schemas/')[1:]):
        assert ref in schemas, ref  # every reference resolves


def test_get_model_by_id(served):
    r = served.raw.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json()["id"] == MODEL and r.json()["object"] == "model"
    assert served.client.models.retrieve(MODEL).id == MODEL
    missing = served.raw.get("/v1/models/org/other-model")
    assert missing.status_code == 404 and _error(missing)["code"] == "model_not_found"


# ---- echo (lm-eval's loglikelihood) ---------------------------------------------------------------------
def test_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs(served):
    gen = served.raw.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                                   "logprobs": 1, "ignore_eos": True}).json()["choices"][0]
    tok = served.llm_engine.tokenizer
    context = tok.encode(PROMPT)
    full = context + tok.encode(gen["text"], add_special_tokens=False)
    # lm-eval's request: token ids, echo, logprobs, max_tokens 0 (older versions: 1), temperature 0.
    r = served.raw.post("/v1/completions", json={"prompt": full, "echo": True, "logprobs": 1, "max_tokens": 0,
                                                 "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tok.decode(full) and choice["finish_reason"] == "length"
    assert len(lp["tokens"]) == len(full) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert r.json()["usage"] == {"prompt_tokens": len(full), "completion_tokens": 0, "total_tokens": len(full)}
    continuation = lp["token_logprobs"][len(context):]
    if full[len(context):] == tok.encode(gen["text"], add_special_tokens=False):
        # The greedy continuation scores as generated, and is greedy (top-1) at every token.
        assert continuation == pytest.approx(gen["logprobs"]["token_logprobs"][:len(continuation)], abs=1e-3)
    for token_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert token_lp <= max(top.values()) + 1e-6 and len(top) <= 2
    _idle_and_no_kv(served)


def test_echo_with_generation_and_streaming(served):
    body = {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    r = served.raw.post("/v1/completions", json=body).json()
    choice = r["choices"][0]
    n_prompt = r["usage"]["prompt_tokens"]
    assert choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)
    assert len(choice["logprobs"]["tokens"]) == n_prompt + 4 and r["usage"]["completion_tokens"] == 4
    events = _stream(served, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]
    tokens = [t for e in events[:-1] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert tokens == choice["logprobs"]["tokens"]
    echo_only = _stream(served, "/v1/completions", {**body, "max_tokens": 0})
    assert [e["choices"][0]["text"] for e in echo_only[:-1]] == [PROMPT]
    assert echo_only[0]["choices"][0]["finish_reason"] == "length"
    plain = served.raw.post("/v1/completions", json={"prompt": ["ab", "cd"], "echo": True, "max_tokens": 1}).json()
    assert [c["text"][:2] for c in plain["choices"]] == ["ab", "cd"] and plain["choices"][0]["logprobs"] is None


def test_lm_eval_loglikelihood_payload(served):
    # lm-eval's local-completions loglikelihood request: a batch of token-id prompts (context +
    # continuation), echo, logprobs 1, max_tokens 1; it sums token_logprobs[ctxlen:-1] and checks
    # greediness against max(top_logprobs).
    tok = served.llm_engine.tokenizer
    context = tok.encode("Question: what color is the sky? Answer:")
    pairs = [context + tok.encode(" blue", add_special_tokens=False),
             context + tok.encode(" a shade of green", add_special_tokens=False)]
    r = served.raw.post("/v1/completions", json={"model": MODEL, "prompt": pairs, "temperature": 0, "max_tokens": 1,
                                                 "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    zero = served.raw.post("/v1/completions", json={"prompt": pairs, "max_tokens": 0, "logprobs": 1,
                                                    "echo": True}).json()["choices"]
    for ids, choice, echo_only in zip(pairs, choices, zero):
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(ids) + 1  # the prompt and the one generated token
        continuation = lps[len(context):-1]
        assert len(continuation) == len(ids) - len(context) and all(isinstance(x, float) for x in continuation)
        assert continuation == pytest.approx(echo_only["logprobs"]["token_logprobs"][len(context):], abs=1e-4)
        for token_lp, top in zip(continuation, choice["logprobs"]["top_logprobs"][len(context):-1]):
            assert token_lp <= max(top.values()) + 1e-6
