"""Scheduler and KV pool: unit cases plus hypothesis runs with random arrivals, lengths and aborts."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoflow.engine.kv_cache import BlockPool, KVCacheError, KVCacheManager
from nanoflow.engine.request import Request, RequestStatus
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig
from nanoflow.sampling_params import SamplingParams


def make_request(i: int, prompt_len: int, max_tokens: int) -> Request:
    return Request(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), max_tokens, i)


def simulate_step(sched: Scheduler, out) -> list[Request]:
    """What the engine does after the forward pass: advance, append a token, retire finished."""
    finished = []
    for req, n in out.scheduled:
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(7)
            if len(req.output_token_ids) >= req.max_tokens:
                sched.finish(req, RequestStatus.FINISHED_LENGTH)
                finished.append(req)
    return finished


def test_block_pool_refcounts_and_errors():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.share(a)
    pool.release(a)
    assert pool.num_free == 2
    pool.release(a)
    assert pool.num_free == 4
    pool.check_invariant()
    with pytest.raises(KVCacheError):
        pool.release(a)
    with pytest.raises(KVCacheError):
        pool.allocate(5)


def test_decodes_first_then_prefill_chunks_within_budget():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(token_budget=10, max_num_seqs=8), kv)
    a, b = make_request(0, 3, 5), make_request(1, 30, 5)
    sched.add(a)
    out = sched.schedule()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("r0", 3)]
    simulate_step(sched, out)
    sched.add(b)
    out = sched.schedule()
    # r0 decodes (1 token) first, then r1's prompt fills the remaining 9 tokens: chunked prefill.
    assert [(r.request_id, n) for r, n in out.scheduled] == [("r0", 1), ("r1", 9)]
    assert out.num_decode == 1
    simulate_step(sched, out)
    out = sched.schedule()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("r0", 1), ("r1", 9)]


def test_admission_respects_projected_kv():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    sched = Scheduler(SchedulerConfig(token_budget=100, max_num_seqs=8), kv)
    for i in range(3):  # each projects (8 + 8) / 4 = 4 blocks: only two fit in 10
        sched.add(make_request(i, 8, 8))
    out = sched.schedule()
    assert [r.request_id for r, _ in out.scheduled] == ["r0", "r1"]
    assert len(sched.waiting) == 1


def test_preemption_frees_newest_and_recomputes():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    # Overcommit: admission lets in more than fits, so decode growth forces a preemption.
    sched = Scheduler(SchedulerConfig(token_budget=64, max_num_seqs=8, kv_admission_ratio=10.0), kv)
    reqs = [make_request(i, 4, 8) for i in range(3)]
    for r in reqs:
        sched.add(r)
    preempted = []
    for _ in range(40):
        out = sched.schedule()
        preempted += out.preempted
        sched.check_invariants()
        simulate_step(sched, out)
        if not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert preempted and preempted[0] is reqs[2]  # the newest goes first
    assert all(len(r.output_token_ids) == 8 for r in reqs)
    assert kv.pool.num_used == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.integers(1, 48),
    num_blocks=st.integers(8, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_seqs=st.integers(1, 6),
    ratio=st.sampled_from([0.5, 1.0, 3.0]),
    admission=st.sampled_from(["reserve", "peak"]),
    events=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12), st.booleans(), st.integers(0, 3)),
                    min_size=1, max_size=14),
)
def test_random_workloads_no_leak_no_starvation_budget_respected(
        budget, num_blocks, block_size, max_seqs, ratio, admission, events):
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(budget, max_seqs, ratio, kv_admission=admission), kv)
    capacity = num_blocks * block_size
    pending = []
    for i, (prompt_len, max_tokens, abort, arrive_step) in enumerate(events):
        if prompt_len + max_tokens > capacity:  # the engine rejects these at add_request
            continue
        pending.append((arrive_step, make_request(i, prompt_len, max_tokens), abort))
    all_reqs = [r for _, r, _ in pending]
    aborted = set()
    for step in itertools.count():
        for arrive_step, req, abort in pending:
            if arrive_step == step:
                sched.add(req)
        out = sched.schedule()
        assert out.num_tokens <= budget
        assert len(sched.running) <= max_seqs
        assert all(n == 1 for _, n in out.scheduled[:out.num_decode])
        assert all(n > 1 for _, n in out.scheduled[out.num_decode:])
        for req, n in out.scheduled:  # every scheduled token has a KV slot
            assert len(kv.block_ids(req.request_id)) * block_size >= req.num_computed_tokens + n
        sched.check_invariants()
        simulate_step(sched, out)
        for _, req, abort in pending:  # abort some requests midway
            if abort and req not in aborted and req.num_computed_tokens > 0 and not req.status.finished:
                sched.finish(req, RequestStatus.FINISHED_ABORTED)
                aborted.add(req)
        sched.check_invariants()
        if step > 3 and not sched.has_unfinished():
            break
        assert step < 2000, "a request starved"
    assert kv.pool.num_used == 0
    kv.check_invariant()
    for req in all_reqs:
        assert req.status.finished
        if req not in aborted:
            assert len(req.output_token_ids) == req.max_tokens


def _run_to_end(sched: Scheduler, requests: list[Request], arrivals: list[int]) -> dict[str, int]:
    """Steps the scheduler until every request finished; returns each request's first scheduled step."""
    started: dict[str, int] = {}
    for step in itertools.count():
        for req, at in zip(requests, arrivals):
            if at == step:
                sched.add(req)
        out = sched.schedule()
        assert not out.preempted, f"step {step}: {[r.request_id for r in out.preempted]} preempted"
        for req, _ in out.scheduled:
            started.setdefault(req.request_id, step)
        sched.check_invariants()
        simulate_step(sched, out)
        if step >= max(arrivals) and not sched.has_unfinished():
            return started
        assert step < 5000, "a request starved"


