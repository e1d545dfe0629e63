"""The PromQL this repository ships, and a real Prometheus server to parse and evaluate it.

Queries come from the PrometheusRule (alerts and recording rules), the Grafana dashboards
(panels and template variables) and the KEDA lag-scaling triggers. Which metrics a query
selects is read from the syntax tree that Prometheus's own parser returns
(``/api/v1/parse_query``), never from a parser of our own.

:class:`PrometheusServer` runs ``.tools/bin/prometheus`` (built by ``make setup``) on a free
loopback port with a configuration from :mod:`tools.prometheus`: with no targets for
parsing, or scraping services for the live tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools import prometheus

REPO = Path(__file__).resolve().parents[3]
PROMETHEUS_RULE = prometheus.RULE_SOURCE
KEDA_SCALED_OBJECTS = REPO / "deploy/k8s/components/keda-lag-scaling/scaledobjects.yaml"
GRAFANA_DIR = REPO / "deploy/grafana"

# What Grafana substitutes for its built-in interval variables when it sends a query.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+?)\s*,)?\s*(\w+)\s*\)\s*$")


# -- the queries we ship ---------------------------------------------------------------------------


def rules(path: Path = PROMETHEUS_RULE) -> list[dict[str, Any]]:
    """Every rule (alert or record) of the PrometheusRule, with its group name as ``group``."""
    return [{**rule, "group": group["name"]}
            for group in prometheus.rule_groups(path)["groups"] for rule in group["rules"]]


def rule_expressions(path: Path = PROMETHEUS_RULE) -> Iterator[tuple[str, str]]:
    """(alert or record name, expr) for every rule of the PrometheusRule."""
    for rule in rules(path):
        yield rule.get("alert") or rule["record"], str(rule["expr"])


def alert_names(path: Path = PROMETHEUS_RULE) -> list[str]:
    return [rule["alert"] for rule in rules(path) if "alert" in rule]


def record_names(path: Path = PROMETHEUS_RULE) -> set[str]:
    return {rule["record"] for rule in rules(path) if "record" in rule}


def dashboards(directory: Path = GRAFANA_DIR) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(directory.glob("*.json")):
        yield path.name, json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard.get("panels", []))


def dashboard_expressions(directory: Path = GRAFANA_DIR) -> Iterator[tuple[str, str]]:
    """(dashboard/panel title, expr) for every panel query of every dashboard."""
    for name, dashboard in dashboards(directory):
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield f"{name}/{panel.get('title')}", str(target["expr"])


def dashboard_variable_queries(directory: Path = GRAFANA_DIR) -> Iterator[tuple[str, str]]:
    """(dashboard/$variable, query) for every query-type template variable."""
    for name, dashboard in dashboards(directory):
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable.get("query")
            if isinstance(query, dict):
                query = query.get("query")
            if query:
                yield f"{name}/${variable['name']}", str(query)


def keda_expressions(path: Path = KEDA_SCALED_OBJECTS) -> Iterator[tuple[str, str]]:
    """(ScaledObject name, query) for every prometheus trigger of the KEDA component."""
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "ScaledObject":
            continue
        for trigger in doc["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                yield doc["metadata"]["name"], trigger["metadata"]["query"]


def grafana_to_promql(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` as Grafana sends it: built-in intervals and ``variables`` substituted.

    Raises KeyError for a variable that is neither.
    """
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return GRAFANA_INTERVALS[name] if name in GRAFANA_INTERVALS else variables[name]

    return _GRAFANA_VARIABLE.sub(value, expr)


def label_values_selector(query: str) -> tuple[str | None, str]:
    """(series selector or None, label) of a Grafana ``label_values(...)`` variable query."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise ValueError(f"not a label_values() query: {query!r}")
    return match.group(1), match.group(2)


#: Series Prometheus writes itself for every target, which the rules may query too.
SCRAPE_SERIES = frozenset({"up"})


def declared_series() -> dict[str, str]:
    """Series name -> metric family, for every metric declared in callingest/metrics.py
    (``_total`` for counters, ``_bucket``/``_sum``/``_count`` for histograms)."""
    from prometheus_client.metrics import MetricWrapperBase

    import callingest.metrics as metrics

    series: dict[str, str] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for described in value.describe():
            family, kind = described.name, described.type
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                        "summary": ["_sum", "_count", ""]}.get(kind, [""])
            for suffix in suffixes:
                series[family + suffix] = family
    return series


# -- a real Prometheus ---------------------------------------------------------------------------------


class PromQLError(Exception):
    """Prometheus refused a query (bad syntax, evaluation error)."""


@dataclass
class PrometheusServer:
    """``.tools/bin/prometheus`` on a loopback port, started by :meth:`start`."""

    directory: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, targets: Mapping[str, int] | None = None, interval: str = "2s",
              timeout: float = 60.0) -> PrometheusServer:
        """Start scraping ``targets`` ({service: port} on loopback) with the project's rules."""
        config = prometheus.write_config(self.directory, targets or {}, interval)
        log = open(self.directory / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            prometheus.server_argv(config, self.directory / "data", self.port),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        from tests.conftest import wait_process_ready

        wait_process_ready("prometheus", self.proc, f"{self.url}/-/ready", self.log_text, timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def log_text(self) -> str:
        path = self.directory / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a success, else :class:`PromQLError`."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant-query result of ``expr`` (a vector's samples, or one scalar as a list)."""
        data = self.api("query", query=expr)
        result = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [{"value": result}]

    def selected_metrics(self, expr: str) -> set[str]:
        """The metric names that ``expr`` selects, from Prometheus's syntax tree."""
        return set(_selector_names(self.api("parse_query", query=expr)))


def _selector_names(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if node.get("type") in ("vectorSelector", "matrixSelector"):
            name = node.get("name") or next(
                (m["value"] for m in node.get("matchers", [])
                 if m.get("name") == "__name__" and m.get("type") == "="), None)
            if name:
                yield name
        for value in node.values():
            yield from _selector_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _selector_names(value)


def require_prometheus() -> None:
    """Fail (not skip) the calling test when ``make setup`` has not built Prometheus."""
    for name in ("prometheus", "promtool"):
        path = prometheus.BIN / name
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} not found: run `make setup` (or `make prometheus`)")


def metric_names_by_source(server: PrometheusServer) -> dict[str, set[str]]:
    """Every query we ship, keyed ``kind:name`` (rule, dashboard, keda), with the metric names
    it selects (Grafana variables given placeholder values: they do not change the names)."""
    found: dict[str, set[str]] = {}

    def add(key: str, expr: str) -> None:
        found[key] = found.get(key, set()) | server.selected_metrics(expr)

    for name, expr in rule_expressions():
        add(f"rule:{name}", expr)
    for name, expr in dashboard_expressions():
        add(f"dashboard:{name}", grafana_to_promql(expr, _PLACEHOLDERS))
    for name, query in dashboard_variable_queries():
        selector, _label = label_values_selector(query)
        found[f"dashboard:{name}"] = server.selected_metrics(selector) if selector else set()
    for name, expr in keda_expressions():
        add(f"keda:{name}", expr)
    return found


class _Placeholders(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "placeholder"


_PLACEHOLDERS = _Placeholders()


def metric_names_used(server: PrometheusServer) -> set[str]:
    """Every metric (series) name selected by a rule, a dashboard query or a KEDA trigger."""
    return set().union(*metric_names_by_source(server).values())
