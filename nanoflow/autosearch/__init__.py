"""Automatic pipeline search (NanoFlow §4.2): profile each op of a layer for nano-batch sizes and SM
budgets (profiler.py, into profile.py's table), choose nano-batches, order and SM shares with a MILP
over the profile (milp.py over layout.py, driven by search.py: stage 1 without interference, stage 2
with measured interference), validate the best plans for real and cache the winner
(entrypoints/tune.py, into pipeline/plan_cache.py). `--plan auto` loads the cached plan.

Names are imported lazily, so importing the package does not pull in scipy."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ProfileTable": "nanoflow.pipeline.profile_table", "WorkloadClass": "nanoflow.pipeline.workload_class",
    "workload_class_for": "nanoflow.pipeline.workload_class",
    "profile_engine": "nanoflow.autosearch.profiler", "dense_batch": "nanoflow.autosearch.profile",
    "Candidate": "nanoflow.autosearch.layout", "search": "nanoflow.autosearch.search",
    "sequential_candidate": "nanoflow.autosearch.search", "simulate_plan": "nanoflow.autosearch.search",
    "check_plan": "nanoflow.autosearch.search",
    "lookup_plan": "nanoflow.pipeline.plan_cache", "store_plan": "nanoflow.pipeline.plan_cache",
    "PlanKey": "nanoflow.pipeline.plan_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nanoflow.autosearch' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
