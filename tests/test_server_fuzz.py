"""A bounded schema fuzz of the OpenAI endpoints (issue 10). Request bodies are drawn by hypothesis from
the server's own /openapi.json: valid ones, and ones with one field replaced by an arbitrary JSON value
(wrong type, out of range, unknown). Each goes to a real server, streamed or not. Asserted:
- no 5xx other than 503 overload, and every error in OpenAI's JSON shape;
- every stream that answered 200 ends with [DONE] and carries no 5xx error event;
- afterwards the engine still steps (a request completes) and no KV block is in use.

NANOFLOW_FUZZ_EXAMPLES (default 100) sets the number of bodies per endpoint; CI keeps the default so
the test stays well under a minute on two cores (small context: no body generates for long)."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoflow.config import EngineConfig
from nanoflow.engine.engine import LLMEngine
from nanoflow.entrypoints.server_config import ServerConfig
from tests.server_helpers import Served

EXAMPLES = int(os.environ.get("NANOFLOW_FUZZ_EXAMPLES", "100"))
ENDPOINTS = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}

_json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
ANY_JSON = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def from_schema(schema: dict, components: dict, depth: int = 0) -> st.SearchStrategy:
    """Values valid for a JSON schema of the subset pydantic writes ($ref, anyOf, type, enum/const,
    numeric bounds, string / array lengths, object properties), kept small."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[-1]], components, depth)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components, depth) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        near = st.integers(-1 if lo is None else int(lo), 4 if hi is None else int(hi))
        return near | st.integers(min_value=lo, max_value=hi)
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 24), 24))
    if kind == "array":
        items = from_schema(schema.get("items", {}), components, depth + 1)
        lo = schema.get("minItems", 0)
        return st.lists(items, min_size=lo, max_size=min(schema.get("maxItems", lo + 3), lo + 3))
    if kind == "object" and "properties" in schema and depth < 4:
        required = set(schema.get("required", []))
        props = {k: from_schema(v, components, depth + 1) for k, v in schema["properties"].items()}
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items() if k not in required})
    if kind == "object":
        return st.dictionaries(st.text(max_size=6), _json_scalars, max_size=3)
    return ANY_JSON  # no type: any JSON value


# Fields the server refuses whenever they are set (documented as unsupported): left out of the
# "plausible" bodies so that most of those reach the engine.
_REFUSED = {"logit_bias", "suffix", "best_of", "functions", "function_call", "tools", "tool_choice",
            "response_format", "user", "model"}


def bodies(name: str, components: dict, model: str) -> st.SearchStrategy:
    """Any valid body; a plausible one (served model, no field that is always refused); or a plausible
    one with one field replaced by an arbitrary JSON value."""
    schema = components[name]
    plausible_schema = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k not in _REFUSED}}
    plausible = st.tuples(from_schema(plausible_schema, components), st.booleans()).map(
        lambda pair: {**pair[0], **({"model": model} if pair[1] else {})})
    fields = sorted(schema["properties"]) + ["unknown_field"]

    @st.composite
    def mutated(draw):
        body = draw(plausible)
        body[draw(st.sampled_from(fields))] = draw(ANY_JSON)
        return body
    return st.one_of(from_schema(schema, components), plausible, plausible, mutated())


@pytest.fixture(scope="module")
def served():
    # A short context bounds what any accepted body can make the engine generate on CPU.
    engine = LLMEngine(EngineConfig(model="default", device="cpu", num_kv_blocks=256, max_model_len=64,
                                    max_seqs_per_request=4))
    s = Served(engine, config=ServerConfig(max_request_bytes=64 << 10))
    yield s
    s.close()


def _check_error_body(text: str) -> dict:
    body = json.loads(text)
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def _send(served: Served, path: str, body: dict) -> None:
    with served.raw.stream("POST", path, json=body, timeout=60) as r:
        text = r.read().decode()
        if r.status_code >= 500:
            error = _check_error_body(text)
            assert r.status_code == 503 and error["code"] == "server_overloaded", (body, r.status_code, text)
            return
        if r.status_code != 200:
            assert r.headers["content-type"] == "application/json", (body, text)
            _check_error_body(text)
            return
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", (body, text)
            for data in events[:-1]:
                event = json.loads(data)
                if "error" in event:
                    assert event["error"]["code"] not in (500, "internal_error", "generation_failed", "engine_dead"), \
                        (body, event)
        else:
            assert "choices" in json.loads(text), (body, text)


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_fuzzed_bodies_never_break_the_server(served, path):
    spec = served.raw.get("/openapi.json").json()
    components = spec["components"]["schemas"]
    strategy = bodies(ENDPOINTS[path], components, "default")

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(body=strategy)
    def run(body):
        _send(served, path, body)
    run()
    # The engine still steps, and nothing leaked.
    r = served.raw.post("/v1/completions", json={"prompt": "still alive", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    served.wait_idle()
    assert served.kv_blocks_used() == 0
    assert served.engine.is_alive()
