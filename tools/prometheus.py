"""Prometheus for the dev stack, and the rule checks with promtool.

The alerting and recording rules have one source: the Kubernetes PrometheusRule
``deploy/k8s/base/monitoring/prometheusrule.yaml``. Its ``spec`` is a Prometheus
rule file; :func:`write_rules` writes it out as one for the local Prometheus and
for promtool. The promtool unit tests of the rules live in ``tests/system/ops/promtool``.

Usage: ``python -m tools.prometheus rules OUT.yml`` (write the rule file),
``python -m tools.prometheus check [DIR]`` (``promtool check rules`` and
``promtool test rules`` on the rules, in DIR, default ``build/prometheus``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULE_SOURCE = ROOT / "deploy" / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
UNIT_TESTS = ROOT / "tests" / "system" / "ops" / "promtool"
RULES_FILE = "callingest.rules.yml"
BIN = ROOT / ".tools" / "bin"
# The `namespace` label the local stack's series carry (in Kubernetes the Prometheus Operator
# adds the pod's namespace), so the rules' `by (namespace)` and the dashboard's $namespace work.
LOCAL_NAMESPACE = "local"


def binary(name: str) -> Path:
    """``.tools/bin/<name>`` (prometheus or promtool), built by ``make setup``."""
    path = BIN / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make setup` (or `make prometheus`) first")
    return path


def rule_groups(source: Path = RULE_SOURCE) -> dict[str, Any]:
    """The PrometheusRule's ``spec``: a Prometheus rule file (``{"groups": [...]}``)."""
    (doc,) = [d for d in yaml.safe_load_all(source.read_text()) if d]
    if doc.get("kind") != "PrometheusRule":
        raise ValueError(f"{source} is not a PrometheusRule")
    return {"groups": doc["spec"]["groups"]}


def write_rules(path: Path, source: Path = RULE_SOURCE) -> Path:
    """Write the rule file generated from ``source`` to ``path``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    origin = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    header = f"# Generated from {origin} by tools/prometheus.py; do not edit.\n"
    path.write_text(header + yaml.safe_dump(rule_groups(source), sort_keys=False, width=1000))
    return path


def scrape_config(targets: Mapping[str, int], rules_file: Path, interval: str = "5s",
                  namespace: str = LOCAL_NAMESPACE) -> dict[str, Any]:
    """A Prometheus configuration scraping ``/metrics`` of each ``{service: port}`` on loopback,
    with ``rules_file`` loaded. Each service is its own job; every series gets ``namespace``
    and ``service`` (as the Prometheus Operator labels a target with its namespace and
    Kubernetes Service; the rules' ``up{service=...}`` needs both)."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {
                "job_name": f"callingest-{service}",
                "metrics_path": "/metrics",
                # The services label their own series with `service` (as on Kubernetes, where
                # the ServiceMonitor sets honorLabels).
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                    "labels": {"namespace": namespace, "service": service}}],
            }
            for service, port in targets.items()
        ],
    }


def write_config(directory: Path, targets: Mapping[str, int], interval: str = "5s") -> Path:
    """Write ``prometheus.yml`` and the rule file into ``directory``; returns the config's path."""
    rules = write_rules(directory / RULES_FILE)
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(targets, rules, interval), sort_keys=False))
    return config


def server_argv(config: Path, data_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of a Prometheus server for ``config`` listening on ``host:port``."""
    return [str(binary("prometheus")), f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address={host}:{port}", "--storage.tsdb.retention.time=2d",
            "--web.enable-lifecycle", "--log.level=warn"]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool with ``args``; its output is returned, not raised on."""
    return subprocess.run([str(binary("promtool")), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def prepare_unit_tests(directory: Path) -> list[Path]:
    """Put the rule file and the promtool unit tests into ``directory``; the test files."""
    directory.mkdir(parents=True, exist_ok=True)
    write_rules(directory / RULES_FILE)
    tests = []
    for test in sorted(UNIT_TESTS.glob("*.yml")):
        tests.append(Path(shutil.copy(test, directory / test.name)))
    return tests


def check(directory: Path) -> int:
    """``promtool check rules`` and ``promtool test rules`` on the project's rules."""
    tests = prepare_unit_tests(directory)
    status = 0
    for args in (("check", "rules", RULES_FILE), ("test", "rules", *(t.name for t in tests))):
        result = promtool(*args, cwd=directory)
        print(result.stdout + result.stderr, end="")
        status = status or result.returncode
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools.prometheus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    rules = sub.add_parser("rules", help="write the rule file generated from the PrometheusRule")
    rules.add_argument("out", type=Path)
    checks = sub.add_parser("check", help="promtool check rules + promtool test rules")
    checks.add_argument("directory", type=Path, nargs="?", default=ROOT / "build" / "prometheus")
    args = parser.parse_args(argv)
    if args.action == "rules":
        write_rules(args.out)
        return 0
    return check(args.directory)


if __name__ == "__main__":
    sys.exit(main())
