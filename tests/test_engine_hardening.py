"""Engine hardening (issue 10): logprobs without top-k, outputs without in-flight placeholders, prompt
logprobs, a failing step failing only its requests, and the bound on n. CPU, built-in model, async
scheduling on (the default)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from nanoflow.config import EngineConfig
from nanoflow.engine.engine import EngineFatalError, LLMEngine, QueueFullError
from nanoflow.engine.request import PENDING_TOKEN
from nanoflow.sampling_params import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog because"


def _engine(**kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model="default", device="cpu", num_kv_blocks=kw.pop("num_kv_blocks", 256), **kw))


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    e = _engine(max_num_batched_tokens=16)  # prompts span several chunks
    assert e.config.async_scheduling
    return e


def _run(engine: LLMEngine, requests: dict[str, tuple]) -> tuple[dict, list]:
    """Adds (prompt, params) per id, steps to the end; (final outputs, every output seen)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    finals, seen = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(out)
            if out.finished:
                finals[out.request_id] = out
    engine.check_kv_invariant()
    assert engine.stats().kv_blocks_used == 0
    return finals, seen


def test_logprobs_without_top_k_do_not_kill_the_engine(engine):
    # Issue 10: logprobs=0 (chat's logprobs=true without top_logprobs) crashed _accept_token.
    finals, _ = _run(engine, {
        "zero": (PROMPT, SamplingParams(max_tokens=5, logprobs=0, ignore_eos=True)),
        "zero-too": ("Hello", SamplingParams(max_tokens=3, logprobs=0, ignore_eos=True))})
    for rid, n in (("zero", 5), ("zero-too", 3)):
        c = finals[rid].outputs[0]
        assert c.finish_reason == "length" and len(c.logprobs) == n
        assert all(list(entry) == [t] and entry[t].logprob <= 0 for t, entry in zip(c.token_ids, c.logprobs))
    # Mixed with a top-k request in the same steps: each gets what it asked for.
    finals, _ = _run(engine, {
        "k0": (PROMPT, SamplingParams(max_tokens=4, logprobs=0, ignore_eos=True)),
        "k3": (PROMPT, SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True))})
    assert all(len(e) == 1 for e in finals["k0"].outputs[0].logprobs)
    assert all(3 <= len(e) <= 4 for e in finals["k3"].outputs[0].logprobs)


def test_outputs_carry_no_placeholders_and_logprobs_keep_up(engine):
    # Issue 10: with async scheduling, outputs listed the in-flight token as -1 while its logprob was
    # not there yet, so the server's diffing lost ~94% of the streamed logprobs.
    _, seen = _run(engine, {"s": (PROMPT, SamplingParams(max_tokens=12, logprobs=1, ignore_eos=True)),
                            "t": ("Hi", SamplingParams(max_tokens=7, logprobs=2, ignore_eos=True, n=2))})
    lengths: dict[tuple[str, int], list[int]] = {}
    for out in seen:
        for c in out.outputs:
            assert PENDING_TOKEN not in c.token_ids
            assert len(c.logprobs) == len(c.token_ids)
            lengths.setdefault((out.request_id, c.index), []).append(len(c.token_ids))
    assert lengths[("s", 0)] == list(range(1, 13))  # one new token per output, none skipped
    assert lengths[("t", 1)][-1] == 7


def test_prompt_logprobs_agree_with_generation_logprobs(engine):
    # Greedy tokens with their logprobs, then the same text as a prompt: its prompt logprobs score
    # the generated tokens exactly as generation did (what lm-eval's loglikelihood relies on).
    finals, _ = _run(engine, {"gen": (PROMPT, SamplingParams(max_tokens=6, temperature=0, logprobs=1,
                                                            ignore_eos=True))})
    gen = finals["gen"]
    ids = gen.prompt_token_ids + gen.outputs[0].token_ids
    finals, _ = _run(engine, {"echo": (ids, SamplingParams(max_tokens=1, prompt_logprobs=2))})
    prompt_lps = finals["echo"].prompt_logprobs
    assert len(prompt_lps) == len(ids) and prompt_lps[0] is None
    for token, out_entry, prompt_entry in zip(gen.outputs[0].token_ids, gen.outputs[0].logprobs,
                                              prompt_lps[len(gen.prompt_token_ids):]):
        assert prompt_entry[token].logprob == pytest.approx(out_entry[token].logprob, abs=1e-4)
        assert prompt_entry[token].rank == 1  # greedy: the most likely token
        assert 2 <= len(prompt_entry) <= 3
    for token, entry in zip(ids[1:], prompt_lps[1:]):
        others = sorted(lp.rank for t, lp in entry.items() if t != token)
        assert others == [r for r in (1, 2) if r != entry[token].rank]  # the top 2, besides the token


