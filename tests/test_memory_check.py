"""The memory check: an engine that cannot fit fails at once, naming what it needs and what the device
has, instead of being OOM-killed minutes later; the estimate matches what the engine allocates."""
from __future__ import annotations

import time

import pytest
import torch

from nanoflow import memory_check
from nanoflow.config import EngineConfig
from nanoflow.engine.engine import LLMEngine
from nanoflow.memory_check import (GIB, InsufficientMemoryError, check_kv_budget, check_model_fits,
                                   estimate_need, host_available_bytes)
from nanoflow.models.loader import load_model
from nanoflow.models.presets import PRESETS

CPU = torch.device("cpu")


@pytest.fixture
def host_ram(monkeypatch):
    """Pretend the host has `n` bytes available (never let a test allocate a real 8B model)."""
    monkeypatch.delenv(memory_check.SKIP_ENV, raising=False)

    def set_available(n: int) -> None:
        monkeypatch.setattr(memory_check, "host_available_bytes", lambda meminfo="/proc/meminfo": n)
    return set_available


def test_host_available_bytes_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683772 kB\nMemFree:        21053216 kB\nMemAvailable:   22163832 kB\n")
    assert host_available_bytes(meminfo) == 22163832 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    assert host_available_bytes(meminfo) is None
    assert host_available_bytes(tmp_path / "absent") is None


def test_8b_in_fp32_on_a_24gb_cpu_fails_at_once_naming_both_numbers(host_ram):
    host_ram(22 * GIB)
    t0 = time.perf_counter()
    with pytest.raises(InsufficientMemoryError) as info:
        LLMEngine(EngineConfig(model="llama-3-8b", load_format="dummy", device="cpu"))
    assert time.perf_counter() - t0 < 30  # no weights were allocated (that alone took minutes)
    message = str(info.value)
    weights = PRESETS["llama-3-8b"].num_parameters() * 4 / GIB
    assert f"weights {weights:.1f} GiB" in message and "float32" in message   # what it needs
    assert "22.0 GiB available host RAM" in message                            # what the device has
    assert "--dtype bfloat16" in message and "fits" in message                 # what to do
    assert isinstance(info.value, ValueError) and isinstance(info.value, MemoryError)


def test_cli_reports_it_as_an_error_line(host_ram, capsys):
    from nanoflow.entrypoints.cli import main
    host_ram(22 * GIB)
    assert main(["generate", "hi", "--model", "llama-3-8b", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'llama-3-8b' in float32 needs ") and "22.0 GiB" in err


def test_bf16_fits_where_fp32_does_not(host_ram):
    cfg = PRESETS["llama-3-8b"]
    need32 = estimate_need(EngineConfig(model="llama-3-8b"), cfg, CPU, torch.float32)
    need16 = estimate_need(EngineConfig(model="llama-3-8b"), cfg, CPU, torch.bfloat16)
    assert need16.weights * 2 == need32.weights
    host_ram(need16.total + GIB)
    assert check_model_fits(EngineConfig(model="llama-3-8b"), cfg, CPU, torch.bfloat16) == need16
    with pytest.raises(InsufficientMemoryError):
        check_model_fits(EngineConfig(model="llama-3-8b"), cfg, CPU, torch.float32)


def test_kv_cache_counts_and_the_hint_to_lower_it(host_ram):
    cfg = PRESETS["default"]
    config = EngineConfig(cpu_kv_cache_gb=8.0)
    need = estimate_need(config, cfg, CPU, torch.float32)
    assert need.kv_cache > 7.9 * GIB
    host_ram(need.total - 1)
    with pytest.raises(InsufficientMemoryError, match=r"KV cache 8\.0 GiB.*--cpu-kv-cache-gb, now 8"):
        check_model_fits(config, cfg, CPU, torch.float32)


def test_skip_environment_variable(host_ram, monkeypatch):
    host_ram(1)
    with pytest.raises(InsufficientMemoryError, match=memory_check.SKIP_ENV):
        check_model_fits(EngineConfig(), PRESETS["default"], CPU, torch.float32)
    monkeypatch.setenv(memory_check.SKIP_ENV, "1")
    check_model_fits(EngineConfig(), PRESETS["default"], CPU, torch.float32)


def test_estimate_matches_what_the_engine_allocates():
    config = EngineConfig(device="cpu", cpu_kv_cache_gb=0.05)
    engine = LLMEngine(config, stream_text=False)
    need = estimate_need(config, engine.model_config, CPU, engine.model.dtype)
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv = sum(t.numel() * t.element_size() for pair in engine.runner.kv_caches for t in pair)
    workspace = sum(t.numel() * t.element_size() for t in vars(engine.runner.workspace).values()
                    if isinstance(t, torch.Tensor))
    assert need.weights == weights and need.kv_cache == kv
    assert need.activations >= workspace


def test_load_model_checks_before_allocating(host_ram):
    host_ram(1024)
    with pytest.raises(InsufficientMemoryError, match="1024|0.0 GiB"):
        load_model(EngineConfig(), CPU, torch.float32)


def test_cuda_free_memory_is_what_counts(monkeypatch):
    """The GPU side without a GPU: torch.cuda.mem_get_info faked at 80 GB with 10 GB in use."""
    monkeypatch.delenv(memory_check.SKIP_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    cuda = torch.device("cuda", 0)
    config = EngineConfig(model="llama-3-70b", device="cuda")
    need = check_model_fits(EngineConfig(model="llama-3-8b"), PRESETS["llama-3-8b"], cuda, torch.bfloat16)
    assert need.kv_cache == 0  # sized later from what is left
    with pytest.raises(InsufficientMemoryError) as info:
        check_model_fits(config, PRESETS["llama-3-70b"], cuda, torch.bfloat16)
    message = str(info.value)
    assert "131." in message and "62.0 GiB free on cuda:0 (70.0 GiB free of 80.0 GiB" in message
    assert "gpu_memory_utilization 0.9" in message


def test_kv_budget_message_names_the_numbers():
    check_kv_budget(2.0 * 2**20, 2**20, torch.device("cuda", 0), 70 * GIB, GIB, 0.9)  # one block fits
    with pytest.raises(InsufficientMemoryError, match=r"one block needs 1\.0 MiB.*\(70\.0 GiB, the weights"):
        check_kv_budget(-5.0 * GIB, 2**20, torch.device("cuda", 0), 70 * GIB, GIB, 0.9)
