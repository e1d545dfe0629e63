"""Metric names in the PromQL this repository ships, and the series callingest declares.

``metric_names_used()`` is the set of metric (series) names that the alert rules, the
Grafana dashboard and the KEDA lag-scaling queries select. ``declared_series()`` is the
set of series names that callingest/metrics.py exports (``_total`` for counters,
``_bucket``/``_sum``/``_count`` for histograms). A test compares the two; a live
``/metrics`` scrape can be compared with ``metric_names_used()`` the same way.

The extractor understands the PromQL we write: selectors, functions, aggregations with
``by``/``without`` label lists, vector matching (``on``/``ignoring``/``group_left``/
``group_right``), ranges and subqueries, ``offset``, strings, numbers and Grafana's
``$variables``. It reads only files; it needs neither kustomize nor a cluster.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_RULE = REPO / "deploy/k8s/base/monitoring/prometheusrule.yaml"
KEDA_SCALED_OBJECTS = REPO / "deploy/k8s/components/keda-lag-scaling/scaledobjects.yaml"
GRAFANA_DIR = REPO / "deploy/grafana"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_]\w*")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?")
_NUMBER_WORDS = frozenset({"inf", "nan"})
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "atan2",
    }
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:([A-Za-z_:][^,]*),)?\s*[A-Za-z_]\w*\s*\)\s*$")


def metric_names_in(expr: str) -> set[str]:
    """The metric names selected by one PromQL expression (functions and labels excluded)."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VAR.sub("0", text)
    previous = None
    while previous != text:  # nested subqueries such as x[5m:1m] inside f(...)[10m:]
        previous = text
        text = _BRACES.sub(" ", text)
        text = _BRACKETS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS or name.lower() in _NUMBER_WORDS:
            continue
        names.add(name)
    return names


def _grafana_variable_metric(query: str) -> set[str]:
    """Metric named by a Grafana template query: label_values(metric, label) or PromQL."""
    match = _LABEL_VALUES.match(query)
    if match:
        return metric_names_in(match.group(1)) if match.group(1) else set()
    return metric_names_in(query)


def alert_expressions(path: Path = PROMETHEUS_RULE) -> Iterator[tuple[str, str]]:
    """(alert or record name, expr) for every rule of the PrometheusRule file."""
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "PrometheusRule":
            continue
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                yield rule.get("alert") or rule.get("record"), str(rule["expr"])


def dashboard_expressions(directory: Path = GRAFANA_DIR) -> Iterator[tuple[str, str]]:
    """(dashboard/panel title, expr) for every query of every dashboard JSON in ``directory``.

    Template-variable queries are included as ``(dashboard/$name, query)``.
    """
    for path in sorted(directory.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield f"{path.name}/{panel.get('title')}", target["expr"]
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable.get("query")
            if isinstance(query, dict):
                query = query.get("query")
            if query:
                yield f"{path.name}/${variable['name']}", str(query)


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def keda_expressions(path: Path = KEDA_SCALED_OBJECTS) -> Iterator[tuple[str, str]]:
    """(ScaledObject name, query) for every prometheus trigger of the KEDA component."""
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "ScaledObject":
            continue
        for trigger in doc["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                yield doc["metadata"]["name"], trigger["metadata"]["query"]


def metric_names_by_source() -> dict[str, set[str]]:
    """Every shipped query, keyed by where it comes from, with the metric names it selects."""
    found: dict[str, set[str]] = {}
    for kind, source in (
        ("alert", alert_expressions()),
        ("dashboard", dashboard_expressions()),
        ("keda", keda_expressions()),
    ):
        for name, expr in source:
            key = f"{kind}:{name}"
            if kind == "dashboard" and name.split("/")[-1].startswith("$"):
                names = _grafana_variable_metric(expr)
            else:
                names = metric_names_in(expr)
            found[key] = found.get(key, set()) | names
    return found


def metric_names_used() -> set[str]:
    """Every metric (series) name selected by an alert, a dashboard query or a KEDA trigger."""
    return set().union(*metric_names_by_source().values())


def declared_series() -> dict[str, str]:
    """Series name -> metric family name, for every metric declared in callingest/metrics.py."""
    from prometheus_client.metrics import MetricWrapperBase

    import callingest.metrics as metrics

    series: dict[str, str] = {}
    families = [
        described
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for described in value.describe()
    ]
    for described in families:
        family, kind = described.name, described.type
        if kind == "counter":
            names = [f"{family}_total"]
        elif kind == "histogram":
            names = [f"{family}_bucket", f"{family}_sum", f"{family}_count"]
        elif kind == "summary":
            names = [f"{family}_sum", f"{family}_count", family]
        else:
            names = [family]
        for name in names:
            series[name] = family
    return series
