"""Workload classes: the shape of the dense batch a plan is tuned for (`nanoflow tune --workload`),
derived from a workload's request lengths and the engine's limits. The plan cache is keyed by them
(pipeline/plan_cache.py) and the profile table records the one it was measured on."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

MIXED = "mixed"
"""Workload class used when the workload is not known in advance (serving)."""


@dataclass(frozen=True)
class WorkloadClass:
    """The shape of the dense batch a plan is tuned for."""
    name: str
    """Cache key part: 'mixed', or 'decNN-ctxC' (decode share of the batch in %, mean decode context)."""
    spec: str
    """The workload it was derived from (a --workload spec, 'mixed', or 'custom')."""
    num_decode: int
    """Decode rows (requests with one new token)."""
    num_prefill_tokens: int
    """Prefill rows (chunks of prompts)."""
    decode_context: int
    """Mean context length (cached tokens + the new one) of a decode request."""
    prefill_chunk: int
    """Tokens per prefill chunk (the last chunk may be shorter)."""
    prefill_context: int = 0
    """Tokens already cached before a prefill chunk."""

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.num_prefill_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorkloadClass":
        return cls(**{k: d[k] for k in ("name", "spec", "num_decode", "num_prefill_tokens", "decode_context",
                                         "prefill_chunk", "prefill_context") if k in d})

    def describe(self) -> str:
        return (f"{self.name}: {self.num_tokens} tokens = {self.num_decode} decode (mean context "
                f"{self.decode_context}) + {self.num_prefill_tokens} prefill (chunks of {self.prefill_chunk})")


def class_name(num_decode: int, num_prefill: int, context: int) -> str:
    total = max(1, num_decode + num_prefill)
    pct = int(round(100 * num_decode / total / 5) * 5)
    bucket = 2 ** round(math.log2(max(1, context)))
    return f"dec{pct:02d}-ctx{bucket}"


def workload_class_for(spec: str, token_budget: int, *, kv_capacity_tokens: int, max_num_seqs: int,
                       max_model_len: int, admission_ratio: float = 1.0, decode_fraction: float | None = None,
                       context: int | None = None, trace_dir: str | None = None) -> WorkloadClass:
    """The steady-state dense batch of a workload: requests running at once are bounded by
    max_num_seqs and by the KV cache (admission by projected peak, prompt + output); per step every
    running request decodes one token, and prefill fills what finishing requests free (a request's
    prompt per output length), up to the token budget. 'mixed' is half decode (context 1024), half
    prefill (chunks of 512). decode_fraction / context override the derived values (the batch is then
    filled to the token budget)."""
    spec = (spec or MIXED).strip()
    if spec == MIXED:
        n_in, n_out = 512, 512
    else:
        from nanoflow.bench.workloads import filter_rows, load_trace, parse_workload
        wl = parse_workload(spec, trace_dir)
        if wl.kind == "constant":
            n_in, n_out = wl.input_len, wl.output_len
        else:
            rows = load_trace(wl.path)
            kept = filter_rows(rows, max_model_len)
            if not kept:
                raise ValueError(f"workload {spec!r}: no trace row fits max_model_len {max_model_len}")
            n_in = max(1, round(statistics.fmean(rows.input_lens[i] for i in kept)))
            n_out = max(1, round(statistics.fmean(rows.output_lens[i] for i in kept)))
    budget = token_budget
    if spec == MIXED and decode_fraction is None:
        decode_fraction = 0.5
    if decode_fraction is not None:
        if not 0.0 <= decode_fraction <= 1.0:
            raise ValueError(f"decode fraction must be in [0, 1], got {decode_fraction}")
        num_decode = min(round(decode_fraction * budget), max_num_seqs)
        num_prefill = budget - num_decode if decode_fraction < 1.0 else 0
        ctx = context or min(1024, max(2, max_model_len // 2))
        chunk = min(512, max(1, num_prefill))
    else:
        running = min(max_num_seqs, int(admission_ratio * kv_capacity_tokens // max(1, n_in + n_out)))
        budget_bound = running >= budget * n_out // (n_in + n_out)
        num_decode = max(1, min(running, budget * n_out // (n_in + n_out)))
        num_prefill = budget - num_decode if budget_bound else \
            max(0, min(budget - num_decode, round(num_decode * n_in / n_out)))
        ctx = context or (n_in + n_out // 2)
        chunk = max(1, min(n_in, num_prefill or n_in))
    ctx = max(2, min(ctx, max_model_len - 1))
    # The synthetic batch must fit the KV cache (contexts spread to 1.5x the mean, block rounding).
    room = int(0.9 * kv_capacity_tokens) - num_prefill * 2
    if num_decode and num_decode * (ctx + 16) > room:
        ctx = max(2, room // num_decode - 16)
        if ctx < 16:
            num_decode = max(1, room // 64)
            ctx = 32
    name = MIXED if spec == MIXED and context is None else class_name(num_decode, num_prefill, ctx)
    return WorkloadClass(name, spec, int(num_decode), int(num_prefill), int(ctx), int(chunk), 0)


def workload_class_for_engine(engine, spec: str, **overrides) -> WorkloadClass:
    kv = engine.kv
    sched = engine.scheduler.config
    return workload_class_for(spec, sched.token_budget, kv_capacity_tokens=kv.pool.num_blocks * kv.block_size,
                              max_num_seqs=sched.max_num_seqs, max_model_len=engine.max_model_len,
                              admission_ratio=sched.kv_admission_ratio, **overrides)

