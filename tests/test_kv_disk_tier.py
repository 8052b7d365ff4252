"""The disk tier behind the host tier: greedy tokens unchanged when hits come back from disk (tiny
checkpoint, CPU), exact byte round trips for bf16 / fp32 / fp8 blocks, the disk-slot LRU under a
property test, the per-step budget, config validation, and the file's removal at shutdown."""
from __future__ import annotations

import errno
import gc
import os
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow import LLM, EngineConfig
from nanoflow.engine import kv_disk_tier
from nanoflow.engine.kv_cache import KVCacheManager
from nanoflow.engine.kv_disk_tier import DiskKVFile, DiskKVTier
from nanoflow.engine.slot_lru import SlotLRU
from nanoflow.engine.kv_host_tier import HostKVTier
from nanoflow.engine.prefix_cache import Node, PrefixHit
from nanoflow.engine_args import engine_config_from_args
from nanoflow.entrypoints.cli import build_parser
from tests.test_prefix_cache import DelayedTier, _req
from tests.test_engine_prefix import BASE, _idle_and_clean, _shared_prompts, _tokens
from tests.tiny_checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("disk"))


# ---- end to end -------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_kv_blocks, budget", [(40, 512), (30, 6)])
def test_disk_tier_hits_give_the_uncached_tokens(ckpt, tmp_path, num_kv_blocks, budget):
    """A host tier of 26 slots (fewer than the prompts' cached blocks) spills to disk; the third and
    later rounds find evicted prefixes there, read them back and skip their prefill."""
    reference = _tokens(LLM(model=str(ckpt), num_kv_blocks=256, enable_prefix_caching=False, **BASE),
                        _shared_prompts())
    llm = LLM(model=str(ckpt), num_kv_blocks=num_kv_blocks, kv_host_gb=0.00005, kv_disk_gb=0.001,
              kv_disk_dir=str(tmp_path / "kv"), kv_admission_ratio=2.0, max_num_batched_tokens=budget, **BASE)
    stats = llm.engine.stats()
    assert stats.kv_host_blocks_total == 26 and stats.kv_disk_blocks_total > 0
    for _ in range(3):
        assert _tokens(llm, _shared_prompts()) == reference
    stats = llm.engine.stats()
    assert stats.kv_disk_blocks_written > 0 and stats.kv_disk_blocks_read > 0
    assert stats.prefix_cache_disk_hits == stats.kv_disk_blocks_read * 4
    assert stats.kv_host_blocks_loaded >= stats.kv_disk_blocks_read
    _idle_and_clean(llm)
    llm.engine.reset_prefix_cache()
    assert llm.engine.stats().kv_disk_blocks_used == 0
    llm.engine.check_kv_invariant()
    llm.engine.shutdown()


def test_bench_line_reports_the_disk_tier():
    from nanoflow.bench.conversations import KV_COUNTERS, format_kv_reuse
    kv = dict.fromkeys(KV_COUNTERS, 0) | dict(prompt_tokens=100, prefill_fraction=0.5, prefix_cache_hit_rate=0.5,
                                              kv_host_blocks_saved=7, kv_host_blocks_loaded=3,
                                              prefix_cache_disk_hits=8, kv_disk_blocks_written=5,
                                              kv_disk_blocks_read=2)
    line = format_kv_reuse("x", kv)
    assert "blocks saved, 3 loaded; disk tier: 8 hit tokens, 5 blocks written, 2 read" in line
    assert "disk tier" not in format_kv_reuse("x", kv | dict(kv_disk_blocks_written=0, kv_disk_blocks_read=0))


