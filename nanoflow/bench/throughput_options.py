"""The options of `nanoflow bench throughput` (ThroughputOptions, checked on construction) and the
record of one timed run (TimedRun) with the figures BENCHMARKING.md asks for."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nanoflow.bench.gemm_peak import GemmPeak
from nanoflow.bench.step_stats import StepStats
from nanoflow.config import EngineConfig

WARMUP_MAX_OUTPUT_TOKENS = 64
"""Warm-up requests generate at most this many tokens (enough to exercise prefill and decode)."""
WARMUP_SEED_OFFSET = 1_000_003
"""Warm-up prompts use seed + this, so they differ from the timed ones."""
BUSY_SHARE_MAX_OUTPUT_TOKENS = 128
"""Requests of the busy-share sample generate at most this many tokens."""
BUSY_SHARE_EVERY = 8
"""The busy-share sample profiles every this-many-th step."""

# EngineConfig fields with a dedicated benchmark flag (engine_args may not set them).
DEDICATED_ENGINE_FIELDS = ("model", "load_format", "dtype", "device", "seed", "max_model_len",
                           "max_num_batched_tokens", "max_num_seqs", "plan")


@dataclass
class ThroughputOptions:
    """Everything `run_throughput` takes (the CLI flags, one to one)."""

    model: str = "default"
    """Model directory, dummy preset name (llama-3-8b, ...) or 'default'."""
    load_format: str = "auto"
    """EngineConfig.load_format."""
    dtype: str = "auto"
    """EngineConfig.dtype."""
    device: str = "auto"
    """EngineConfig.device."""
    workload: str = "constant:512:512"
    """constant:IN:OUT, splitwise, lmsys, sharegpt, a PATH.csv, shared-prefix:SYS:UNIQUE:OUT[:GROUPS] or
    multi-round:TRACE[:ROUNDS] (then num_requests counts conversations)."""
    num_requests: int = 1000
    """Timed requests."""
    seed: int = 0
    """Seed of the request sample, the prompt ids and the engine."""
    max_num_batched_tokens: int | None = None
    """EngineConfig.max_num_batched_tokens (None: the engine's default)."""
    max_num_seqs: int | None = None
    """EngineConfig.max_num_seqs (None: the engine's default)."""
    max_model_len: int | None = None
    """EngineConfig.max_model_len (None: the model's max_position_embeddings)."""
    plan: str = "sequential"
    """EngineConfig.plan of the main run."""
    compare: str | None = None
    """Another plan to run the same requests with, in this process; the ratio plan / compare is reported."""
    compare_prefix_caching: bool = False
    """Also run the same requests with prefix caching off (same engine); the ratio on / off is reported."""
    compare_host_tier: bool = False
    """Also run the same requests with the host KV tier off (same engine; needs kv_host_gb > 0). The disk
    tier sits behind the host tier, so it is off in that run too."""
    compare_kv_admission: bool = False
    """Also run the same requests under the other KV admission rule (same engine): 'peak' when the
    main run uses 'reserve' (the default), else 'reserve'; the ratio main / other is reported."""
    baseline: str | None = None
    """'hf': also run transformers' static batched generate with the same weights."""
    hf_batch_size: int = 64
    """Requests per transformers generate call (left-padded)."""
    hf_num_requests: int = 256
    """The transformers baseline runs the first this-many requests; rates (tokens/s) are compared."""
    warmup_requests: int = 32
    """Requests of an untimed warm-up generate before each timed engine run (0: none)."""
    busy_share_requests: int = 256
    """With --compare on a GPU: after each timed run, an untimed sample of the first this-many requests
    (at most 128 output tokens, run synchronously) with every 8th step under torch.profiler, for the
    GPU's busy share inside a step (0: none)."""
    temperature: float = 1.0
    """Sampling temperature of every request (0: greedy); the HF baseline samples the same way."""
    output_json: str | None = None
    """Write the result JSON here."""
    trace_dir: str | None = None
    """Folder of the trace CSVs (default: $NANOFLOW_TRACE_DIR, else the copies shipped in the package)."""
    engine_args: dict = field(default_factory=dict)
    """Other EngineConfig fields, e.g. {'enforce_eager': True} (the CLI's engine flags)."""
    use_tqdm: bool = True
    """Show a progress bar during the timed run."""
    command: str | None = None
    """The command line to record (run_from_args fills it in)."""

    def __post_init__(self) -> None:
        for name in ("num_requests", "hf_batch_size", "hf_num_requests"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.busy_share_requests, int) or self.busy_share_requests < 0:
            raise ValueError(f"busy_share_requests must be a non-negative integer, got {self.busy_share_requests!r}")
        if not isinstance(self.warmup_requests, int) or self.warmup_requests < 0:
            raise ValueError(f"warmup_requests must be a non-negative integer, got {self.warmup_requests!r}")
        if self.baseline not in (None, "hf"):
            raise ValueError(f"baseline must be 'hf' or None, got {self.baseline!r}")
        if self.baseline == "hf" and self.engine_args.get("tensor_parallel_size", 1) != 1:
            raise ValueError("the transformers baseline runs on one GPU: drop --baseline hf with "
                             "--tensor-parallel-size")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a non-negative number, got {self.temperature!r}")
        if sum([self.compare is not None, bool(self.compare_prefix_caching), bool(self.compare_host_tier),
                bool(self.compare_kv_admission)]) > 1:
            raise ValueError("compare, compare_prefix_caching, compare_host_tier and compare_kv_admission: "
                             "choose one comparison")
        if self.compare_prefix_caching and self.engine_args.get("enable_prefix_caching") is False:
            raise ValueError("compare_prefix_caching compares against caching on: drop --no-enable-prefix-caching")
        if self.compare_host_tier and not self.engine_args.get("kv_host_gb"):
            raise ValueError("compare_host_tier needs a host tier: pass --kv-host-gb")
        clash = sorted(set(self.engine_args) & set(DEDICATED_ENGINE_FIELDS))
        if clash:
            raise ValueError(f"engine_args: set {', '.join(clash)} with its own option")
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(self.engine_args) - known)
        if unknown:
            raise ValueError(f"engine_args: unknown EngineConfig field(s) {', '.join(unknown)}")


