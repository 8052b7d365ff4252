"""One prompt check: the server answers with the engine's own message (LLMEngine.validate_prompt)."""
from __future__ import annotations

import pytest

from nanoflow.config import EngineConfig
from nanoflow.engine.engine import LLMEngine, PromptError
from nanoflow.sampling_params import SamplingParams
from tests.server_helpers import SMALL, Served, _error

MAX_LEN = 64


@pytest.fixture(scope="module")
def served():
    s = Served(LLMEngine(EngineConfig(**SMALL, max_model_len=MAX_LEN)))
    yield s
    s.close()


def _engine_message(served: Served, ids: list[int]) -> str:
    """What LLMEngine.add_request raises for `ids` (run on the engine thread: it is not thread-safe)."""
    fut = served.engine.call_in_engine_thread(lambda e: e.add_request("direct", ids, SamplingParams(max_tokens=1)))
    with pytest.raises(PromptError) as info:
        fut.result(timeout=30)
    return str(info.value)


def test_over_long_prompt_gets_the_same_message_from_server_and_engine(served):
    ids = [20] * (MAX_LEN + 5)
    engine_message = _engine_message(served, ids)
    r = served.raw.post("/v1/completions", json={"prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded"
    assert _error(r)["message"] == engine_message and str(MAX_LEN) in engine_message
    assert f"{len(ids)} tokens" in engine_message


def test_out_of_vocabulary_prompt_gets_the_same_message(served):
    ids = [1, served.engine.vocab_size + 3]
    engine_message = _engine_message(served, ids)
    r = served.raw.post("/v1/completions", json={"prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and _error(r)["code"] == "invalid_value" and _error(r)["param"] == "prompt"
    assert _error(r)["message"] == engine_message and str(served.engine.vocab_size + 3) in engine_message


def test_over_long_chat_prompt_uses_the_engine_check(served):
    text = " ".join(["word"] * (MAX_LEN * 2))
    r = served.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded"
    assert _error(r)["message"].startswith(f"This model's maximum context length is {MAX_LEN} tokens.")


def test_validate_prompt_accepts_what_fits(served):
    served.engine.validate_prompt([1] * (MAX_LEN - 1))  # one output token still fits
    served.engine.validate_prompt([1] * 10, max_tokens=MAX_LEN - 10)
    with pytest.raises(PromptError, match="requested 65 tokens") as info:
        served.engine.validate_prompt([1] * 10, max_tokens=MAX_LEN - 9)
    assert info.value.param == "max_tokens" and info.value.code == "context_length_exceeded"
