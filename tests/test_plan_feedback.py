"""Measured plan choice (pipeline/plan_feedback.py): timed steps confirm or veto predicted plan wins,
per decision bucket; the runner times its steps and feeds them back; the tokens never change."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from nanoflow import LLM, SamplingParams
from nanoflow.config import EngineConfig
from nanoflow.pipeline import plan_feedback as fb
from nanoflow.pipeline.plan import load_plan


def _run(choice: fb.MeasuredChoice, key, plan_factor: float, steps: int, work=lambda i: 1.0 + i % 3):
    """Decisions of `steps` steps of one bucket whose plan takes plan_factor x sequential's time."""
    ran = []
    for i in range(steps):
        plan = choice.decide(key, True)
        ran.append(plan)
        w = work(i)
        choice.record(key, plan, (plan_factor if plan else 1.0) * 10.0 * w, w)
    return ran


def test_predicted_losses_are_never_timed():
    choice = fb.MeasuredChoice()
    assert not any(choice.decide(("k",), False) for _ in range(10))
    assert choice.summary() == {"buckets": 0, "judged": 0, "plan_kept": 0, "plan_vetoed": 0}


@pytest.mark.parametrize("factor,kept", [(0.8, True), (1.25, False), (0.995, False)])
def test_the_faster_arm_is_kept_after_alternating_samples(factor, kept):
    choice = fb.MeasuredChoice()
    ran = _run(choice, ("b",), factor, 2 * fb.SAMPLES + 3 * fb.RECHECK_EVERY)
    assert ran[:2 * fb.SAMPLES] == [True, False] * fb.SAMPLES  # alternate, plan first
    after = ran[2 * fb.SAMPLES:]
    others = [i for i, r in enumerate(after) if r != kept]
    # only the periodic re-check runs the arm not kept: once per RECHECK_EVERY decisions
    assert len(others) == 3 and all((i + 1) % fb.RECHECK_EVERY == 0 for i in others)
    assert choice.summary() == {"buckets": 1, "judged": 1, "plan_kept": int(kept), "plan_vetoed": int(not kept)}


def test_sampling_alternates_while_timings_are_still_pending():
    """Async steps: the timings of the first decisions arrive later; sampling still alternates."""
    choice = fb.MeasuredChoice()
    first = [choice.decide(("p",), True) for _ in range(6)]
    assert first == [True, False] * 3
    for plan in first:
        choice.record(("p",), plan, 5.0 if plan else 10.0, 1.0)
    assert all(choice.decide(("p",), True) for _ in range(10))


def test_a_new_context_bucket_starts_from_its_nearest_judged_neighbour():
    choice = fb.MeasuredChoice()
    for _ in range(2 * fb.SAMPLES):  # both sampled side by side (neither is seeded by the other)
        for key, factor in (((64, 64, 10), 1.3), ((64, 64, 20), 0.7)):  # the plan loses at 10, wins at 20
            plan = choice.decide(key, True)
            choice.record(key, plan, (factor if plan else 1.0) * 5.0, 1.0)
    assert not choice.decide((64, 64, 12), True)          # nearest is 10: vetoed without sampling
    assert choice.decide((64, 64, 19), True)              # nearest is 20: kept
    fresh = [choice.decide((128, 64, 12), True) for _ in range(2)]
    assert fresh == [True, False]                         # other token bucket: sampled afresh
    assert choice.summary()["judged"] == 4


def test_time_is_compared_per_unit_of_work():
    """The plan's steps happen to be the big ones: raw times would veto it, times per work keep it."""
    choice = fb.MeasuredChoice()
    for _ in range(fb.SAMPLES):
        assert choice.decide(("w",), True)
        choice.record(("w",), True, 0.9 * 40.0, 4.0)     # 36 ms for 4 units
        assert not choice.decide(("w",), True)
        choice.record(("w",), False, 10.0, 1.0)          # 10 ms for 1 unit
    assert choice.decide(("w",), True)


