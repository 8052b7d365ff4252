"""What auto-search profiles on: the synthetic dense batch of a workload class, the SM budgets and
the nano-batch size grids. The workload classes are in pipeline/workload_class.py, the table of op
times the search (layout.py, milp.py, search.py) reads in pipeline/profile_table.py, and the
measuring code (timers, profile_engine) in profiler.py."""
from __future__ import annotations

import contextlib
from typing import Iterator

from nanoflow.pipeline.workload_class import WorkloadClass

DEFAULT_MEMORY_BUDGETS = (16, 24, 32, 44, 56, 64)
"""SM budgets tried for the memory-stream op (decode attention); compute ops get the rest."""
QUICK_MEMORY_BUDGETS = (32, 44, 64)


def progress_bar(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", disable: bool = False):
    """tqdm on stderr; refreshed at most every 10 s when stderr is not a terminal (a log file or a
    captured run keeps a few lines per bar, not thousands of carriage-return updates)."""
    import sys

    from tqdm.auto import tqdm
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True,
                mininterval=0.2 if tty else 10.0, file=sys.stderr)


# ---- the synthetic dense batch -------------------------------------------------------------------
@contextlib.contextmanager
def dense_batch(engine, wl: WorkloadClass, seed: int = 0) -> Iterator:
    """A ForwardBatch of `wl` on the engine's device: fake requests with KV blocks allocated from the
    engine's pool (freed on exit), decode requests first (contexts spread over 0.5x..1.5x the mean,
    shuffled), then prefill chunks."""
    import numpy as np

    from nanoflow.engine.request import Request
    from nanoflow.engine.scheduler import SchedulerOutput
    from nanoflow.sampling_params import SamplingParams

    if wl.num_tokens > engine.scheduler.config.token_budget:
        raise ValueError(f"the synthetic batch has {wl.num_tokens} tokens, more than the engine's token "
                         f"budget {engine.scheduler.config.token_budget}")
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    limit = engine.max_model_len - 1
    d = wl.num_decode
    spread = np.linspace(0.5, 1.5, d) if d > 1 else np.ones(max(d, 0))
    contexts = np.clip(np.round(spread * wl.decode_context), 2, limit).astype(int)
    rng.shuffle(contexts)
    longest = int(max(contexts.max(initial=2), wl.prefill_context + wl.prefill_chunk, 2))
    base = rng.integers(10, max(11, vocab - 10), size=longest + 1).tolist()
    params = SamplingParams(max_tokens=1)
    scheduled, ids = [], []
    try:
        for i, ctx in enumerate(contexts.tolist()):
            req = Request(f"__nanoflow_profile_d{i}", base[:ctx], params, 1, i)
            req.num_computed_tokens = ctx - 1
            _allocate(engine, req.request_id, ctx, ids)
            scheduled.append((req, 1))
        left, j = wl.num_prefill_tokens, 0
        while left > 0:
            n = min(wl.prefill_chunk, left)
            req = Request(f"__nanoflow_profile_p{j}", base[:wl.prefill_context + n], params, 1, d + j)
            req.num_computed_tokens = wl.prefill_context
            _allocate(engine, req.request_id, wl.prefill_context + n, ids)
            scheduled.append((req, n))
            left -= n
            j += 1
        batch = engine.runner.build_batch(SchedulerOutput(scheduled=scheduled, num_decode=d))
        yield batch
    finally:
        for rid in ids:
            engine.kv.free(rid)


def _allocate(engine, rid: str, tokens: int, ids: list[str]) -> None:
    if engine.kv.allocate(rid, tokens) is None:
        raise ValueError(f"the KV cache ({engine.kv.pool.num_blocks} blocks of {engine.kv.block_size}) is too "
                         f"small for the profiling batch: lower the context (--context) or the token budget")
    ids.append(rid)


def op_meta(op) -> dict:
    return {"name": op.name, "resource": op.resource.value, "scope": op.scope.value,
            "reads": list(op.reads), "writes": list(op.writes)}


# ---- grids ---------------------------------------------------------------------------------------
def size_grid(total: int, specials: list[int], step: int) -> list[int]:
    """Multiples of `step` up to total, plus the special sizes; sizes closer than 8 rows merged."""
    raw = sorted({s for s in [*range(step, total + 1, step), total, *specials] if 0 < s <= total})
    out: list[int] = []
    for s in raw:
        if out and s - out[-1] < 8:
            if s == total:
                out[-1] = s
            continue
        out.append(s)
    return out


def token_sizes(T: int, D: int, step: int) -> list[int]:
    P = T - D
    specials = [D, P, D // 2, D // 4, (3 * D) // 4, D // 8, P // 2, P // 4, T - D // 2, T - D // 4]
    return size_grid(T, specials, step)


def decode_sizes(D: int, step: int) -> list[int]:
    return size_grid(D, [D // 8, D // 4, (3 * D) // 8, D // 2, (5 * D) // 8, (3 * D) // 4, (7 * D) // 8], step)