@dataclass
class TimedRun:
    """One timed `llm.generate` over the benchmark requests."""

    plan: str
    """The engine's plan."""
    requests: int
    """Requests run."""
    input_tokens: int
    """Prompt tokens of all requests."""
    output_tokens: int
    """Tokens generated (counted from the outputs)."""
    expected_output_tokens: int
    """Sum of the requested output lengths (equal to output_tokens when lengths are exact)."""
    wall_s: float
    """Wall time of the timed region (generate only)."""
    steps: StepStats | None
    """Per-step figures from llm.engine.step_times, or None when the engine does not record them."""
    gemm: GemmPeak
    """The GEMM peak measured right before this run."""
    engine_stats: dict | None
    """llm.engine.stats() after the run."""
    gpu_idle: dict | None = None
    """Device busy vs. idle time between steps (CUDA events around each step), on CUDA."""
    plan_steps: int | None = None
    """Steps of this run under the (non-sequential) plan; the others ran sequentially (predicted or
    measured to lose, see EngineConfig.plan_choice). None when the engine does not count them."""
    plan_choice: dict | None = None
    """Measured plan choice after the run (runner.plan_choice_summary): buckets timed, plan kept / vetoed."""
    host_load: dict | None = None
    """On CPU: CPU seconds of this process and of all others during the timed region (HostLoad)."""
    kv: dict | None = None
    """Prefill tokens computed vs prompt tokens, prefix-cache and host-tier counters of this run."""
    variant: str | None = None
    """What a KV comparison changed in this run ('prefix caching on', 'host tier off', ...)."""
    step_classes: dict | None = None
    """Per step class (decode-only / mixed / prefill-heavy): steps, tokens, step ms, tokens/s
    (bench.step_stats.class_figures); device time on a GPU, host time on CPU."""
    step_timing: str | None = None
    """'device time' (CUDA events around each step) or 'host time'."""
    busy: dict | None = None
    """GPU busy share inside a step per class, from the profiled sample (bench.busy_share)."""
    graphs: list | None = None
    """CUDA-graph mode and graph count per plan of the engine (None without graphs)."""

    def metrics(self, num_params: int, num_gpus: int = 1) -> dict:
        """The figures BENCHMARKING.md asks for, as a flat dict. Tensor parallel over num_gpus GPUs:
        optimal = num_gpus x the one-GPU GEMM peak / (2 x params)."""
        total = (self.input_tokens + self.output_tokens) / self.wall_s
        optimal = num_gpus * self.gemm.tflops * 1e12 / (2 * num_params)
        steady = self.steps.steady_tokens_per_s if self.steps is not None else None
        return {
            "plan": self.plan,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "expected_output_tokens": self.expected_output_tokens,
            "exact_output_lengths": self.output_tokens == self.expected_output_tokens,
            "wall_s": self.wall_s,
            "total_tokens_per_s": total,
            "output_tokens_per_s": self.output_tokens / self.wall_s,
            "requests_per_s": self.requests / self.wall_s,
            "steady_state_total_tokens_per_s": steady,
            "gemm_peak_tflops": self.gemm.tflops,
            "num_gpus": num_gpus,
            "gemm": self.gemm.to_dict(),
            "optimal_tokens_per_s": optimal,
            "pct_of_optimal": 100.0 * total / optimal,
            "steady_state_pct_of_optimal": None if steady is None else 100.0 * steady / optimal,
            "steps": None if self.steps is None else self.steps.to_dict(),
            "engine_stats": self.engine_stats,
            "gpu_idle": self.gpu_idle,
            "plan_steps": self.plan_steps,
            "plan_choice": self.plan_choice,
            "host_load": self.host_load,
            "variant": self.variant,
            "kv": self.kv,
            "step_classes": self.step_classes,
            "step_timing": self.step_timing,
            "busy": self.busy,
            "graphs": self.graphs,
        }
