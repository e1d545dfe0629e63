"""The `callingest serve` subcommands, as the CLI itself lists them.

Once callingest/cli.py exists, the list is parsed from `callingest serve --help`
(argparse's ``{a,b}`` choices, click's ``[a|b]``/``{a|b}`` choices or a "Commands:" section).
Before that, the services/ packages are the list.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

_RUN_CLI = (
    "import sys\nfrom callingest.cli import main\nsys.argv[0] = 'callingest'\nsys.exit(main())\n"
)


def cli_exists() -> bool:
    """True once the lead's callingest/cli.py is in the tree."""
    return (REPO / "callingest/cli.py").is_file()


def cli_help(*args: str) -> str:
    """`callingest <args> --help` output; asserts the command exits 0."""
    result = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, (
        f"`callingest {' '.join(args)} --help` exited {result.returncode}:\n{result.stderr}"
    )
    return result.stdout


def subcommands_in_help(text: str) -> set[str]:
    """Subcommand or choice names listed by a --help text."""
    names: set[str] = set()
    choices = r"{([a-z][\w-]*(?:[,|][a-z][\w-]*)*)}|\[([a-z][\w-]*(?:\|[a-z][\w-]*)+)\]"
    for braces, brackets in re.findall(choices, text):
        names.update(re.split(r"[,|]", braces or brackets))
    section = re.search(
        r"^(?:Commands|commands|positional arguments):\s*\n((?:[ \t]+.*\n?)+)", text, re.M
    )
    if section:
        for line in section.group(1).splitlines():
            match = re.match(r"^\s{2,4}([a-z][\w-]*)\b", line)
            if match:
                names.add(match.group(1))
    return names


def serve_subcommands() -> set[str]:
    """The services `callingest serve` can run."""
    if cli_exists():
        return subcommands_in_help(cli_help("serve"))
    services = REPO / "services"
    return {p.name for p in services.iterdir() if (p / "__init__.py").is_file()}