@pytest.mark.parametrize("admission", ["reserve", "peak"])
def test_peak_admission_starts_a_request_before_the_running_one_ends(admission):
    # 8 blocks of 4 tokens. a: 4 + 12 tokens (4 blocks at its end); b: 4 + 16 (5 blocks). Both at their
    # largest at once would take 9 > 8, so 'reserve' starts b only once a is done; 'peak' starts b
    # when a's last steps and b's first ones fit together (a has <= 4 steps left).
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(token_budget=64, max_num_seqs=4, kv_admission=admission), kv)
    a, b = make_request(0, 4, 12), make_request(1, 4, 16)
    started = _run_to_end(sched, [a, b], [0, 0])
    a_done = 12  # a prefills at step 0 and decodes 11 more tokens: its last step is 11
    if admission == "reserve":
        assert started["r1"] == a_done
    else:
        assert 0 < started["r1"] < a_done
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 16
    assert kv.pool.num_used == 0


def test_admission_rule_switches_only_between_runs():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(token_budget=64, max_num_seqs=4), kv)
    with pytest.raises(ValueError, match="must be 'reserve' or 'peak'"):
        sched.set_kv_admission("greedy")
    a, b = make_request(0, 4, 12), make_request(1, 4, 16)
    sched.add(a)
    with pytest.raises(ValueError, match="while requests are waiting"):
        sched.set_kv_admission("peak")
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.set_kv_admission("peak")
    assert sched.config.kv_admission == "peak"
    started = _run_to_end(sched, [make_request(0, 4, 12), b], [0, 0])
    assert 0 < started["r1"] < 12  # the peak rule's start (see the test above)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(6, 60),
    block_size=st.sampled_from([1, 2, 4, 16]),
    chunk=st.integers(1, 40),
    events=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(0, 40)), min_size=1, max_size=16),
)
def test_peak_admission_never_preempts_when_lengths_are_exact(num_blocks, block_size, chunk, events):
    """Requests that run to max_tokens, every decode scheduled each step (budget above the seats): the
    peak projection bounds the real use, so no allocation fails."""
    max_seqs = 8
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(token_budget=max_seqs + chunk, max_num_seqs=max_seqs, kv_admission="peak"), kv)
    capacity = num_blocks * block_size
    kept = [(p, m, at) for p, m, at in events if p + m <= capacity]
    if not kept:
        return
    requests = [make_request(i, p, m) for i, (p, m, _) in enumerate(kept)]
    _run_to_end(sched, requests, [at for _, _, at in kept])
    assert all(len(r.output_token_ids) == r.max_tokens for r in requests)
    assert kv.pool.num_used == 0


def test_peak_admission_admits_more_requests_at_once_on_a_staggered_trace():
    # Lengths spread like a chat trace: at the same pool, 'peak' keeps more requests running per step.
    import random
    rng = random.Random(0)
    lengths = [(rng.randint(8, 64), rng.randint(8, 256)) for _ in range(120)]
    mean_running = {}
    for admission in ("reserve", "peak"):
        kv = KVCacheManager(num_blocks=200, block_size=4)
        sched = Scheduler(SchedulerConfig(token_budget=256, max_num_seqs=128, kv_admission=admission), kv)
        for i, (p, m) in enumerate(lengths):
            sched.add(make_request(i, p, m))
        rows = steps = 0
        while sched.has_unfinished():
            out = sched.schedule()
            assert not out.preempted
            rows += out.num_decode
            steps += 1
            simulate_step(sched, out)
        mean_running[admission] = rows / steps
    assert mean_running["peak"] > 1.1 * mean_running["reserve"], mean_running
