"""Engine configuration: one typed dataclass, a docstring per field (the CLI turns them into --help)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "half": torch.float16}


@dataclass
class EngineConfig:
    model: str = "default"
    """A local Hugging Face directory, a dummy preset name (llama-3-8b, ...), or 'default' (built-in tiny model)."""
    load_format: str = "auto"
    """'auto' (safetensors from the directory; random weights for presets), 'safetensors', or 'dummy'."""
    tokenizer: str | None = None
    """Tokenizer directory, or 'default' for the built-in one; defaults to the model directory (built-in for presets)."""
    dtype: str = "auto"
    """'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16', 'float16' or 'float32'."""
    device: str = "auto"
    """'auto' (cuda when available), 'cuda', 'cuda:N' or 'cpu'."""
    seed: int = 0
    """Seed of dummy weights and of unseeded sampling."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; defaults to the model's max_position_embeddings."""
    max_num_batched_tokens: int | None = None
    """Token budget of one dense batch (decode tokens + prefill chunks); default 2048 on GPU, 512 on CPU."""
    max_num_seqs: int = 1024
    """Most requests running at once."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_dtype: str = "auto"
    """'auto' (the model's dtype) or 'fp8' (float8 e4m3, scale 1.0, saturating: half the KV bytes and
    twice the cache; results differ slightly from bf16, as with vLLM's --kv-cache-dtype fp8)."""
    num_kv_blocks: int | None = None
    """KV blocks to allocate; default from gpu_memory_utilization on GPU, cpu_kv_cache_gb on CPU."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory for weights + activations + KV cache."""
    cpu_kv_cache_gb: float = 1.0
    """KV-cache size on CPU, in GiB."""
    kv_admission_ratio: float = 1.0
    """Admit a waiting request while the projected KV use of all running requests (prompt + max_tokens)
    stays under this fraction of the cache. Above 1.0 overcommits and relies on preemption."""
    kv_admission: str = "reserve"
    """How projected KV use is counted for admission: 'reserve' (every running request at prompt +
    max_tokens at once) or 'peak' (NanoFlow's rule: the peak over future steps, with requests freeing
    their blocks as they reach max_tokens; admits more when requests are at different stages)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks whose token prefix an earlier request computed (the cached prefix
    skips its prefill); --no-enable-prefix-caching turns it off."""
    kv_host_gb: float = 0.0
    """Host-memory (pinned) tier behind the KV cache, in GiB: cached blocks are also copied there when
    released, and a hit there is copied back instead of recomputed (0: no host tier). Needs prefix caching."""
    kv_disk_gb: float = 0.0
    """Disk tier behind the host tier, in GiB (0: none): a block the host tier evicts is written to one
    preallocated file, and a hit there is read back through a host slot instead of recomputed. Needs
    kv_host_gb > 0."""
    kv_disk_dir: str | None = None
    """Directory of the disk tier's file (created if missing; the file is deleted at shutdown); defaults
    to a new temporary directory under the system's temp dir, removed at shutdown (where that is a
    tmpfs, the file takes RAM: point this at a real disk)."""
    use_triton: str = "auto"
    """'auto' (Triton kernels on CUDA), 'on' or 'off' (torch reference kernels)."""
    enforce_eager: bool = False
    """Disable CUDA graphs."""
    async_scheduling: bool = True
    """Form step i+1 on the CPU while the GPU runs step i (CUDA only)."""
    plan: str = "sequential"
    """Pipeline plan: 'sequential', 'auto' (cached plan from `nanoflow tune`), or a plan JSON file."""
    plan_choice: str = "measured"
    """Which steps a non-sequential plan runs: 'predicted' (where the tune profile, else the fixed rates
    and the plan's min_attn_share, predict it wins) or 'measured' (those, kept only where timed steps of
    the same shape confirm the win)."""
    max_waiting_requests: int = 100_000
    """Bound of the waiting queue (in sequences: a request with n = 4 takes 4 places); add_request raises
    QueueFullError past it."""
    max_seqs_per_request: int = 256
    """Most sequences one request may make: n in add_request (ValueError above it); the server also
    bounds prompts x n of one HTTP request by it. Bounds what a single request can make the engine allocate."""
    tensor_parallel_size: int = 1
    """Ranks (GPUs, one process each) the model is split over: NCCL on CUDA, gloo on CPU. Ranks 1..N-1
    are launched from this process, or joined from torchrun's environment (WORLD_SIZE, RANK, ...)."""
    tp_collective_max_ctas: int | None = None
    """NCCL: most CTAs (about SMs) a collective may use (ProcessGroupNCCL config.max_ctas), leaving the
    rest to GEMMs it overlaps; None = NCCL's own choice. No effect on gloo (CPU)."""
    tp_timeout_s: float = 600.0
    """Seconds a rank waits for the others in a collective (or at start-up) before failing."""

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.plan_choice not in ("measured", "predicted"):
            raise ValueError(f"plan_choice must be measured or predicted, got {self.plan_choice!r}")
        if self.use_triton not in ("auto", "on", "off"):
            raise ValueError(f"use_triton must be auto, on or off, got {self.use_triton!r}")
        for name in ("max_num_batched_tokens", "max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        for name in ("max_waiting_requests", "max_seqs_per_request"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.kv_host_gb >= 0:
            raise ValueError(f"kv_host_gb must be >= 0, got {self.kv_host_gb}")
        if self.kv_host_gb > 0 and not self.enable_prefix_caching:
            raise ValueError("kv_host_gb needs prefix caching (drop --no-enable-prefix-caching)")
        if not self.kv_disk_gb >= 0:
            raise ValueError(f"kv_disk_gb must be >= 0, got {self.kv_disk_gb}")
        if self.kv_disk_gb > 0 and not self.enable_prefix_caching:
            raise ValueError("kv_disk_gb needs prefix caching (drop --no-enable-prefix-caching)")
        if self.kv_disk_gb > 0 and not self.kv_host_gb > 0:
            raise ValueError("kv_disk_gb needs the host tier in front of it: pass --kv-host-gb > 0 too")
        if self.kv_disk_dir is not None and not self.kv_disk_gb > 0:
            raise ValueError("kv_disk_dir is set but the disk tier is off: pass --kv-disk-gb > 0 too")
        if self.kv_admission_ratio <= 0:
            raise ValueError(f"kv_admission_ratio must be positive, got {self.kv_admission_ratio}")
        if self.kv_admission not in ("reserve", "peak"):
            raise ValueError(f"kv_admission must be 'reserve' or 'peak', got {self.kv_admission!r}")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        ctas = self.tp_collective_max_ctas
        if ctas is not None and (isinstance(ctas, bool) or not isinstance(ctas, int) or ctas < 1):
            raise ValueError(f"tp_collective_max_ctas must be None or a positive integer, got {ctas!r}")
        timeout = self.tp_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"tp_timeout_s must be a positive number of seconds, got {timeout!r}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device, model_dtype: str | None = None) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        checkpoint = _DTYPES.get(model_dtype or "", torch.bfloat16)
        return torch.bfloat16 if checkpoint == torch.float32 else checkpoint  # fp32 checkpoints serve in bf16

    def resolved_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.kv_cache_dtype == "auto" else torch.float8_e4m3fn

    def resolved_token_budget(self, device: torch.device) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 2048 if device.type == "cuda" else 512

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
