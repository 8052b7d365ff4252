"""Packages import downwards only (DESIGN.md): every `nanoflow` import in the package, at module or
function level, is parsed with ast and checked against the layer order below. An upward import
fails here unless it is listed in ALLOWED_UPWARD with its reason."""
from __future__ import annotations

import ast
from pathlib import Path

import nanoflow

ROOT = Path(nanoflow.__file__).parent

LAYERS = [
    # 0: data types every layer passes around
    ("nanoflow.config", "nanoflow.sampling_params", "nanoflow.outputs", "nanoflow.forward_batch",
     "nanoflow.engine.request", "nanoflow.engine.errors",
     # the engine's command-line flags, made from EngineConfig (cli, serve, bench and tune use them)
     "nanoflow.engine_args",
     # workload specs and traces: a leaf (no nanoflow import), read by bench and by the workload classes
     "nanoflow.bench.workloads"),
    # 1: kernels, and the op vocabulary / SM partitions they and the models describe themselves with
    ("nanoflow.kernels", "nanoflow.pipeline.ops", "nanoflow.pipeline.sm_partition"),
    # 2: models (the memory check sizes them)
    ("nanoflow.models", "nanoflow.memory_check"),
    # 3: plans, the executor, graphs
    ("nanoflow.pipeline",),
    # 4: the engine (one rank or a tensor-parallel group)
    ("nanoflow.engine", "nanoflow.distributed"),
    # 5: the offline API
    ("nanoflow.llm", "nanoflow"),
    # 6: tools above the engine
    ("nanoflow.autosearch", "nanoflow.bench"),
    # 7: command lines and the server
    ("nanoflow.entrypoints",),
]

ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    # (importer, imported): why the upward import is needed (none today)
}


def layer_of(module: str) -> int:
    best, level = "", None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, level = p, i
    if level is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return level


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def nanoflow_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nanoflow"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "nanoflow":
            for a in node.names:  # `from nanoflow.x import y`: y may be a module
                sub = f"{node.module}.{a.name}"
                is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT.parent / Path(*sub.split(".")) / "__init__.py").is_file()
                found.add(sub if is_module else node.module)
    return found


def test_packages_import_downwards_only():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        src = module_name(path)
        for target in nanoflow_imports(path):
            if layer_of(target) > layer_of(src) and (src, target) not in ALLOWED_UPWARD:
                upward.append(f"{src} (layer {layer_of(src)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_allowed_exceptions_are_still_needed():
    """An exception that no longer occurs is removed from the list (it cannot hide a new one)."""
    seen = {(module_name(p), t) for p in ROOT.rglob("*.py") for t in nanoflow_imports(p)}
    assert set(ALLOWED_UPWARD) <= seen, set(ALLOWED_UPWARD) - seen


def test_the_checker_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from nanoflow.entrypoints.cli import main\n")
    assert "nanoflow.entrypoints.cli" in nanoflow_imports(probe)
    assert layer_of("nanoflow.entrypoints.cli") > layer_of("nanoflow.pipeline.plan")
