"""The engine's command-line flags, shared by `generate`, `serve`, `bench throughput` and `tune`: one
--flag per EngineConfig field, typed from its annotation and documented by its docstring."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing
from pathlib import Path


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field (they become --help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def builtin_plan_names() -> list[str]:
    """The plans `--plan` takes by name: sequential, the JSON files shipped in nanoflow/pipeline/plans, auto."""
    folder = Path(__file__).resolve().parent / "pipeline" / "plans"
    return ["sequential", *sorted(p.stem for p in folder.glob("*.json")), "auto"]


def plan_help() -> str:
    return (f"Pipeline plan: {', '.join(builtin_plan_names())} ('auto': the plan `nanoflow tune` cached for "
            "this model and device, else sequential), or a plan JSON file.")


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One --flag per EngineConfig field, typed from its annotation, documented by its docstring."""
    from nanoflow.config import EngineConfig

    docs = field_docs(EngineConfig)
    docs["plan"] = plan_help()
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        doc = docs.get(f.name, "").replace("%", "%%")
        # A None default is explained by the docstring ("defaults to ..."); '(default: None)' would not help.
        help_text = doc if f.default is None and "default" in doc.lower() else f"{doc} (default: %(default)s)"
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(flag, type=base, default=f.default, help=help_text)


def engine_config_from_args(args: argparse.Namespace):
    """The EngineConfig of the parsed engine flags."""
    from nanoflow.config import EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})
