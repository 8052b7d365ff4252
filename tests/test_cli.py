"""The `nanoflow` command line: every command's help renders, every option is documented with its
default, commands are imported only when used, and `generate` prints prompt and completion apart."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoflow.engine_args import builtin_plan_names
from nanoflow.entrypoints.cli import COMMANDS, build_parser, format_generation, main

REPO = Path(__file__).resolve().parents[1]


def _command_paths(commands=COMMANDS, prefix=()) -> list[tuple[str, ...]]:
    paths = []
    for name, entry in commands.items():
        if isinstance(entry, dict):
            paths.append(prefix + (name,))
            paths += _command_paths(entry, prefix + (name,))
        else:
            paths.append(prefix + (name,))
    return paths


def _subparser(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _entry(path: tuple[str, ...]):
    entry = COMMANDS
    for name in path:
        entry = entry[name]
    return entry


def _is_group(path: tuple[str, ...]) -> bool:
    return isinstance(_entry(path), dict)


@pytest.mark.parametrize("path", [()] + _command_paths(), ids=lambda p: " ".join(p) or "nanoflow")
def test_help_of_every_command_renders(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: nanoflow {' '.join(path)}".rstrip())
    if _is_group(path):
        assert all(name in out for name in _entry(path))  # a group's help names its sub-commands


@pytest.mark.parametrize("path", [p for p in _command_paths() if not _is_group(p)], ids=" ".join)
def test_every_option_has_help_and_shows_its_default(path):
    parser = _subparser(build_parser(), path)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), f"nanoflow {' '.join(path)} {action.option_strings[0]} has no help"
        if action.default not in (None, argparse.SUPPRESS):
            assert "default" in text, f"{action.option_strings[0]}: {text!r} does not show its default"


@pytest.mark.parametrize("argv, names", [([], list(COMMANDS)), (["bench"], ["throughput", "serve"]),
                                         (["plan"], ["show"])])
def test_a_group_without_its_command_names_them(argv, names, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: name a command: " + ", ".join(names) in err


def test_plan_flag_lists_the_builtin_plans(capsys):
    names = builtin_plan_names()
    assert {"sequential", "overlap-2", "nano-4", "auto"} <= set(names)
    for path in (("generate",), ("bench", "throughput"), ("serve",)):
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert all(name in out.replace("- ", "-") for name in names), path


_PROBE = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from nanoflow.entrypoints.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                  "torch": "torch" in sys.modules, "engine": "nanoflow.engine.engine" in sys.modules}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["plan", "--help"]])
def test_help_imports_no_command_module_and_is_fast(argv):
    """`nanoflow --help` took 2.9 s when every command module (and torch) was imported up front."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not probe["torch"] and not probe["engine"]
    # CPU time, not wall time: CI machines are shared, but the work itself is well under a second.
    assert probe["cpu"] < 1.0, probe
    assert probe["wall"] < 10.0, probe


class _Completion:
    def __init__(self, text, token_ids, finish_reason="length"):
        self.text, self.token_ids, self.finish_reason = text, token_ids, finish_reason


class _Output:
    def __init__(self, prompt, text):
        self.prompt, self.outputs = prompt, [_Completion(text, [1, 2, 3])]


def test_generate_prints_prompt_and_completion_apart():
    one = format_generation([_Output("Hello, my name is", " Ann\nand")])
    assert one.splitlines() == ["Prompt:     'Hello, my name is'",
                                "Completion: ' Ann\\nand'  (3 tokens, length)"]
    two = format_generation([_Output("a", "b"), _Output("c", "d")]).split("\n\n")
    assert two[0].startswith("[1/2] Prompt:     'a'") and two[1].startswith("[2/2] Prompt:     'c'")


def test_generate_end_to_end(capsys):
    assert main(["generate", "Hello", "--max-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Prompt:     'Hello'" and out[1].startswith("Completion: ") and "(4 tokens, length)" in out[1]


_ARG = st.one_of(st.sampled_from(["generate", "bench", "throughput", "serve", "tune", "plan", "show", "--help",
                                  "--model", "--plan", "--workload", "--store", "--dtype", "-h", "x", "%", "%d",
                                  "--max-tokens", "3", "-1", "nan", "--", "--no-such-flag"]),
                 st.text(max_size=8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ARG, max_size=6))
def test_fuzz_argument_parsing_never_crashes(argv):
    """Any argv parses or exits through argparse (0 for help, 2 for bad input): never a traceback."""
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit as exc:
        assert exc.code in (0, 2)


def test_readme_nanoflow_lines_parse():
    """Every `nanoflow ...` line of the README parses with the real parser (the options exist)."""
    import shlex

    lines = [line.split("  #")[0].strip() for line in (REPO / "README.md").read_text().splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("nanoflow ")]
    assert len(commands) >= 5
    for argv in commands:
        args = build_parser(argv).parse_args(argv)
        assert callable(args.func), argv


def test_openmp_wait_policy_passive_on_cpu_hosts_only():
    from nanoflow.entrypoints.cli import passive_openmp_env
    assert passive_openmp_env({}, gpu_present=False, torch_loaded=False) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert passive_openmp_env({}, gpu_present=True, torch_loaded=False) == {}
    assert passive_openmp_env({}, gpu_present=False, torch_loaded=True) == {}   # too late to matter
    assert passive_openmp_env({"OMP_WAIT_POLICY": "ACTIVE"}, gpu_present=False, torch_loaded=False) == {}
    assert passive_openmp_env({"GOMP_SPINCOUNT": "1000"}, gpu_present=False, torch_loaded=False) == {}
    probe = ("import os; from nanoflow.entrypoints.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('policy', os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120).stdout
    expected = "None" if Path("/dev/nvidiactl").exists() else "PASSIVE"
    assert f"policy {expected}" in out
