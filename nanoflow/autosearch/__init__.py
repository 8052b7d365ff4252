"""Automatic pipeline search (NanoFlow §4.2): profile each op of a layer for nano-batch sizes and SM
budgets (profiler.py, into profile.py's table), choose nano-batches, order and SM shares with a MILP
over the profile (milp.py over layout.py, driven by search.py: stage 1 without interference, stage 2
with measured interference), validate the best plans for real and cache the winner
(entrypoints/tune.py, cache.py). `--plan auto` loads the cached plan.

Names are imported lazily, so `--plan auto` (cache lookup) does not pull in scipy."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ProfileTable": "profile", "WorkloadClass": "profile", "profile_engine": "profiler",
    "workload_class_for": "profile", "dense_batch": "profile",
    "Candidate": "layout", "search": "search", "sequential_candidate": "search", "simulate_plan": "search",
    "check_plan": "search",
    "lookup_plan": "cache", "store_plan": "cache", "PlanKey": "cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nanoflow.autosearch' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nanoflow.autosearch.{_EXPORTS[name]}"), name)
