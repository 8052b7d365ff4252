"""Plan cache of `nanoflow tune`: one JSON file per (model shape, device, tp, dtype, dense batch,
workload class), under $NANOFLOW_CACHE_DIR or ~/.cache/nanoflow/plans/.

`--plan auto` (resolve_plan below) calls lookup_plan(engine): the plan of the
workload class named by $NANOFLOW_PLAN_WORKLOAD (a --workload spec or a class name) when set and
cached, else the 'mixed' class, else the most recently tuned class of that key; None when nothing
fits (the caller falls back to sequential with a warning)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoflow.pipeline.plan import SEQUENTIAL, Plan, load_plan
from nanoflow.pipeline.workload_class import MIXED

CACHE_ENV = "NANOFLOW_CACHE_DIR"
WORKLOAD_ENV = "NANOFLOW_PLAN_WORKLOAD"
CACHE_FORMAT = 1
_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias")
_MOE_SHAPE_FIELDS = ("num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "shared_expert_intermediate_size")
"""Hashed only when set, so dense models keep the hashes (and cached plans) they had before MoE."""


def cache_dir(directory: str | Path | None = None) -> Path:
    if directory is not None:
        return Path(directory)
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanoflow" / "plans"


def model_shape_hash(model_config) -> str:
    """Hash of the fields that set a layer's work (not rope / token ids): a local checkpoint and the
    dummy preset of the same shape share plans."""
    d = model_config if isinstance(model_config, dict) else asdict(model_config)
    shape = {k: d.get(k) for k in _SHAPE_FIELDS}
    shape.update({k: d[k] for k in _MOE_SHAPE_FIELDS if d.get(k)})
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class PlanKey:
    model_hash: str
    device: str
    tp: int
    dtype: str
    dense_batch: int
    workload_class: str

    def prefix(self) -> str:
        return f"{self.model_hash}_{_slug(self.device)}_tp{self.tp}_{_slug(self.dtype)}_b{self.dense_batch}"

    def filename(self) -> str:
        return f"{self.prefix()}_{_slug(self.workload_class)}.json"

    def with_class(self, workload_class: str) -> "PlanKey":
        return PlanKey(self.model_hash, self.device, self.tp, self.dtype, self.dense_batch, workload_class)


def engine_key(engine, workload_class: str = MIXED, tp: int | None = None) -> PlanKey:
    """The key of `engine` (tp: its tensor_parallel_size unless given)."""
    import torch
    if tp is None:
        tp = getattr(getattr(engine, "config", None), "tensor_parallel_size", 1)
    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = str(engine.model.dtype).replace("torch.", "")
    return PlanKey(model_shape_hash(engine.model_config), name, tp, dtype,
                   int(engine.scheduler.config.token_budget), workload_class)


def store_plan(plan: Plan, key: PlanKey, meta: dict | None = None, directory: str | Path | None = None) -> Path:
    """Writes the plan under its key (atomically); returns the file."""
    folder = cache_dir(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / key.filename()
    entry = {"format": CACHE_FORMAT, "key": asdict(key), "plan": plan.to_dict(),
             "meta": {"stored_at": time.time(), **(meta or {})}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_entry(path: str | Path) -> dict | None:
    try:
        entry = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT or "plan" not in entry:
        return None
    return entry


def entries_for(key: PlanKey, directory: str | Path | None = None) -> list[dict]:
    """Cached entries with the same model, device, tp, dtype and dense batch (any workload class),
    newest first."""
    folder = cache_dir(directory)
    if not folder.is_dir():
        return []
    out = []
    for path in folder.glob(f"{key.prefix()}_*.json"):
        entry = load_entry(path)
        if entry is None:
            continue
        k = entry.get("key", {})
        if (k.get("model_hash"), k.get("device"), k.get("tp"), k.get("dtype"), k.get("dense_batch")) != \
                (key.model_hash, key.device, key.tp, key.dtype, key.dense_batch):
            continue
        entry["path"] = str(path)
        out.append(entry)
    return sorted(out, key=lambda e: e.get("meta", {}).get("stored_at", 0.0), reverse=True)


def choose_entry(entries: list[dict], workload_class: str | None) -> dict | None:
    by_class = {e["key"]["workload_class"]: e for e in reversed(entries)}  # newest wins
    if workload_class and workload_class in by_class:
        return by_class[workload_class]
    if MIXED in by_class:
        return by_class[MIXED]
    return entries[0] if entries else None


def _workload_class_of(engine, spec: str | None) -> str | None:
    if not spec:
        return None
    try:
        from nanoflow.pipeline.workload_class import workload_class_for_engine
        return workload_class_for_engine(engine, spec).name
    except Exception:  # noqa: BLE001 - not a workload spec: a class name given directly
        return spec  # a class name given directly ('mixed', 'dec65-ctx1024')


def lookup_plan(engine, workload: str | None = None, directory: str | Path | None = None) -> Plan | None:
    """The cached plan for this engine's model shape, device, tensor-parallel size, dtype and token
    budget, or None."""
    try:
        key = engine_key(engine)
        entries = entries_for(key, directory)
    except Exception as exc:  # a broken cache must never stop the engine: sequential instead
        warnings.warn(f"plan cache unreadable ({exc}); ignoring it", stacklevel=2)
        return None
    if not entries:
        return None
    wanted = _workload_class_of(engine, workload or os.environ.get(WORKLOAD_ENV))
    entry = choose_entry(entries, wanted)
    if entry is None:
        return None
    try:
        plan = Plan.from_dict(entry["plan"])
        op_names = [op.name for op in engine.model.layers[0].ops]
        import torch
        num_sms = (torch.cuda.get_device_properties(engine.device).multi_processor_count
                   if engine.device.type == "cuda" else None)
        plan.validate(op_names, num_sms)
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"cached plan {entry.get('path')} is unusable ({exc}); ignoring it", stacklevel=2)
        return None
    return plan


def profile_dir(directory: str | Path | None = None) -> Path:
    """Where `nanoflow tune` stores its profiles: beside the plan cache (…/nanoflow/profiles/)."""
    return cache_dir(directory).parent / "profiles"


def lookup_profile(engine, directory: str | Path | None = None):
    """The newest profile `nanoflow tune` measured for this engine's model shape, device, tensor-parallel
    size, dtype and token budget (the workload class of $NANOFLOW_PLAN_WORKLOAD preferred), as a
    ProfileTable; None when there is none (per-step plan choice then uses fixed rates)."""
    try:
        key = engine_key(engine)
        folder = profile_dir(directory)
        paths = sorted(folder.glob(f"{key.prefix()}_*.json"), key=lambda p: p.stat().st_mtime, reverse=True) \
            if folder.is_dir() else []
    except Exception as exc:  # noqa: BLE001 - a broken cache must never stop the engine
        warnings.warn(f"profile cache unreadable ({exc}); ignoring it", stacklevel=2)
        return None
    if not paths:
        return None
    wanted = _workload_class_of(engine, os.environ.get(WORKLOAD_ENV))
    if wanted:
        preferred = [p for p in paths if p.name == key.with_class(wanted).filename()]
        paths = preferred + [p for p in paths if p not in preferred]
    from nanoflow.pipeline.profile_table import ProfileTable
    for path in paths:
        try:
            return ProfileTable.load(path)
        except (ValueError, OSError, TypeError, KeyError) as exc:
            warnings.warn(f"profile {path} is unusable ({exc}); ignoring it", stacklevel=2)
    return None


def resolve_plan(spec: str, engine) -> Plan:
    """load_plan, plus 'auto': the plan `nanoflow tune` cached for this model, device and batch, or
    sequential with a warning when none fits. (Here, not in plan.py: a plan file knows no cache.)"""
    if spec != "auto":
        return load_plan(spec)
    plan = lookup_plan(engine)
    if plan is None:
        warnings.warn("no tuned plan cached for this model / device / batch size (run `nanoflow tune`); "
                      "using the sequential plan", stacklevel=2)
        return SEQUENTIAL
    return plan
