"""Prefix caching and the host tier, below the model: the prefix tree, the pool's LRU eviction, and a
hypothesis state machine that runs the scheduler against a simulated KV cache whose contents are the
tokens themselves, so a cache hit that returns the wrong KV (aliasing, a stale host copy, a block
reused mid-copy, a disk slot written from an unfinished save) fails the run, and no block may leak
across eviction, abort, preemption, host swap and disk spill."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nanoflow.engine.kv_cache import BlockPool, KVCacheError, KVCacheManager
from nanoflow.engine.kv_disk_tier import DiskKVTier
from nanoflow.engine.kv_host_tier import HostKVTier, _runs
from nanoflow.engine.slot_lru import SlotLRU
from nanoflow.engine.prefix_cache import PrefixTree
from nanoflow.engine.request import PENDING_TOKEN, Request, RequestStatus
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig
from nanoflow.sampling_params import SamplingParams


class Tokens:
    def __init__(self, ids):
        self.ids = list(ids)

    def token_slice(self, a, b):
        return self.ids[a:b]


def _req(i: int, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(f"r{i}", list(prompt), SamplingParams(max_tokens=max_tokens), max_tokens, i)


# ---- the tree ---------------------------------------------------------------------------------------
def test_colliding_hashes_never_alias_blocks():
    """Python hashes ints modulo 2**61 - 1, so these two blocks have the same hash (and so do their
    tuples); the tree still keeps them apart because a hit compares the tokens."""
    a, b = (5, 6), (5 + (2**61 - 1), 6)
    assert hash(a) == hash(b) and a != b
    tree = PrefixTree(block_size=2)
    chain: list = []
    tree.extend(Tokens(a), chain, 1, owner=None)
    tree.attach(chain[0], block=0, owner="x")
    assert len(tree.lookup(Tokens(a + (1,)), 1, use_host=False).nodes) == 1
    assert tree.lookup(Tokens(b + (1,)), 1, use_host=False).nodes == []
    # The same block under different parents is a different node too.
    other: list = []
    tree.extend(Tokens((9, 9) + a), other, 2, owner=None)
    assert other[1] is not chain[0] and other[1].tokens == chain[0].tokens


def test_lookup_stops_at_a_claimed_block_and_asks_to_wait():
    tree = PrefixTree(block_size=2)
    chain: list = []
    tree.extend(Tokens([1, 2, 3, 4, 5]), chain, 2, owner="a")
    assert [n.owner for n in chain] == ["a", "a"]
    hit = tree.lookup(Tokens([1, 2, 3, 4, 9]), 2, use_host=False)
    assert hit.nodes == [] and hit.wait
    tree.attach(chain[0], 7, "a")
    hit = tree.lookup(Tokens([1, 2, 3, 4, 9]), 2, use_host=False)
    assert [n.block for n in hit.nodes] == [7] and hit.wait
    assert not tree.lookup(Tokens([1, 2, 8, 8, 9]), 2, use_host=False).wait
    tree.detach(chain, "a")
    assert [n.block for n in tree.walk()] == [7]  # the unclaimed, empty node left the tree


def test_pool_evicts_uncached_first_then_least_recently_released():
    pool = BlockPool(4)
    evicted = []
    pool.on_evict = evicted.append
    a = pool.allocate(4)
    pool.mark_cached(a[0])
    pool.mark_cached(a[1])
    pool.release([a[1], a[0]])  # a[1] released first: least recently used
    pool.release([a[2], a[3]])  # uncached: handed out before any cached block
    assert pool.allocate(2) == [a[3], a[2]] and evicted == []
    assert pool.allocate(1) == [a[1]] and evicted == [a[1]]
    pool.share([a[0]])  # a cached free block can be revived
    assert pool.num_free == 0 and pool.ref_count(a[0]) == 1
    pool.release([a[2]])
    with pytest.raises(KVCacheError, match="sharing free block"):
        pool.share([a[2]])  # an uncached free block holds nothing to share
    with pytest.raises(KVCacheError, match="double free"):
        pool.release([a[2]])
    pool.check_invariant()


def test_manager_reuses_a_prefix_and_keeps_one_token_to_compute():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    first = _req(0, list(range(10, 22)))  # 12 tokens: 3 full blocks
    assert kv.admit(first, kv.lookup(first), 12)
    first.num_computed_tokens = 12
    first_blocks = list(kv.block_ids("r0"))
    kv.release(first)
    assert kv.pool.num_used == 0 and kv.pool.num_cached == 3
    again = _req(1, list(range(10, 22)))  # the same prompt: the last block is recomputed
    hit = kv.lookup(again)
    assert hit.num_tokens(4) == 8
    longer = _req(2, list(range(10, 23)))
    assert kv.lookup(longer).num_tokens(4) == 12
    assert kv.admit(longer, kv.lookup(longer), 13)
    assert kv.block_ids("r2")[:3] == first_blocks and kv.pool.num_used == 4
    assert kv.stats.queries == 12 + 13 and kv.stats.hits == 12
    kv.check_invariant()
    kv.free("r2")
    kv.reset_prefix_cache()
    assert kv.pool.num_cached == 0 and list(kv.tree.walk()) == []
    kv.check_invariant()


def test_host_tier_round_trip_and_slot_lru():
    kv = torch.arange(2 * 2 * 6 * 4 * 1 * 3, dtype=torch.float32).reshape(2, 2, 6, 4, 1, 3)
    tier = HostKVTier(kv, num_slots=3)
    assert tier.synchronous and tier.block_bytes == 2 * 2 * 4 * 3 * 4
    original = kv.clone()
    tier.save([4, 1], [0, 1]).wait()
    kv.zero_()
    tier.load([1, 0], [0, 5])
    assert torch.equal(kv[:, :, 0], original[:, :, 1]) and torch.equal(kv[:, :, 5], original[:, :, 4])
    assert _runs([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    slots = SlotLRU(2)
    assert slots.put("a") == (0, None) and slots.put("b") == (1, None)
    slots.get("a")
    assert slots.put("c") == (1, "b")  # b was the least recently used
    with pytest.raises(ValueError):
        HostKVTier(torch.zeros(2, 6, 4), 1)


# ---- the state machine ------------------------------------------------------------------------------
class DelayedTier(HostKVTier):
    """A host tier whose saves read the device only when they complete, a few polls after they were
    issued (as a copy on another stream would): a block reused before its save is done would be
    copied wrong, and the content checks would see it. A load runs the saves issued before it (one
    copy stream orders them)."""

    def __init__(self, kv, num_slots, delay):
        super().__init__(kv, num_slots)
        self.delay = delay
        self.jobs: list[_Job] = []

    @property
    def synchronous(self) -> bool:
        return False

    def save(self, blocks, slots):
        job = _Job(self, list(blocks), list(slots), self.delay)
        self.jobs.append(job)
        return job

    def load(self, slots, blocks):
        for job in self.jobs:
            job.run()
        self.jobs = []
        HostKVTier.load(self, slots, blocks)
        return HostKVTier.load(self, slots, blocks)


class _Job:
    def __init__(self, tier, blocks, slots, delay):
        self.tier, self.blocks, self.slots, self.left, self.ran = tier, blocks, slots, delay, False

    def run(self):
        if not self.ran:
            self.ran = True
            HostKVTier.save(self.tier, self.blocks, self.slots)

    def done(self):
        if self.left > 0:
            self.left -= 1
            return False
        self.run()
        return True

    def wait(self):
        self.left = 0
        self.run()


SYSTEM_PROMPTS = [list(range(11, 23)), [11, 12, 13, 20, 21, 22, 23, 24, 25, 26], list(range(30, 46))]


class PrefixCacheMachine(RuleBasedStateMachine):
    """The engine's loop over the real scheduler and KV manager, with async scheduling's pending
    tokens, stops, aborts, preemption (overcommitted admission), eviction, a host tier and a disk tier
    behind it (few slots, a small per-step budget: spills, disk-slot eviction and truncated hits)."""

    @initialize(num_blocks=st.integers(8, 20), block_size=st.sampled_from([1, 2, 2, 4]),
                budget=st.integers(1, 24), ratio=st.sampled_from([1.0, 3.0]),
                host=st.sampled_from(["none", "sync", "delayed", "delayed"]), host_slots=st.integers(1, 48),
                delay=st.integers(0, 3), disk_slots=st.sampled_from([0, 0, 1, 3, 12, 40]),
                disk_budget=st.sampled_from([1, 2, 100]))
    def setup(self, num_blocks, block_size, budget, ratio, host, host_slots, delay, disk_slots, disk_budget):
        self.bs = block_size
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
        # The simulated KV: K holds the token at each slot, V its position.
        self.cache = torch.full((1, 2, num_blocks, block_size, 1, 1), -1, dtype=torch.int64)
        disk_slots = disk_slots if host != "none" else 0
        if disk_slots:
            host_slots = 1 + host_slots % 4  # a small host tier spills often
        if host == "sync":
            self.kv.attach_host_tier(HostKVTier(self.cache, host_slots))
        elif host == "delayed":
            self.kv.attach_host_tier(DelayedTier(self.cache, host_slots, delay))
        self.disk = None
        if disk_slots:
            self.disk = DiskKVTier(self.kv.host, disk_slots, bytes_per_step=disk_budget * self.kv.host.block_bytes)
            self.kv.attach_disk_tier(self.disk)
        self.sched = Scheduler(SchedulerConfig(budget, 4, ratio, max_deferred=3), self.kv)
        self.capacity = num_blocks * block_size
        self.truth: dict[Request, list[int]] = {}  # every token's real value (pending ones included)
        self.inflight: list[Request] = []
        self.ids = itertools.count()

    @rule(system=st.integers(0, len(SYSTEM_PROMPTS) - 1), cut=st.integers(1, 16),
          suffix=st.lists(st.integers(40, 42), max_size=5), max_tokens=st.integers(1, 6))
    def add(self, system, cut, suffix, max_tokens):
        self.add_prompt(SYSTEM_PROMPTS[system][:cut] + suffix, max_tokens)

    @rule(tokens=st.lists(st.integers(100, 999), min_size=1, max_size=12))
    def add_unrelated(self, tokens):
        """A prompt sharing nothing: it pushes cached blocks out of the device (to the host tier)."""
        self.add_prompt(tokens, 2)

    @precondition(lambda self: any(r.status.finished for r in self.truth))
    @rule(pick=st.integers(0, 100), extra=st.lists(st.integers(40, 42), min_size=1, max_size=3))
    def next_round(self, pick, extra):
        """A conversation's next turn: an earlier request's prompt and answer, then new tokens."""
        done = [r for r in self.truth if r.status.finished]
        self.add_prompt(self.truth[done[pick % len(done)]] + extra, 3)

    @rule(count=st.integers(1, 6), stop_at=st.integers(0, 7))
    def steps(self, count, stop_at):
        for _ in range(count):
            self.step(stop_at)

    def add_prompt(self, prompt, max_tokens):
        if len(prompt) + max_tokens <= self.capacity:  # the engine rejects the others at add_request
            req = _req(next(self.ids), prompt, max_tokens)
            self.truth[req] = list(prompt)
            self.sched.add(req)

    def step(self, stop_at):
        out = self.sched.schedule()
        assert out.num_tokens <= self.sched.config.token_budget
        for req, n in out.scheduled:
            self._check_and_write(req, n)
        sampling = []
        for req, n in out.scheduled:  # what LLMEngine._launch does
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:
                sampling.append(req)
        for req in sampling:
            self.truth[req].append(40 + len(self.truth[req]) % 3)  # outputs repeat: output blocks can match
            req.output_token_ids.append(PENDING_TOKEN)
            req.num_pending_tokens += 1
            if len(req.output_token_ids) >= req.max_tokens:
                self.sched.finish(req, RequestStatus.FINISHED_LENGTH)
        previous, self.inflight = self.inflight, sampling
        for req in previous:  # what LLMEngine._process / _accept_token do, one step late
            if req.num_pending_tokens == 0:
                continue
            num_out = len(req.output_token_ids) - req.num_pending_tokens + 1
            req.output_token_ids[num_out - 1] = self.truth[req][req.num_prompt_tokens + num_out - 1]
            req.num_pending_tokens -= 1
            if num_out == stop_at:  # a stop token: later tokens are dropped
                if not req.status.finished:
                    self.sched.finish(req, RequestStatus.FINISHED_STOPPED)
                req.status = RequestStatus.FINISHED_STOPPED
                del req.output_token_ids[num_out:]
                del self.truth[req][req.num_prompt_tokens + num_out:]
                req.num_pending_tokens = 0

    def _check_and_write(self, req: Request, n: int) -> None:
        table = self.kv.block_ids(req.request_id)
        start = req.num_computed_tokens
        assert len(table) * self.bs >= start + n
        truth = self.truth[req]
        for pos in range(start):  # the KV already in place (cached prefix or earlier chunks)
            b, off = table[pos // self.bs], pos % self.bs
            assert self.cache[0, 0, b, off, 0, 0].item() == truth[pos], (req.request_id, pos)
            assert self.cache[0, 1, b, off, 0, 0].item() == pos
        for pos in range(start, start + n):
            b, off = table[pos // self.bs], pos % self.bs
            self.cache[0, 0, b, off, 0, 0] = truth[pos]
            self.cache[0, 1, b, off, 0, 0] = pos

    @precondition(lambda self: self.sched.running or self.sched.waiting)
    @rule(pick=st.integers(0, 100))
    def abort(self, pick):
        live = self.sched.running + list(self.sched.waiting)
        req = live[pick % len(live)]
        self.sched.finish(req, RequestStatus.FINISHED_ABORTED)
        req.num_pending_tokens = 0

    @rule()
    def reset(self):
        self.kv.reset_prefix_cache()

    @invariant()
    def accounting_holds(self):
        self.sched.check_invariants()

    def teardown(self):
        for _ in range(500):
            if not self.sched.has_unfinished():
                break
            self.step(stop_at=0)
        assert not self.sched.has_unfinished(), "a request starved"
        self.step(stop_at=0)  # resolve the last pending tokens
        self.kv.drain()
        self.sched.check_invariants()
        assert self.kv.pool.num_used == 0
        self.kv.reset_prefix_cache()
        assert self.kv.pool.num_cached == 0 and list(self.kv.tree.walk()) == []
        assert self.kv.num_host_slots_used == 0
        self.kv.check_invariant()
        if self.disk is not None:
            assert self.disk.num_used == 0
            self.disk.close()


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])


def test_disk_read_waits_for_a_save_a_queued_save_hid():
    """Found by the state machine in CI (2026-12-07): a host slot with a save in flight was taken for a
    queued save (which marks the slot 'not issued') and then for a disk read; the read did not wait for
    the earlier save, which then landed on the bytes just read, and the device got the wrong block."""
    m = PrefixCacheMachine()
    m.setup(num_blocks=8, block_size=2, budget=3, ratio=1.0, host="delayed", host_slots=4, delay=3,
            disk_slots=1, disk_budget=1)
    for _ in range(5):
        m.add_unrelated(tokens=[100])
    m.add(cut=2, max_tokens=1, suffix=[], system=0)
    m.add(cut=8, max_tokens=2, suffix=[40], system=2)
    m.add_unrelated(tokens=[100])
    m.add_unrelated(tokens=[100, 100])
    m.add(cut=3, max_tokens=1, suffix=[], system=0)
    m.accounting_holds()
    m.teardown()
