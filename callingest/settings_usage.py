"""Which settings each command reads, derived from the source code itself.

For a command's entry function (``services.fetcher.main:serve``, ...) this follows what the
function uses: the functions and classes it names, in its own module and in the modules of
this project it imports (``callingest``, ``services``), transitively, and collects every read
of a :class:`~callingest.settings.Settings` field (``settings.x``, ``ctx.settings.x``,
``app[keys.SETTINGS].x``, or a parameter annotated ``Settings``).

Two things use it: :func:`callingest.settings.load_settings` requires only the settings a
service reads (the gateway does not need ``SMTP_HOST``), and the manifest tests check that
each Kubernetes workload gets exactly the settings its command reads.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from callingest.settings import Settings
from callingest.stages import BY_NAME, SERVICES

PACKAGES = ("callingest", "services")

ENTRY_POINTS: dict[str, tuple[str, str]] = {
    **{service: (f"services.{service}.main", "serve") for service in SERVICES},
    "admin-init": ("callingest.infra", "prepare_infrastructure"),
    "admin-rotate-secrets": ("callingest.rotation", "run_rotation"),
    "admin-generate-secret-key": ("callingest.secretbox", "generate_key_entry"),
    "config-apply": ("callingest.cli", "_config_apply"),
    "calls-show": ("callingest.cli", "_calls_show"),
    "replay": ("callingest.replay", "run_replay"),
}
"""Command (a ``callingest serve`` service, or another command and its action, as
:func:`callingest.cli.command_name` names it; the admin-init Job) -> (module, function)."""

FIELDS = frozenset(Settings.model_fields)
_MODULE_LEVEL = "<module>"


@dataclass
class _Module:
    name: str
    units: dict[str, ast.AST] = field(default_factory=dict)
    body: list[ast.stmt] = field(default_factory=list)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


@cache
def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # a top-level package: imports only its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _source(module: str) -> Path | None:
    """The source file of one of our modules, found without importing it (fast start-up)."""
    top, *rest = module.split(".")
    base = _package_dir(top)
    if base is None:
        return None
    path = base.joinpath(*rest)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if rest and candidate.is_file():
            return candidate
    return base / "__init__.py" if not rest else None


def _is_module(name: str) -> bool:
    return _source(name) is not None


def _binding(module: str, node: ast.ImportFrom | ast.Import) -> Iterator[tuple[str, tuple[str, str | None]]]:
    """(bound name, (module, attribute or None for the whole module)) of an import."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if _ours(alias.name):
                bound = alias.asname or alias.name.split(".")[0]
                yield bound, (alias.name if alias.asname else alias.name.split(".")[0], None)
        return
    base = node.module or ""
    if node.level:
        parent = module.rsplit(".", node.level)[0]
        base = f"{parent}.{base}" if base else parent
    if not _ours(base):
        return
    for alias in node.names:
        full = f"{base}.{alias.name}"
        yield alias.asname or alias.name, (full, None) if _is_module(full) else (base, alias.name)


@cache
def _load(module: str) -> _Module:
    source = _source(module)
    if source is None:
        raise LookupError(f"no source for {module}")
    tree = ast.parse(source.read_text(), str(source))
    mod = _Module(module)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            mod.units[node.name] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            mod.imports.update(_binding(module, node))
        elif isinstance(node, ast.If) and (_is_type_checking(node) or _is_main(node)):
            continue
        else:
            mod.body.append(node)
    return mod


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _is_main(node: ast.If) -> bool:
    """``if __name__ == "__main__":`` (runs only as a script, not for the command)."""
    return "__name__" in ast.unparse(node.test)


def _settings_names(node: ast.AST) -> set[str]:
    """Parameters annotated ``Settings`` (any name) in the functions under ``node``."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg) and sub.annotation is not None:
            if "Settings" in ast.unparse(sub.annotation).split("|")[0]:
                names.add(sub.arg)
    return names


def _is_settings(node: ast.expr, aliases: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return "settings" in node.id.lower() or node.id in aliases
    if isinstance(node, ast.Attribute):
        return "settings" in node.attr.lower()
    if isinstance(node, ast.Subscript):
        return "SETTINGS" in ast.unparse(node.slice)
    return False


def _scan(module: _Module, nodes: list[ast.AST]) -> tuple[set[str], set[tuple[str, str | None]]]:
    """Settings read by ``nodes`` and the units they reach: (module, name or None = all)."""
    reads: set[str] = set()
    reached: set[tuple[str, str | None]] = set()
    local_imports: dict[str, tuple[str, str | None]] = {}
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import | ast.ImportFrom):
                local_imports.update(_binding(module.name, sub))
    imports = {**module.imports, **local_imports}
    for node in nodes:
        aliases = _settings_names(node)
        # ``module.name``: only that name of the module is reached, not all of it.
        qualified = {id(sub.value) for sub in ast.walk(node)
                     if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute):
                if sub.attr in FIELDS and _is_settings(sub.value, aliases):
                    reads.add(sub.attr)
                if isinstance(sub.value, ast.Name) and sub.value.id in imports:
                    target, attr = imports[sub.value.id]
                    if attr is None:  # module.name
                        reached.add((target, sub.attr))
            elif isinstance(sub, ast.Name):
                if sub.id in module.units:
                    reached.add((module.name, sub.id))
                elif sub.id in imports:
                    target, attr = imports[sub.id]
                    if attr is not None or id(sub) not in qualified:
                        reached.add((target, attr))
    return reads, reached


@cache
def reads_of(module: str, function: str) -> frozenset[str]:
    """Every Settings field read by ``module.function`` and what it uses, transitively."""
    reads: set[str] = set()
    seen: set[tuple[str, str]] = set()
    todo: list[tuple[str, str | None]] = [(module, _MODULE_LEVEL), (module, function)]
    while todo:
        mod_name, unit = todo.pop()
        mod = _load(mod_name)
        names = [*list(mod.units), _MODULE_LEVEL] if unit is None else [unit]
        for name in names:
            if (mod_name, name) in seen:
                continue
            seen.add((mod_name, name))
            if name == _MODULE_LEVEL:
                nodes: list[ast.AST] = list(mod.body)
            elif name in mod.units:
                nodes = [mod.units[name]]
                todo.append((mod_name, _MODULE_LEVEL))
            else:
                continue  # a constant or re-export without a definition of its own here
            found, reached = _scan(mod, nodes)
            reads |= found
            todo.extend(reached)
    return frozenset(reads)


PROFILE = "callingest_env"
"""Read by every command that reads a setting: the profile decides which settings are required
and which values are allowed (:mod:`callingest.settings`)."""


def reads(command: str) -> frozenset[str]:
    """The settings ``command`` (a key of :data:`ENTRY_POINTS`) reads; a stage also reads the
    setting the stage graph names as its bound on events in flight (read by name)."""
    spec = BY_NAME.get(command)
    found = reads_of(*ENTRY_POINTS[command]) | ({spec.in_flight_setting} if spec else set())
    return found | {PROFILE} if found else found


def env_names(command: str) -> frozenset[str]:
    """The environment variables of the settings ``command`` reads."""
    return frozenset(name.upper() for name in reads(command))
