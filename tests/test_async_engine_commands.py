"""The typed commands between the event loop and the engine thread: each is dispatched, others refused."""
from __future__ import annotations

import concurrent.futures

import pytest

from nanoflow.entrypoints import async_engine as ae
from nanoflow.sampling_params import SamplingParams


class _FakeEngine:
    """Records the calls the engine thread makes (LLMEngine's surface that AsyncEngine uses)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def stats(self):
        return None

    def add_request(self, request_id, prompt, params):
        self.calls.append(("add", request_id, prompt, params))
        if prompt == []:
            raise ValueError("prompt must not be empty")

    def abort_request(self, request_id):
        self.calls.append(("abort", request_id))

    def has_unfinished_requests(self):
        return False


def _engine() -> tuple[ae.AsyncEngine, _FakeEngine, list]:
    fake = _FakeEngine()
    engine = ae.AsyncEngine(fake)  # type: ignore[arg-type]
    posted: list = []
    engine._post = lambda fn, *args: posted.append((fn.__name__, args))  # type: ignore[method-assign]
    return engine, fake, posted


def _cases(fake: _FakeEngine) -> dict[type, tuple[object, object]]:
    """One command of each class and what the engine should then have done."""
    params = SamplingParams(max_tokens=1)
    future: concurrent.futures.Future = concurrent.futures.Future()
    return {
        ae.AddRequest: (ae.AddRequest("r1", [1, 2], params), ("add", "r1", [1, 2], params)),
        ae.AbortRequest: (ae.AbortRequest("r1"), ("abort", "r1")),
        ae.CallInEngine: (ae.CallInEngine(lambda e: e is fake, future), future),
    }


def test_every_command_class_is_dispatched():
    engine, fake, posted = _engine()
    cases = _cases(fake)
    assert set(cases) == set(ae.COMMAND_TYPES)  # a new command class needs a case here
    for cls, (command, expected) in cases.items():
        fake.calls.clear()
        engine._apply([command])
        if cls is ae.CallInEngine:
            assert expected.result(timeout=0) is True and fake.calls == []
        else:
            assert fake.calls == [expected]
    assert posted == [("_resolve_adds", ([("r1", None)],))]


def test_add_failures_go_back_to_the_caller():
    engine, _, posted = _engine()
    engine._apply([ae.AddRequest("bad", [], SamplingParams())])
    (name, (results,)), = posted
    assert name == "_resolve_adds" and results[0][0] == "bad" and isinstance(results[0][1], ValueError)


def test_commands_are_frozen():
    command = ae.AbortRequest("r1")
    with pytest.raises(AttributeError):
        command.request_id = "r2"  # type: ignore[misc]


@pytest.mark.parametrize("unknown", [("abort", "r1"), "add", object()])
def test_unknown_command_is_rejected(unknown):
    engine, fake, _ = _engine()
    with pytest.raises(TypeError, match="unknown engine command .*AddRequest, AbortRequest, CallInEngine"):
        engine._submit(unknown)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown engine command"):
        engine._apply([unknown])  # type: ignore[list-item]
    assert fake.calls == [] and engine._commands == []
