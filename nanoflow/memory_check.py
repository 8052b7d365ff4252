"""Fail fast when a model cannot fit: before the weights and the KV cache are allocated, compare the bytes
they need with what the device has (MemAvailable of /proc/meminfo on CPU, free memory on CUDA).

Without this check an 8B model in float32 on a 24 GB CPU machine is killed by the kernel's OOM killer
after minutes, with no message. The estimate counts weights, KV cache and the step's activations and
logits; it is a floor (allocator slack and CUDA graphs come on top), so a model that passes may still
run short, but one that fails cannot fit. Set NANOFLOW_SKIP_MEMORY_CHECK=1 to try anyway.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoflow.config import EngineConfig
from nanoflow.models.config import ModelConfig

GIB = 1 << 30
SKIP_ENV = "NANOFLOW_SKIP_MEMORY_CHECK"
"""Environment variable: '1' skips the check (e.g. with swap, or memory the estimate does not see)."""
GPU_ACTIVATION_RESERVE_BYTES = 1 << 30
"""Room kept for activations, logits and sampler temporaries when the KV cache fills a GPU's memory."""
LOGITS_COPIES = 4
"""fp32 logits rows and a few softmax / sampling copies of them."""


class InsufficientMemoryError(MemoryError, ValueError):
    """The weights and KV cache need more memory than the device has (a ValueError too, so the CLI
    reports it as a bad option rather than a crash)."""


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes an engine will allocate on its device."""

    weights: int
    """All parameters in the model's dtype."""
    kv_cache: int
    """The KV cache (0 on CUDA without num_kv_blocks: it is sized afterwards from what is left)."""
    activations: int
    """The step workspace, logits and sampler temporaries (on CUDA: a fixed reserve plus the logits)."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


@dataclass(frozen=True)
class DeviceMemory:
    """What the device can give."""

    available: int
    """Bytes the engine may use: MemAvailable on CPU; on CUDA the free memory, capped by
    gpu_memory_utilization * total - used."""
    description: str
    """Where the figure comes from, for messages."""


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def host_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where the file or the field is absent: not Linux)."""
    try:
        text = Path(meminfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024  # the file's unit is kB (KiB)
    return None


def device_memory(device: torch.device, gpu_memory_utilization: float = 1.0) -> DeviceMemory | None:
    """What `device` has for the engine, or None where that cannot be known (then nothing is checked)."""
    if device.type == "cpu":
        available = host_available_bytes()
        return None if available is None else DeviceMemory(available, "available host RAM (MemAvailable)")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but does not use are free to this process.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = int(total * gpu_memory_utilization) - (total - free) + cached
        return DeviceMemory(max(budget, 0), f"free on {device} ({gib(free)} free of {gib(total)}, "
                                            f"gpu_memory_utilization {gpu_memory_utilization:g})")
    return None


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(model_config: ModelConfig, kv_dtype: torch.dtype) -> int:
    """K and V of one token in every layer."""
    return (2 * model_config.num_hidden_layers * model_config.num_key_value_heads * model_config.head_dim
            * element_size(kv_dtype))


def logits_bytes(model_config: ModelConfig, rows: int) -> int:
    """fp32 logits of `rows` sampled rows and their sampling copies."""
    return LOGITS_COPIES * rows * model_config.vocab_size * 4


def workspace_bytes(model_config: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
    """The step workspace of `tokens` rows (hidden, residual, normed, qkv, q_rot, attn_out, gate_up, act)."""
    h, i = model_config.hidden_size, model_config.intermediate_size
    q = model_config.num_attention_heads * model_config.head_dim
    kv = model_config.num_key_value_heads * model_config.head_dim
    return tokens * (3 * h + (q + 2 * kv) + 2 * q + 3 * i) * element_size(dtype)


def estimate_need(config: EngineConfig, model_config: ModelConfig, device: torch.device,
                  dtype: torch.dtype) -> MemoryNeed:
    """The bytes an engine with `config` allocates for `model_config` in `dtype` on `device`."""
    weights = model_config.num_parameters() * element_size(dtype)
    per_block = kv_bytes_per_token(model_config, config.resolved_kv_dtype(dtype)) * config.block_size
    tokens = config.resolved_token_budget(device)
    if config.num_kv_blocks is not None:
        kv = config.num_kv_blocks * per_block
    elif device.type == "cuda":
        kv = 0  # choose_num_blocks sizes it from what the weights leave
    else:
        kv = max(1, int(config.cpu_kv_cache_gb * GIB) // per_block) * per_block
    if device.type == "cuda":
        activations = GPU_ACTIVATION_RESERVE_BYTES + logits_bytes(model_config, config.max_num_seqs)
    else:
        rows = min(config.max_num_seqs, tokens)
        activations = workspace_bytes(model_config, tokens, dtype) + logits_bytes(model_config, rows)
    return MemoryNeed(weights=weights, kv_cache=kv, activations=activations)


def check_model_fits(config: EngineConfig, model_config: ModelConfig, device: torch.device,
                     dtype: torch.dtype, model_name: str | None = None) -> MemoryNeed:
    """Raises InsufficientMemoryError, naming what is needed, what the device has and what to do,
    when the weights + KV cache + activations cannot fit. Returns the estimate."""
    need = estimate_need(config, model_config, device, dtype)
    if os.environ.get(SKIP_ENV) == "1":
        return need
    have = device_memory(device, config.gpu_memory_utilization)
    if have is None or need.total <= have.available:
        return need
    name = model_name or config.model
    dtype_name = str(dtype).removeprefix("torch.")
    kv_part = f" + KV cache {gib(need.kv_cache)}" if need.kv_cache else ""
    raise InsufficientMemoryError(
        f"model {name!r} in {dtype_name} needs {gib(need.total)} on {device} (weights {gib(need.weights)}"
        f"{kv_part} + activations {gib(need.activations)}), but the device has {gib(have.available)} "
        f"{have.description}. To fix: " + "; ".join(_hints(config, model_config, device, dtype, need, have))
        + f"; or set {SKIP_ENV}=1 to try anyway.")


def _hints(config: EngineConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
           need: MemoryNeed, have: DeviceMemory) -> list[str]:
    hints = []
    if element_size(dtype) > 2:
        half = estimate_need(config.replace(dtype="bfloat16"), model_config, device, torch.bfloat16)
        fits = "fits" if half.total <= have.available else "still too big"
        hints.append(f"use dtype bfloat16 (--dtype bfloat16: {gib(half.total)} in all, {fits})")
    if device.type == "cpu":
        if need.kv_cache * 4 >= need.total or need.total - need.kv_cache < have.available:  # KV matters
            hints.append(f"lower cpu_kv_cache_gb (--cpu-kv-cache-gb, now {config.cpu_kv_cache_gb:g})")
        hints.append("pick a smaller model (the built-in 'default' model runs anywhere)")
        hints.append("run on a GPU")
    else:
        hints.append("free the GPU, raise gpu_memory_utilization, lower max_num_seqs, or use a smaller model "
                     "(or more GPUs, once tensor parallelism lands)")
    return hints


def check_kv_budget(budget: float, per_block: int, device: torch.device, in_use: int,
                    reserve: int, gpu_memory_utilization: float) -> None:
    """choose_num_blocks on CUDA: fail, with the numbers, when not one KV block fits in what is left."""
    if budget >= per_block:
        return
    raise InsufficientMemoryError(
        f"no GPU memory left for the KV cache on {device}: one block needs {per_block / 2**20:.1f} MiB, but "
        f"gpu_memory_utilization {gpu_memory_utilization:g} leaves {gib(max(budget, 0))} after what is in use "
        f"({gib(in_use)}, the weights included) and the activation reserve ({gib(reserve)}). To fix: free "
        "the GPU, raise gpu_memory_utilization, lower max_num_seqs, or use a smaller model.")
