"""Alerts, dashboard and lag-scaling queries name only metrics that callingest declares."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.ops.promql import (
    GRAFANA_DIR,
    PROMETHEUS_RULE,
    REPO,
    alert_expressions,
    dashboard_expressions,
    declared_series,
    metric_names_by_source,
    metric_names_in,
    metric_names_used,
)

# Alert -> the metric its expression must be built on (issue 5, item 3).
REQUIRED_ALERTS = {
    "CallingestGateway5xxRatioHigh": "callingest_http_requests_total",
    "CallingestGatewayLatencyP99High": "callingest_http_request_duration_seconds_bucket",
    "CallingestConsumerLagGrowing": "callingest_consumer_lag_messages",
    "CallingestFailureRateHigh": "callingest_failures_total",
    "CallingestDeadLettersNotEmpty": "callingest_dead_letters_total",
    "CallingestNotifierCannotSend": "callingest_notifications_total",
}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum(rate(a_total{status=~"5.."}[5m])) / sum(rate(a_total[5m]))', {"a_total"}),
        ("histogram_quantile(0.99, sum by (le, route) (rate(h_bucket[5m])))", {"h_bucket"}),
        ("sum(rate(x[5m])) by (job) / on (job) group_left(team) y offset 1h", {"x", "y"}),
        ("max_over_time(deriv(g[5m])[10m:1m]) > bool 3 unless z", {"g", "z"}),
        ('rate(c{route="/x {y}"}[$__rate_interval]) and d{ns="$namespace"}', {"c", "d"}),
        ("vector(1) > inf or NaN", set()),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names_in(expr) == names


def test_every_queried_metric_is_declared() -> None:
    declared = declared_series()
    unknown = {
        source: sorted(names - set(declared))
        for source, names in metric_names_by_source().items()
        if names - set(declared)
    }
    assert unknown == {}
    assert metric_names_used() <= set(declared)


def test_every_source_queries_a_metric() -> None:
    empty = [source for source, names in metric_names_by_source().items() if not names]
    assert empty == []


def test_required_alerts_exist_on_their_metric() -> None:
    alerts = dict(alert_expressions())
    for alert, metric in REQUIRED_ALERTS.items():
        assert alert in alerts, f"missing alert {alert}"
        assert metric in metric_names_in(alerts[alert]), f"{alert} must use {metric}"
    assert "histogram_quantile(0.99" in alerts["CallingestGatewayLatencyP99High"]
    assert 'outcome="error"' in alerts["CallingestNotifierCannotSend"]
    assert "failure_class" in alerts["CallingestFailureRateHigh"]
    lag = next(
        rule
        for doc in yaml.safe_load_all(PROMETHEUS_RULE.read_text())
        for group in doc["spec"]["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "CallingestConsumerLagGrowing"
    )
    assert lag["for"] == "10m"


def test_dashboard_has_a_panel_for_every_metric_family() -> None:
    declared = declared_series()
    families_with_panel = {
        declared[name]
        for source, names in metric_names_by_source().items()
        if source.startswith("dashboard:") and "/$" not in source
        for name in names
        if name in declared
    }
    assert families_with_panel == set(declared.values())


def test_dashboard_json_is_importable() -> None:
    (path,) = GRAFANA_DIR.glob("*.json")
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
    for _, expr in dashboard_expressions():
        for var in re.findall(r"\$\{?(\w+)", expr):
            assert var in variables or var.startswith("__"), f"unknown variable ${var}"


def test_every_alert_has_a_runbook_section() -> None:
    runbook = (REPO / "docs/runbook.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+\s+(.+)$", runbook, re.M)
    }
    for alert, _ in alert_expressions():
        assert alert.lower() in headings, f"docs/runbook.md has no section '{alert}'"
    for doc in yaml.safe_load_all(PROMETHEUS_RULE.read_text()):
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
                assert anchor == rule["alert"].lower()
    for flag in ("--cuid", "--stage", "--since", "--failure-class", "--dry-run"):
        assert flag in runbook
