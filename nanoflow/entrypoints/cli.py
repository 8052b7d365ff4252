"""`nanoflow` command line: generate, serve, bench throughput|serve, tune, plan show."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import typing

from nanoflow.config import EngineConfig


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field (they become --help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One --flag per EngineConfig field, typed from its annotation, documented by its docstring."""
    docs = field_docs(EngineConfig)
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        help_text = f"{docs.get(f.name, '')} (default: {f.default})"
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(flag, type=base, default=f.default, help=help_text)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})


def _generate(args: argparse.Namespace) -> int:
    from nanoflow.llm import LLM
    from nanoflow.sampling_params import SamplingParams
    config = engine_config_from_args(args)
    llm = LLM(**dataclasses.asdict(config))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.sampling_seed)
    for out in llm.generate(args.prompts, params, use_tqdm=False):
        print(out.prompt + out.outputs[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts (offline)")
    gen.add_argument("prompts", nargs="+", help="prompt texts")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    _lazy_subcommand(sub, "serve", "OpenAI-compatible HTTP server", "nanoflow.entrypoints.openai_server")
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _lazy_subcommand(bench, "throughput", "offline throughput, % of optimal", "nanoflow.bench.throughput")
    _lazy_subcommand(bench, "serve", "serving benchmark against a running server", "nanoflow.bench.serve")
    _lazy_subcommand(sub, "tune", "search a pipeline plan and cache it", "nanoflow.autosearch.tune")
    plan = sub.add_parser("plan", help="pipeline plans").add_subparsers(dest="plan_cmd", required=True)
    _lazy_subcommand(plan, "show", "draw a plan's nano-ops on their streams", "nanoflow.pipeline.show")
    return parser


def _lazy_subcommand(sub, name: str, help_text: str, module: str) -> None:
    """Sub-commands whose modules define add_cli_args(parser) and run_from_args(args) -> int."""
    import importlib
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # an optional dependency missing: say so when the command is used
        p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
        p.set_defaults(func=lambda args, exc=exc: _unavailable(name, exc))
        return
    p = sub.add_parser(name, help=help_text)
    mod.add_cli_args(p)
    p.set_defaults(func=mod.run_from_args)


def _unavailable(name: str, exc: Exception) -> int:
    print(f"nanoflow {name} is unavailable: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
