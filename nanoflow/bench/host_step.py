"""Host time per step: the CPU work that forms a dense batch (schedule + the persistent input batch),
without a model. Async scheduling hides it behind the device's step only while it stays well under
the step; it must not grow with context length.

    python3 benchmarks/host_step_time.py --requests 1024 --contexts 128,1024,4096
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from nanoflow.engine.input_batch import InputBatch
from nanoflow.engine.kv_cache import KVCacheManager
from nanoflow.engine.request import Request
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig
from nanoflow.sampling_params import SamplingParams


@dataclasses.dataclass
class HostStepResult:
    num_requests: int
    context: int
    """Prompt tokens of every request (decode steps read this much context and more)."""
    steps: int
    schedule_ms: float
    """Median per step of Scheduler.schedule()."""
    prepare_ms: float
    """Median per step of InputBatch.prepare() (CPU device: the 'device' copy included)."""
    update_ms: float
    """Median per step of the engine's per-request bookkeeping (computed tokens, one appended token)."""
    entries_written: int
    """Block-table entries written over the timed steps (new blocks only, in steady decode)."""

    @property
    def total_ms(self) -> float:
        return self.schedule_ms + self.prepare_ms + self.update_ms


def measure(num_requests: int = 1024, context: int = 1024, steps: int = 50, block_size: int = 16,
            token_budget: int = 8192, warmup: int = 3) -> HostStepResult:
    """Admits num_requests prompts of `context` tokens in one step, then times `steps` decode steps
    (every request decodes; none finishes)."""
    total_steps = warmup + steps
    kv = KVCacheManager(num_requests * (-(-(context + total_steps + 1) // block_size) + 1), block_size, False)
    scheduler = Scheduler(SchedulerConfig(num_requests * context + num_requests, num_requests), kv)
    inputs = InputBatch(kv, torch.device("cpu"))
    params = SamplingParams(max_tokens=total_steps + 2, ignore_eos=True)
    prompt = [7] * context
    for i in range(num_requests):
        scheduler.add(Request(str(i), prompt, params, total_steps + 2, i))

    def one_step(times: list | None) -> None:
        t0 = time.perf_counter()
        sched = scheduler.schedule()
        t1 = time.perf_counter()
        inputs.prepare(sched)
        t2 = time.perf_counter()
        for r, n in sched.scheduled:
            r.num_computed_tokens += n
            if r.num_computed_tokens == r.num_tokens:
                r.output_token_ids.append(11)
        t3 = time.perf_counter()
        if times is not None:
            times.append((t1 - t0, t2 - t1, t3 - t2))

    one_step(None)  # the prefill of every prompt
    scheduler.config = dataclasses.replace(scheduler.config, token_budget=max(token_budget, num_requests))
    for _ in range(warmup):
        one_step(None)
    entries0 = inputs.stats["entries_written"]
    times: list[tuple[float, float, float]] = []
    for _ in range(steps):
        one_step(times)
    med = [statistics.median(t[k] for t in times) * 1e3 for k in range(3)]
    return HostStepResult(num_requests, context, steps, *med, inputs.stats["entries_written"] - entries0)
