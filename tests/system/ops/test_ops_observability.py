"""Alerts, recording rules, dashboard and lag-scaling queries name only metrics that callingest
declares (read by Prometheus's own parser); the dashboard is importable and has a row per SLO;
every alert has a runbook section."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import pytest

from callingest.logging import JsonFormatter
from callingest.stages import SERVICES
from services.gateway.receipts import RECEIPTS
from tests.system.ops.prometheus import (
    GRAFANA_DIR,
    REPO,
    SCRAPE_SERIES,
    PrometheusServer,
    PromQLError,
    dashboard_expressions,
    declared_series,
    metric_names_by_source,
    panels,
    record_names,
    rule_expressions,
    rules,
)

# Alert -> the metric its expression must be built on (issue 5, item 3; issue 14, item 3).
REQUIRED_ALERTS = {
    "CallingestServiceDown": "up",
    "CallingestGateway5xxRatioHigh": "callingest_http_requests_total",
    "CallingestGatewayLatencyP99High": "callingest_http_request_duration_seconds_bucket",
    "CallingestConsumerLagGrowing": "callingest_consumer_lag_messages",
    "CallingestFailureRateHigh": "callingest_failures_total",
    "CallingestDeadLettersNotEmpty": "callingest_dead_letters_total",
    "CallingestNotifierCannotSend": "callingest_notifications_total",
    "CallingestApiAvailabilityBudgetBurnFast": "callingest:submission_error_ratio:rate1h",
    "CallingestApiAvailabilityBudgetBurnSlow": "callingest:submission_error_ratio:rate6h",
    "CallingestFreshnessBudgetBurnFast": "callingest:freshness_error_ratio:rate1h",
    "CallingestFreshnessBudgetBurnSlow": "callingest:freshness_error_ratio:rate6h",
}
# SLO -> the recording rules of its error ratio and the raw series they are built on.
SLO_RECORDS = {
    "submission_error_ratio": {"callingest_http_requests_total"},
    "freshness_error_ratio": {"callingest_call_acceptance_to_normalized_seconds_bucket",
                              "callingest_stage_duration_seconds_count"},
}
SLO_WINDOWS = ("5m", "30m", "1h", "6h", "30d")


def test_selected_metrics_come_from_prometheus_parser(promql: PrometheusServer) -> None:
    assert promql.selected_metrics(
        'sum(rate(a_total{status=~"5.."}[5m])) / on (job) group_left(team) b offset 1h'
    ) == {"a_total", "b"}
    assert promql.selected_metrics("max_over_time(deriv(g[5m])[10m:1m]) > bool 3 unless z") == {"g", "z"}
    assert promql.selected_metrics('{__name__="c", route="/x {y}"}') == {"c"}
    assert promql.selected_metrics("vector(1) > inf") == set()
    with pytest.raises(PromQLError):
        promql.selected_metrics("sum(rate(x[5m])")


def test_every_queried_metric_is_declared(promql: PrometheusServer) -> None:
    known = set(declared_series()) | record_names() | SCRAPE_SERIES
    unknown = {source: sorted(names - known)
               for source, names in metric_names_by_source(promql).items() if names - known}
    assert unknown == {}


def test_every_source_queries_a_metric(promql: PrometheusServer) -> None:
    empty = [source for source, names in metric_names_by_source(promql).items() if not names]
    assert empty == []


def test_required_alerts_exist_on_their_metric(promql: PrometheusServer) -> None:
    alerts = dict(rule_expressions())
    for alert, metric in REQUIRED_ALERTS.items():
        assert alert in alerts, f"missing alert {alert}"
        assert metric in promql.selected_metrics(alerts[alert]), f"{alert} must use {metric}"
    by_name = {r.get("alert"): r for r in rules()}
    assert by_name["CallingestConsumerLagGrowing"]["for"] == "10m"
    assert "histogram_quantile(0.99" in alerts["CallingestGatewayLatencyP99High"]


def test_the_service_down_alert_watches_every_service() -> None:
    (expr,) = [e for name, e in rule_expressions() if name == "CallingestServiceDown"]
    (services,) = re.findall(r'up\{service=~"([^"]+)"\} == 0', expr)
    assert sorted(services.split("|")) == sorted(SERVICES)


def test_slo_recording_rules_cover_every_window(promql: PrometheusServer) -> None:
    records = dict((name, expr) for name, expr in rule_expressions() if name in record_names())
    for ratio, raw in SLO_RECORDS.items():
        for window in SLO_WINDOWS:
            name = f"callingest:{ratio}:rate{window}"
            assert name in records, f"missing recording rule {name}"
            assert promql.selected_metrics(records[name]) == raw, name
            assert f"[{window}]" in records[name]


def test_dashboard_has_a_panel_for_every_metric_family(promql: PrometheusServer) -> None:
    declared = declared_series()
    families_with_panel = {
        declared[name]
        for source, names in metric_names_by_source(promql).items()
        if source.startswith("dashboard:") and "/$" not in source
        for name in names
        if name in declared
    }
    assert families_with_panel == set(declared.values())


def test_dashboard_has_a_row_per_slo(promql: PrometheusServer) -> None:
    (path,) = GRAFANA_DIR.glob("*.json")
    rows: dict[str, set[str]] = {}
    current = None
    for panel in json.loads(path.read_text())["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = set()
        elif current is not None:
            for target in panel["targets"]:
                rows[current] |= promql.selected_metrics(
                    target["expr"].replace("$__rate_interval", "1m").replace("$namespace", "x"))
    for ratio in SLO_RECORDS:
        slo_rows = [title for title, names in rows.items()
                    if title.startswith("SLO:") and {f"callingest:{ratio}:rate5m",
                                                     f"callingest:{ratio}:rate30d"} <= names]
        assert len(slo_rows) == 1, f"one dashboard row must show the SLO of {ratio}: {rows}"


def test_dashboard_json_is_importable() -> None:
    (path,) = GRAFANA_DIR.glob("*.json")
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    all_panels = list(panels(dashboard))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in all_panels:
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
    for rule in rules():
        if "alert" not in rule:
            continue
        assert rule["alert"].lower() in headings, f"docs/runbook.md has no section '{rule['alert']}'"
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor == rule["alert"].lower()
    assert "service-level-objectives" in headings
    for flag in ("--cuid", "--stage", "--since", "--failure-class", "--dry-run"):
        assert flag in runbook


def test_the_runbook_first_look_grep_finds_the_services_warnings_and_errors(tmp_path: Path) -> None:
    """The pattern of the runbook's `k logs ... | grep -E` on lines as the services write them."""
    (pattern,) = re.findall(r"k logs deploy/<service> [^\n]*\| grep -E '([^']+)'",
                            (REPO / "docs/runbook.md").read_text())
    formatter = JsonFormatter("fetcher")
    log = tmp_path / "fetcher.log"
    log.write_text("".join(
        formatter.format(logging.LogRecord("callingest.x", level, __file__, 1, "m", None, None)) + "\n"
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)))
    found = subprocess.run(["grep", "-E", pattern, str(log)], capture_output=True, text=True,
                           check=False).stdout
    assert [json.loads(line)["level"] for line in found.splitlines()] == ["warning", "error", "critical"]


def test_the_runbook_says_where_publication_is_recorded() -> None:
    runbook = (REPO / "docs/runbook.md").read_text()
    section = runbook.split("## CallingestUnpublishedCallsStuck", 1)[1].split("\n## ", 1)[0]
    assert f"`{RECEIPTS}`" in section
    assert "(`published: false`)" not in section