# ---- bytes ------------------------------------------------------------------------------------------
def _random_kv(dtype: torch.dtype, blocks: int = 5) -> torch.Tensor:
    """[layers, 2, blocks, block_size, heads, dim] with random bytes (every bit pattern: NaNs too)."""
    shape = (2, 2, blocks, 4, 2, 8)
    raw = torch.randint(0, 256, (torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    return raw.view(dtype).view(shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_blocks_round_trip_through_disk_bytewise(dtype, tmp_path):
    kv = _random_kv(dtype)
    original = kv.view(torch.uint8).clone()
    host = HostKVTier(kv, num_slots=2)
    disk = DiskKVTier(host, num_slots=3, directory=str(tmp_path))
    nodes = [Node((i,), None) for i in range(3)]
    for node, block in zip(nodes, [4, 0, 2]):  # device -> host slot 0 -> disk
        host.save([block], [0]).wait()
        assert disk.spill(node, 0) is None and node.disk_slot is not None
    host.buffer.zero_()
    kv.view(torch.uint8).zero_()
    for slot, (node, block) in enumerate(zip(nodes[:2], [1, 3])):  # disk -> host -> other device blocks
        disk.read(node, slot)
        host.load([slot], [block])
    disk.read(nodes[2], 0)
    host.load([0], [4])
    got = kv.view(torch.uint8)
    assert torch.equal(got[:, :, 1], original[:, :, 4]) and torch.equal(got[:, :, 3], original[:, :, 0])
    assert torch.equal(got[:, :, 4], original[:, :, 2])
    assert disk.blocks_written == 3 and disk.blocks_read == 3
    disk.close()


def test_a_disk_read_waits_for_the_save_still_filling_its_host_slot(tmp_path):
    """Host slot 0 is being filled by Y's save (a copy in flight) when a disk hit of X takes it: the
    read must wait for that copy, or the copy lands over X's bytes and the load gives Y's KV."""
    kv = KVCacheManager(4, 2, enable_prefix_caching=True)
    cache = torch.full((1, 2, 4, 2, 1, 1), -1, dtype=torch.int64)
    kv.attach_host_tier(DelayedTier(cache, 1, delay=3))
    kv.attach_disk_tier(disk := DiskKVTier(kv.host, 4, directory=str(tmp_path)))

    def run(i, prompt):
        req = _req(i, prompt)
        assert kv.admit(req, kv.lookup(req), len(prompt))
        for pos, token in enumerate(prompt):
            cache[0, 0, kv.block_ids(req.request_id)[pos // 2], pos % 2, 0, 0] = token
        req.num_computed_tokens = len(prompt)
        kv.release(req)
        kv.flush()

    run(0, [1, 2, 3])
    kv.drain()  # X's block [1, 2] is in host slot 0
    run(1, [5, 6, 7])  # Y's save takes slot 0 (X goes to disk); the copy is still in flight
    assert disk.num_used == 1 and kv.num_host_slots_used == 1
    kv.allocate("z", 6)  # evicts X's device block: X is on disk only
    kv.free("z")
    again = _req(2, [1, 2, 3])
    hit = kv.lookup(again)
    assert hit.num_disk == 1 and kv.admit(again, hit, 3)
    assert cache[0, 0, kv.block_ids("r2")[0], :, 0, 0].tolist() == [1, 2]
    assert disk.blocks_read == 1 and kv.stats.disk_hits == 2
    kv.free("r2")
    kv.drain()
    kv.check_invariant()
    disk.close()


# ---- the slot LRU (host and disk tiers) ------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 6),
       ops=st.lists(st.tuples(st.sampled_from(["put", "get", "forget"]), st.integers(0, 12)), max_size=60))
def test_disk_slot_lru_keeps_capacity_and_forgets_evicted_keys(capacity, ops):
    slots = SlotLRU(capacity)
    model: list[int] = []  # keys, least recently used first
    where: dict[int, int] = {}
    for op, key in ops:
        if op == "put" and key not in model:
            slot, evicted = slots.put(key)
            expected = model.pop(0) if len(model) == capacity else None
            assert evicted == expected
            if evicted is not None:
                assert slots.get(evicted) is None and evicted not in slots  # a lookup after eviction misses
                assert slot == where.pop(evicted)  # the evicted key's slot is the one reused
            model.append(key)
            where[key] = slot
        elif op == "get":
            assert slots.get(key) == where.get(key)
            if key in model:
                model.remove(key)
                model.append(key)
        elif op == "forget" and key in model:
            slots.forget(key)
            model.remove(key)
            del where[key]
            assert slots.get(key) is None
        assert len(slots) == len(model) <= capacity
        assert [k for k, _ in slots.items()] == model
        assert slots.victim() == (model[0] if len(model) == capacity else None)
        used = [s for _, s in slots.items()]
        assert len(set(used)) == len(used) and set(used) <= set(range(capacity))
        assert sorted(used + slots._free) == list(range(capacity))  # no slot leaked or doubled
    with pytest.raises(KeyError):
        slots.put(next(iter(model))) if model else slots.forget("absent")


def test_budget_bounds_writes_and_reads_per_step(tmp_path):
    kv = _random_kv(torch.float32)
    host = HostKVTier(kv, num_slots=1)
    disk = DiskKVTier(host, num_slots=4, directory=str(tmp_path), bytes_per_step=2 * host.block_bytes)
    assert disk.blocks_per_step == 2
    nodes = [Node((i,), None) for i in range(4)]
    spilled = [disk.spill(n, 0) is None and n.disk_slot is not None for n in nodes[:3]]
    assert spilled == [True, True, False] and disk.blocks_written == 2  # the third is forgotten
    disk.new_step()
    assert disk.spill(nodes[2], 0) is None and disk.spill(nodes[3], 0) is None  # the last free slots
    hit = PrefixHit(nodes[:3], num_disk=3)
    disk.new_step()
    cut = disk.within_budget(hit)
    assert cut.nodes == nodes[:2] and cut.num_disk == 2 and cut.num_host == 0
    disk.read(nodes[0], 0)  # now the most recently used
    assert disk.within_budget(hit).nodes == nodes[:1]
    # The disk is full: a write takes the LRU slot (nodes[1]'s), unless that block is about to be read.
    disk.new_step()
    extra = Node((9,), None)
    assert disk.spill(extra, 0, keep={nodes[1]}) is None and extra.disk_slot is None
    assert disk.spill(extra, 0) is nodes[1] and nodes[1].disk_slot is None and extra.disk_slot is not None
    disk.clear()
    assert disk.num_used == 0 and all(n.disk_slot is None for n in nodes + [extra])
    disk.close()


# ---- configuration ----------------------------------------------------------------------------------
def test_config_validation_and_flags(tmp_path):
    cfg = engine_config_from_args(build_parser().parse_args(
        ["generate", "x", "--kv-host-gb", "1", "--kv-disk-gb", "4", "--kv-disk-dir", str(tmp_path)]))
    assert cfg.kv_disk_gb == 4.0 and cfg.kv_disk_dir == str(tmp_path)
    assert EngineConfig().kv_disk_gb == 0 and EngineConfig().kv_disk_dir is None
    with pytest.raises(ValueError, match="kv_disk_gb must be >= 0"):
        EngineConfig(kv_host_gb=1, kv_disk_gb=-1)
    with pytest.raises(ValueError, match="--kv-host-gb"):
        EngineConfig(kv_disk_gb=1)
    with pytest.raises(ValueError, match="prefix caching"):
        EngineConfig(kv_disk_gb=1, kv_host_gb=1, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_disk_dir is set"):
        EngineConfig(kv_host_gb=1, kv_disk_dir=str(tmp_path))


def test_unusable_directories_are_named(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=re.escape(f"kv_disk_dir '{a_file / 'sub'}' cannot be created")):
        DiskKVFile((4,), torch.int32, 2, str(a_file / "sub"))
    monkeypatch.setattr(kv_disk_tier.shutil, "disk_usage", lambda d: SimpleNamespace(total=100, used=0, free=100))
    with pytest.raises(ValueError, match=re.escape(f"kv_disk_dir '{tmp_path}' has 0.000 GiB free")):
        DiskKVFile((1024,), torch.int32, 2, str(tmp_path))
    monkeypatch.undo()

    def no_space(fd, nbytes):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(kv_disk_tier, "_preallocate", no_space)
    with pytest.raises(ValueError, match=re.escape(f"kv_disk_dir '{tmp_path}'") + ".*No space left"):
        DiskKVFile((4,), torch.int32, 2, str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # the partial file is gone


def test_engine_rejects_a_disk_tier_without_a_block(ckpt):
    with pytest.raises(ValueError, match="kv_disk_gb 1e-09 holds no KV block"):
        LLM(model=str(ckpt), num_kv_blocks=16, kv_host_gb=0.0001, kv_disk_gb=1e-9, **BASE)


# ---- cleanup ----------------------------------------------------------------------------------------
def test_shutdown_removes_the_file_and_the_default_directory(ckpt, tmp_path):
    llm = LLM(model=str(ckpt), num_kv_blocks=16, kv_host_gb=0.0001, kv_disk_gb=0.001, **BASE)
    file = llm.engine.kv.disk.file
    assert file.owns_directory and os.path.isfile(file.path)
    assert os.path.dirname(file.path) == file.directory
    assert os.path.getsize(file.path) == file.nbytes == llm.engine.stats().kv_disk_blocks_total * 2048
    llm.engine.shutdown()
    assert not os.path.exists(file.path) and not os.path.exists(file.directory)

    mine = tmp_path / "kv"
    llm = LLM(model=str(ckpt), num_kv_blocks=16, kv_host_gb=0.0001, kv_disk_gb=0.001, kv_disk_dir=str(mine), **BASE)
    path = llm.engine.kv.disk.file.path
    assert os.path.dirname(path) == str(mine)
    llm.engine.shutdown()
    assert not os.path.exists(path) and mine.is_dir()  # a directory we were given stays

    orphan = DiskKVFile((4,), torch.int32, 2, None)  # no shutdown: garbage collection removes it
    path, directory = orphan.path, orphan.directory
    del orphan
    gc.collect()
    assert not os.path.exists(path) and not os.path.exists(directory)
