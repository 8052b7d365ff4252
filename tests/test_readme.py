"""README.md stays true: CI runs its install-and-test lines, its test command prints pytest's summary,
its Python example runs, and every path it names exists."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _readme_commands() -> list[str]:
    spec = importlib.util.spec_from_file_location("readme_commands", REPO / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_commands(README)


def test_ci_runs_exactly_the_readme_install_and_test_lines():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0] == 'pip install torch==2.13.0 -e ".[test]"'
    # and the README says how to get torch's CPU-only build where the default wheel is the CUDA one
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README
    assert commands[1] == "python -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert "readme_commands.py README.md" in ci and "pytest" not in ci.replace("readme", "")


def test_the_readme_test_command_prints_the_summary_line():
    """pyproject's addopts once held -q: with the README's -q that is -qq, and pytest printed no summary."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_cli.py::test_generate_prints_prompt_and_completion_apart"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^1 passed in [\d.]+s", proc.stdout, re.MULTILINE), proc.stdout


def test_the_readme_python_example_runs(capsys):
    block = re.search(r"```python\n(.*?)```", README, re.DOTALL).group(1)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # it printed the completion


def test_paths_named_in_the_readme_exist():
    paths = [p for p in re.findall(r"`([\w.-]+(?:/[\w.-]+)+/?)`", README) if not p.startswith("http")]
    assert "nanoflow/bench/traces/SOURCES.md" in paths and ".ci/run" in paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing
