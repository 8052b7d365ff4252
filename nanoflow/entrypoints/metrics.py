"""Prometheus metrics of one server app, in its own CollectorRegistry (no global registry, so several
apps or tests in one process never share counters).

Names follow vLLM's (`vllm:` -> `nanoflow:`) so existing dashboards carry over. Latency histograms
are observed once per engine step in bulk (numpy), not once per token with a lock each, because a
step may advance a thousand requests.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from nanoflow.engine.engine import EngineStats
    from nanoflow.entrypoints.async_engine import StepRecord

PREFIX = "nanoflow:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class BulkHistogram(Collector):
    """A labelless Prometheus histogram that takes a batch of observations per call."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labels: dict[str, str]):
        self._name, self._doc = name, documentation
        self._bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._labels = labels
        self._counts = np.zeros(len(self._bounds) + 1, dtype=np.int64)  # last slot: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: Sequence[float]) -> None:
        if not values:
            return
        arr = np.asarray(values, dtype=np.float64)
        # side="left": a value equal to a bound falls in that bucket (Prometheus' `le` is inclusive).
        idx = np.searchsorted(self._bounds, arr, side="left")
        counts = np.bincount(idx, minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(arr.sum())

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return [HistogramMetricFamily(self._name, self._doc, labels=list(self._labels))]

    def collect(self) -> Iterable[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        buckets = [(_format_bound(b), c) for b, c in zip(self._bounds.tolist(), cumulative)]
        buckets.append(("+Inf", cumulative[-1]))
        family = HistogramMetricFamily(self._name, self._doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), buckets, total)
        return [family]


def _format_bound(bound: float) -> str:
    return repr(float(bound))


class _EngineStatsCollector(Collector):
    """Gauges read from the engine's latest stats snapshot at scrape time (nothing to keep in sync)."""

    def __init__(self, stats: Callable[[], "EngineStats"], labels: dict[str, str]):
        self._stats = stats
        self._labels = labels

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(PREFIX + name, doc, labels=list(self._labels))
        g.add_metric(list(self._labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(PREFIX + name, doc, labels=list(self._labels))  # exposed as NAME_total
        c.add_metric(list(self._labels.values()), value)
        return c

    # (name, doc, EngineStats field): counters kept by the engine, read at scrape time.
    _COUNTERS = (("prefix_cache_queries", "Prefix cache queries, in tokens.", "prefix_cache_queries"),
                 ("prefix_cache_hits", "Prefix cache hits, in tokens.", "prefix_cache_hits"),
                 ("prefix_cache_host_hits", "Of the prefix cache hits, tokens copied back from the host KV tier.",
                  "prefix_cache_host_hits"),
                 ("prefix_cache_disk_hits", "Of the prefix cache hits, tokens read back from the disk KV tier.",
                  "prefix_cache_disk_hits"),
                 ("kv_host_blocks_saved", "KV blocks copied to the host tier.", "kv_host_blocks_saved"),
                 ("kv_host_blocks_loaded", "KV blocks copied back from the host tier (disk hits included).",
                  "kv_host_blocks_loaded"),
                 ("kv_disk_blocks_written", "KV blocks written to the disk tier.", "kv_disk_blocks_written"),
                 ("kv_disk_blocks_read", "KV blocks read back from the disk tier.", "kv_disk_blocks_read"))

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [self._gauge(n, d, 0.0) for n, d in self._docs()] + [
            self._counter(n, d, 0.0) for n, d, _ in self._COUNTERS]

    @staticmethod
    def _docs() -> list[tuple[str, str]]:
        return [("num_requests_running", "Requests in the running batch."),
                ("num_requests_waiting", "Requests waiting to be admitted."),
                ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."),
                ("kv_host_cache_usage_perc", "Fraction of host-tier KV slots holding a block (0 without a host tier)."),
                ("kv_disk_cache_usage_perc", "Fraction of disk-tier KV slots holding a block (0 without a disk tier).")]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self._stats()
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        host = s.kv_host_blocks_used / s.kv_host_blocks_total if s.kv_host_blocks_total else 0.0
        disk = s.kv_disk_blocks_used / s.kv_disk_blocks_total if s.kv_disk_blocks_total else 0.0
        values = [float(s.num_running), float(s.num_waiting), usage, host, disk]
        return [self._gauge(n, d, v) for (n, d), v in zip(self._docs(), values)] + [
            self._counter(n, d, float(getattr(s, f, 0))) for n, d, f in self._COUNTERS]


class ServerMetrics:
    """Every metric of one app. `record` is the AsyncEngine observer hook (called once per step)."""

    def __init__(self, model_name: str, stats: Callable[[], "EngineStats"]):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name}
        self._model = model_name
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests (one per returned sequence) by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry)
        self.request_rejected = Counter(
            PREFIX + "request_rejected", "Requests refused before reaching the engine, by HTTP status.",
            ["model_name", "status"], registry=self.registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled.", ["model_name"],
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", ["model_name"],
                                         registry=self.registry)
        self.ttft = BulkHistogram(PREFIX + "time_to_first_token_seconds",
                                  "Time from arrival to the first generated token.", TTFT_BUCKETS, labels)
        self.itl = BulkHistogram(PREFIX + "inter_token_latency_seconds",
                                 "Time between successive outputs of a request.", ITL_BUCKETS, labels)
        self.e2e = BulkHistogram(PREFIX + "e2e_request_latency_seconds",
                                 "Time from arrival to the last token of a finished request.", E2E_BUCKETS, labels)
        self.step_time = BulkHistogram(PREFIX + "step_time_seconds",
                                       "Duration of one engine step (one dense batch).", STEP_BUCKETS, labels)
        for collector in (self.ttft, self.itl, self.e2e, self.step_time, _EngineStatsCollector(stats, labels)):
            self.registry.register(collector)

    def record(self, rec: "StepRecord") -> None:
        if rec.step_time_s is not None:
            self.step_time.observe_many([rec.step_time_s])
        self.ttft.observe_many(rec.ttft_s)
        self.itl.observe_many(rec.itl_s)
        self.e2e.observe_many(rec.e2e_s)
        if rec.prompt_tokens:
            self.prompt_tokens.labels(self._model).inc(rec.prompt_tokens)
        if rec.generation_tokens:
            self.generation_tokens.labels(self._model).inc(rec.generation_tokens)
        for reason, count in rec.finished.items():
            self.request_success.labels(self._model, reason).inc(count)

    def record_rejected(self, status: int) -> None:
        self.request_rejected.labels(self._model, str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)