def test_prompt_logprobs_survive_preemption():
    # A cache too small for both: the newer request is preempted and recomputed, and its prompt
    # tokens are still scored once each.
    e = _engine(num_kv_blocks=5, block_size=16, max_num_batched_tokens=64, kv_admission_ratio=4.0)
    preempted = []
    real_schedule = e.scheduler.schedule

    def schedule():
        out = real_schedule()
        preempted.extend(r.request_id for r in out.preempted)
        return out
    e.scheduler.schedule = schedule
    prompt = list(range(10, 50))
    finals, _ = _run(e, {"a": (prompt, SamplingParams(max_tokens=30, ignore_eos=True)),
                         "b": (prompt, SamplingParams(max_tokens=20, ignore_eos=True, prompt_logprobs=0))})
    assert "b" in preempted
    b = finals["b"]
    assert len(b.prompt_logprobs) == len(prompt) and all(len(entry) == 1 for entry in b.prompt_logprobs[1:])
    ref, _ = _run(e, {"ref": (prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))})  # alone: no preemption
    for got, want in zip(b.prompt_logprobs[1:], ref["ref"].prompt_logprobs[1:]):
        (t, lp), = got.items()
        assert lp.logprob == pytest.approx(want[t].logprob, abs=1e-4) and lp.rank == want[t].rank


def test_a_failing_step_fails_only_its_requests(engine, monkeypatch):
    real_forward = engine.runner.forward
    calls = {"n": 0}

    def forward_failing_once(batch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return real_forward(batch, *args, **kwargs)
    monkeypatch.setattr(engine.runner, "forward", forward_failing_once)
    finals, seen = _run(engine, {"x": (PROMPT, SamplingParams(max_tokens=20, ignore_eos=True)),
                                 "y": ("Hello there", SamplingParams(max_tokens=20, ignore_eos=True, n=2))})
    reasons = {rid: [c.finish_reason for c in out.outputs] for rid, out in finals.items()}
    assert reasons == {"x": ["error"], "y": ["error", "error"]}  # both were in the failing step
    assert all(t != PENDING_TOKEN for out in seen for c in out.outputs for t in c.token_ids)
    # The engine goes on: later requests finish normally (and the KV check in _run passed).
    finals, _ = _run(engine, {"after": (PROMPT, SamplingParams(max_tokens=5, ignore_eos=True))})
    assert finals["after"].outputs[0].finish_reason == "length"
    assert len(finals["after"].outputs[0].token_ids) == 5


def test_a_failing_step_leaves_no_cached_prefix(engine, monkeypatch):
    """A step whose results cannot be read may have written bad KV: a later request must compute its
    prompt again rather than hit those blocks as a cached prefix."""
    assert engine.kv.enable_prefix_caching
    prompt = list(range(5, 5 + 4 * engine.config.block_size))  # four full blocks
    real_launch = engine._launch

    class Unreadable:
        def tolist(self):
            raise RuntimeError("simulated lost step results")

    def launch_with_unreadable_results(sched):
        flight = real_launch(sched)  # the prompt's KV is computed and the request advanced
        if flight is not None:
            flight.tokens_host = Unreadable()
        return flight
    monkeypatch.setattr(engine, "_launch", launch_with_unreadable_results)
    finals, _ = _run(engine, {"x": (prompt, SamplingParams(max_tokens=3, ignore_eos=True))})
    assert finals["x"].outputs[0].finish_reason == "error"
    probe = SimpleNamespace(params=SamplingParams(), num_tokens=len(prompt) + 1, num_pending_tokens=0,
                            token_slice=lambda a, b: (prompt + [7])[a:b])
    assert engine.kv.lookup(probe).nodes == []


def test_a_failing_token_fails_only_its_request(engine, monkeypatch):
    engine.add_request("bad", PROMPT, SamplingParams(max_tokens=10, ignore_eos=True))
    engine.add_request("good", PROMPT, SamplingParams(max_tokens=10, ignore_eos=True))
    bad_seq = engine._groups["bad"].seqs[0]
    detok = bad_seq.engine_state.detokenizer
    real_append = detok.append
    state = {"n": 0}

    def append_failing_on_third(ids, **kwargs):
        state["n"] += 1
        if state["n"] == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return real_append(ids, **kwargs)
    monkeypatch.setattr(detok, "append", append_failing_on_third)
    finals, _ = _run(engine, {})
    assert finals["bad"].outputs[0].finish_reason == "error"
    assert len(finals["bad"].outputs[0].token_ids) == 3  # the third was read, then it failed
    assert finals["good"].outputs[0].finish_reason == "length"
    assert len(finals["good"].outputs[0].token_ids) == 10


def test_steps_that_keep_failing_are_fatal(monkeypatch):
    e = _engine()

    def broken(*args, **kwargs):
        raise RuntimeError("device is gone")
    monkeypatch.setattr(e.runner, "forward", broken)
    with pytest.raises(EngineFatalError, match="device is gone"):
        for i in range(10):
            e.add_request(f"r{i}", PROMPT, SamplingParams(max_tokens=4))
            e.step()
    assert i == 2  # the third failure in a row


def test_n_is_bounded_and_counts_against_the_waiting_queue():
    e = _engine(max_seqs_per_request=8, max_waiting_requests=10)
    with pytest.raises(ValueError, match="n must be at most 8"):
        e.add_request("big", PROMPT, SamplingParams(n=9))
    with pytest.raises(ValueError, match="n must be at most 8"):
        e.add_request("huge", PROMPT, SamplingParams(n=10**30))
    e.add_request("a", PROMPT, SamplingParams(n=8))
    with pytest.raises(QueueFullError):
        e.add_request("b", PROMPT, SamplingParams(n=3))
    e.add_request("c", PROMPT, SamplingParams(n=2))
    assert e.stats().num_waiting == 10
    for rid in ("a", "c"):
        e.abort_request(rid)
    assert not e.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_seqs_per_request"):
        EngineConfig(max_seqs_per_request=0)