def test_a_drifting_bucket_changes_its_mind():
    """The plan wins at first, then loses (contexts grew): the re-checks bring sequential back."""
    choice = fb.MeasuredChoice()
    first = _run(choice, ("d",), 0.8, 2 * fb.SAMPLES + 10)
    assert first[-1]
    later = _run(choice, ("d",), 1.3, 4 * fb.RECHECK_EVERY)
    assert sum(later[fb.WINDOW:]) <= 4  # a window of slow plan steps, then only the re-checks


def test_records_of_unknown_buckets_or_empty_work_are_ignored():
    choice = fb.MeasuredChoice()
    choice.record(("never decided",), True, 5.0, 1.0)
    choice.decide(("z",), True)
    choice.record(("z",), True, 5.0, 0.0)
    choice.record(("z",), True, 0.0, 1.0)
    assert choice.summary()["buckets"] == 1
    assert not choice._buckets[("z",)].plan  # neither record counted


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.floats(0.5, 2.0)), max_size=300))
def test_decisions_follow_the_measured_medians(steps):
    """Property: in every bucket, once both arms have SAMPLES timings, a decision that is not a
    re-check runs the arm whose median time per work is lower (the plan by the 1% margin)."""
    choice = fb.MeasuredChoice()
    factors = {}
    for bucket, predicted, factor in steps:
        key = (bucket,)
        factors.setdefault(key, factor)
        arms = choice._buckets.get(key)
        judged = arms is not None and len(arms.plan) >= fb.SAMPLES and len(arms.sequential) >= fb.SAMPLES
        before = arms.since_check if judged else None
        wins = arms.plan_wins() if judged else None
        plan = choice.decide(key, predicted)
        if not predicted:
            assert not plan
            continue
        if judged and before + 1 < fb.RECHECK_EVERY:
            assert plan == wins
        choice.record(key, plan, (factors[key] if plan else 1.0) * 3.0, 1.5)


def test_step_timer_on_cpu_returns_payloads_in_order():
    import torch
    timer = fb.StepTimer(torch.device("cpu"))
    for i in range(3):
        started = timer.start()
        timer.stop(started, i)
    done = timer.done()
    assert [p for p, _ in done] == [0, 1, 2] and all(ms >= 0 for _, ms in done)
    assert timer.done() == []


def test_plan_choice_is_validated():
    with pytest.raises(ValueError, match="plan_choice"):
        EngineConfig(model="default", plan_choice="always")


class _FakeTimer:
    """Steps 'take' their work at fixed rates, times plan_factor under the plan: deterministic."""

    def __init__(self, runner, plan_factor: float):
        self.runner, self.plan_factor, self._done = runner, plan_factor, []

    def start(self):
        return None

    def stop(self, started, payload):
        key, ran_plan, work = payload
        self._done.append((payload, work * 1e3 * (self.plan_factor if ran_plan else 1.0)))

    def done(self):
        out, self._done = self._done, []
        return out


@pytest.mark.parametrize("plan_factor", [1.5, 0.5])
def test_engine_keeps_or_vetoes_the_plan_by_its_timed_steps(tmp_path, plan_factor):
    """A plan predicted to win on every step (min_attn_share 0): with timings that say it loses, the
    engine runs it only while sampling and on re-checks; with timings that say it wins, it keeps it.
    The tokens are those of sequential either way."""
    d = load_plan("overlap-2").to_dict()
    d["min_attn_share"] = 0.0
    path = tmp_path / "every-step.json"
    path.write_text(json.dumps(d))
    rng = random.Random(3)
    prompts = [[rng.randrange(10, 400) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(model="default", device="cpu", dtype="float32", num_kv_blocks=256, block_size=4,
              max_num_batched_tokens=32)
    seq = LLM(**kw)
    reference = [o.outputs[0].token_ids for o in seq.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                               use_tqdm=False)]
    llm = LLM(**kw, plan=str(path))
    runner = llm.engine.runner
    runner._timer = _FakeTimer(runner, plan_factor)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    summary = runner.plan_choice_summary()
    assert summary["judged"] > 0
    steps = llm.engine.stats().num_steps
    if plan_factor > 1:
        assert summary["plan_kept"] == 0 and runner.plan_steps <= fb.SAMPLES * summary["buckets"] + steps // 32
    else:
        assert summary["plan_vetoed"] == 0 and runner.plan_steps >= steps - fb.SAMPLES * summary["buckets"] - 2
