"""`nanoflow` command line: generate, serve, bench throughput|serve, tune, plan show.

Only the chosen command's module is imported (torch alone takes seconds to import), so `nanoflow --help`
and `nanoflow bench --help` answer at once; `nanoflow <command> --help` lists every option with its default.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from nanoflow.engine_args import add_engine_args, engine_config_from_args


@dataclass(frozen=True)
class Command:
    """A sub-command whose module defines add_cli_args(parser) and run_from_args(args) -> int."""

    help: str
    """One line for the command list (a literal '%' must be written '%%': argparse formats it)."""
    module: str
    """Module imported only when the command is used."""
    add_args: str = "add_cli_args"
    """Function of the module that adds the command's options to its parser."""
    run: str = "run_from_args"
    """Function of the module that runs the command from the parsed arguments."""


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "generate": Command("generate text for prompts (offline)", "nanoflow.entrypoints.cli", "add_generate_args",
                        "run_generate"),
    "serve": Command("OpenAI-compatible HTTP server", "nanoflow.entrypoints.openai_server"),
    "bench": {
        "throughput": Command("offline throughput and %% of optimal", "nanoflow.bench.throughput"),
        "serve": Command("serving benchmark against a running server", "nanoflow.bench.serve"),
    },
    "tune": Command("search a pipeline plan for this device (GPU)", "nanoflow.entrypoints.tune"),
    "plan": {"show": Command("draw a plan's nano-ops on their streams", "nanoflow.entrypoints.plan_show")},
}
"""Every command; a dict is a group of sub-commands (`nanoflow bench throughput`)."""

DESCRIPTION = ("nanoflow: a throughput-first LLM serving engine (NanoFlow's nano-batch pipeline). "
               "`nanoflow <command> --help` lists the command's options with their defaults.")
GROUP_HELP = {"bench": "benchmarks: throughput (offline) or serve (against a server)",
              "plan": "pipeline plans: show"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends '(default: X)' to an option's help unless the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        names_default = any(marker in text for marker in ("(default", "%(default", "defaults to"))
        if names_default or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


# ---- generate -------------------------------------------------------------------------------------
def add_generate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("prompts", nargs="+", help="prompt texts (quote each one)")
    s = parser.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt at most")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                           "whose probability reaches this; 1 keeps all")
    s.add_argument("--sampling-seed", type=int, default=None,
                   help="seed of this request's sampling (default: from the engine's --seed)")
    add_engine_args(parser)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from nanoflow.llm import LLM
    from nanoflow.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    llm = LLM(**dataclasses.asdict(config))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.sampling_seed)
    outputs = llm.generate(args.prompts, params, use_tqdm=False)
    print(format_generation(outputs))
    return 0


def format_generation(outputs) -> str:
    """Each prompt and its completion on their own labelled lines (repr: whitespace shows)."""
    blocks = []
    for i, out in enumerate(outputs):
        head = f"[{i + 1}/{len(outputs)}] " if len(outputs) > 1 else ""
        completion = out.outputs[0]
        blocks.append(f"{head}Prompt:     {out.prompt!r}\n{' ' * len(head)}Completion: {completion.text!r}"
                      f"  ({len(completion.token_ids)} tokens, {completion.finish_reason})")
    return "\n\n".join(blocks)


# ---- the parser ----------------------------------------------------------------------------------
def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `nanoflow` parser. Every command is listed; only the ones on argv's path get their options
    (and their module imported). argv=None builds every command fully (for tests and docs)."""
    parser = argparse.ArgumentParser(prog="nanoflow", description=DESCRIPTION, formatter_class=HelpFormatter)
    _add_commands(parser, COMMANDS, "command", None if argv is None else list(argv))
    return parser


def _add_commands(parser: argparse.ArgumentParser, commands: dict, dest: str, argv: list[str] | None) -> None:
    sub = parser.add_subparsers(dest=dest, metavar="{" + ",".join(commands) + "}")
    chosen = _first_positional(argv) if argv is not None else None
    parser.set_defaults(func=lambda args, p=parser, names=list(commands): _missing_command(p, names))
    for name, entry in commands.items():
        wanted = argv is None or name == chosen
        if isinstance(entry, dict):
            p = sub.add_parser(name, help=GROUP_HELP.get(name, ""), description=GROUP_HELP.get(name),
                               formatter_class=HelpFormatter)
            if wanted:
                rest = None if argv is None else argv[argv.index(name) + 1:]
                _add_commands(p, entry, f"{dest}_{name}", rest)
            continue
        p = sub.add_parser(name, help=entry.help, description=entry.help.replace("%%", "%"),
                           formatter_class=HelpFormatter)
        if wanted:
            _attach(p, name, entry)


def _first_positional(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _attach(parser: argparse.ArgumentParser, name: str, command: Command) -> None:
    try:
        module = importlib.import_module(command.module)
    except ImportError as exc:  # an optional dependency missing: say so when the command is used
        parser.description = f"{parser.description} (unavailable: {exc})"
        parser.set_defaults(func=lambda args, exc=exc: _unavailable(name, exc))
        return
    getattr(module, command.add_args)(parser)
    for action in parser._actions:  # an option added without help still shows its default
        if action.option_strings and not action.help and action.default not in (None, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"
    parser.set_defaults(func=getattr(module, command.run))


def _missing_command(parser: argparse.ArgumentParser, names: list[str]) -> int:
    parser.print_help(sys.stderr)
    print(f"\n{parser.prog}: error: name a command: {', '.join(names)}", file=sys.stderr)
    return 2


def _unavailable(name: str, exc: Exception) -> int:
    print(f"nanoflow {name} is unavailable: {exc}", file=sys.stderr)
    return 2


OPENMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""OpenMP settings a user may have chosen; the CLI then leaves the wait policy alone."""


def passive_openmp_env(environ: dict[str, str], gpu_present: bool, torch_loaded: bool) -> dict[str, str]:
    """OMP_WAIT_POLICY=PASSIVE on CPU-only hosts, unless the user set an OpenMP option or torch is loaded
    (libgomp reads it once, when torch loads). torch's OpenMP threads otherwise spin between parallel
    regions: with another busy process on a 2-core machine every region waits for a descheduled thread,
    and the same warm-up took 9-12 s alone but 27-266 s beside other work (passive: 12-14 s and 12-34 s)."""
    if gpu_present or torch_loaded or any(name in environ for name in OPENMP_ENV):
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.update(passive_openmp_env(os.environ, gpu_present=Path("/dev/nvidiactl").exists(),
                                         torch_loaded="torch" in sys.modules))
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # bad options, and InsufficientMemoryError (a ValueError too)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
