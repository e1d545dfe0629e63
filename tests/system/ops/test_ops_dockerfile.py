"""The Dockerfile, read statically (no Docker engine runs here)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.system.ops.cli import serve_subcommands, subcommands_in_help

REPO = Path(__file__).resolve().parents[3]
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|\w+-dev)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages, with line continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, arg = line.partition(" ")
        op, arg = op.upper(), arg.strip()
        if op == "FROM":
            words = arg.split()
            words = [w for w in words if not w.startswith("--")]
            base = re.sub(
                r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if op == "ARG" and "=" in arg:
                key, value = arg.split("=", 1)
                global_args[key] = value
        else:
            stages[-1].instructions.append((op, arg))
    return global_args, stages


def _stages() -> list[Stage]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())[1]


def test_multi_stage_on_python_311_slim() -> None:
    stages = _stages()
    assert len(stages) >= 2
    base_images = {s.base for s in stages if s.base not in {t.name for t in stages}}
    assert base_images == {"python:3.11-slim"}


def test_build_stage_installs_with_constraints() -> None:
    build, final = _stages()[0], _stages()[-1]
    runs = " ".join(build.args("RUN"))
    assert re.search(r"pip install -c constraints\.txt \.(\s|$)", runs)
    copied = [shlex.split(arg)[:-1] for arg in build.args("COPY")]
    sources = {src for srcs in copied for src in srcs if not src.startswith("--")}
    assert {"constraints.txt", "pyproject.toml", "callingest", "services", "schemas"} <= sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert "pip install" not in " ".join(final.args("RUN"))


def test_schemas_land_where_callingest_avro_reads_them() -> None:
    import callingest
    import callingest.avro

    package_dir = Path(callingest.__file__).resolve().parent
    relative = os.path.relpath(callingest.avro.SCHEMA_DIR, package_dir)
    build = _stages()[0]
    targets = [shlex.split(a)[-1] for a in build.args("COPY") if shlex.split(a)[0] == "schemas"]
    site_packages = "/opt/venv/lib/python3.11/site-packages"
    assert targets == [os.path.normpath(f"{site_packages}/callingest/{relative}")]


def test_final_stage_is_non_root_without_build_tools() -> None:
    stages = _stages()
    final = stages[-1]
    users = final.args("USER")
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot checks it)"
    for run in final.args("RUN"):
        assert "apt-get install" not in run and "apk add" not in run
        assert not BUILD_TOOLS.search(run.replace("--no-create-home", "")), run
    for copy in final.args("COPY"):
        assert copy.startswith(f"--from={stages[0].name} ")
    assert any(BUILD_TOOLS.search(r) for r in stages[0].args("RUN")), (
        "build tools belong in the build stage"
    )


def test_cmd_runs_a_real_serve_subcommand() -> None:
    final = _stages()[-1]
    assert final.args("ENTRYPOINT") == []
    (cmd,) = final.args("CMD")
    argv = json.loads(cmd)
    assert argv == ["callingest", "serve", "gateway"]
    assert argv[2] in serve_subcommands()


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern[1:] if negate else pattern
            pat = pat.rstrip("/")
            if (
                fnmatch.fnmatch(path, pat)
                or fnmatch.fnmatch(path, f"{pat}/*")
                or (pat.startswith("**/") and fnmatch.fnmatch(path.rsplit("/", 1)[-1], pat[3:]))
            ):
                result = not negate
        return result

    for path in (
        ".venv/bin/python",
        ".tools/bin/kustomize",
        ".run/logs/gateway.log",
        ".git/HEAD",
        "tests/conftest.py",
        "callingest/__pycache__/x.pyc",
    ):
        assert ignored(path), path
    for path in (
        "constraints.txt",
        "pyproject.toml",
        "callingest/metrics.py",
        "services/gateway/__init__.py",
        "schemas/CallSubmitted/v1.avsc",
    ):
        assert not ignored(path), path


ARGPARSE_HELP = """usage: callingest serve [-h] {gateway,validator,fetcher,normalizer,notifier}

positional arguments:
  {gateway,validator,fetcher,normalizer,notifier}
                        the service to run
"""
CLICK_HELP = """Usage: callingest serve [OPTIONS] {gateway|validator|fetcher|normalizer|notifier}

Options:
  --help  Show this message and exit.
"""
SUBCOMMAND_HELP = """usage: callingest admin [-h] {init} ...

Commands:
  init        create the Kafka topics and the MongoDB indexes
"""


def test_help_parsing_finds_subcommands() -> None:
    services = {"gateway", "validator", "fetcher", "normalizer", "notifier"}
    assert subcommands_in_help(ARGPARSE_HELP) >= services
    assert subcommands_in_help(CLICK_HELP) >= services
    assert "init" in subcommands_in_help(SUBCOMMAND_HELP)
    assert "fetchr" not in subcommands_in_help(ARGPARSE_HELP)
