"""Prints the command lines of README.md's "Install and test" block, one a line (for .ci/run).

CI runs exactly what the README tells a new user to run, so the two cannot drift apart."""
from __future__ import annotations

import sys
from pathlib import Path

SECTION = "## Install and test"


def readme_commands(readme: str) -> list[str]:
    """The lines of the first ```bash block under SECTION (comments and blank lines kept out)."""
    lines = readme.splitlines()
    try:
        start = lines.index(next(line for line in lines if line.startswith(SECTION)))
        fence = next(i for i in range(start, len(lines)) if lines[i].strip() == "```bash")
        end = next(i for i in range(fence + 1, len(lines)) if lines[i].strip() == "```")
    except StopIteration:
        raise ValueError(f"README.md has no ```bash block under {SECTION!r}") from None
    commands = [line.strip() for line in lines[fence + 1:end]]
    return [c for c in commands if c and not c.startswith("#")]


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "README.md"
    print("\n".join(readme_commands(path.read_text())))
