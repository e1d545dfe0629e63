"""The rules as Prometheus tests them: ``promtool check rules`` and ``promtool test rules``
(tests/system/ops/promtool/*.yml) on the rule file generated from the one PrometheusRule, and a
unit test for every alert: silent while its condition has not held for its ``for``, firing
after, silent on healthy series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from callingest import stages
from callingest.topics import Topics
from tests.system.ops.manifests import OVERLAYS, of_kind, render_overlay
from tests.system.ops.prometheus import alert_names, keda_expressions, require_prometheus
from tools import prometheus


@pytest.fixture(scope="module")
def unit_tests(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    require_prometheus()
    directory = tmp_path_factory.mktemp("promtool")
    return directory, prometheus.prepare_unit_tests(directory)


def test_promtool_check_rules(unit_tests: tuple[Path, list[Path]]) -> None:
    directory, _ = unit_tests
    result = prometheus.promtool("check", "rules", prometheus.RULES_FILE, cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules_refuses_a_broken_rule(tmp_path: Path) -> None:
    require_prometheus()
    source = yaml.safe_load(prometheus.RULE_SOURCE.read_text())
    source["spec"]["groups"][0]["rules"][0]["expr"] = "sum(rate(x[5m])"
    broken = tmp_path / "prometheusrule.yaml"
    broken.write_text(yaml.safe_dump(source))
    prometheus.write_rules(tmp_path / "rules.yml", source=broken)
    result = prometheus.promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert result.returncode != 0


def test_promtool_unit_tests_pass(unit_tests: tuple[Path, list[Path]]) -> None:
    directory, tests = unit_tests
    assert tests, "no promtool unit tests in tests/system/ops/promtool"
    result = prometheus.promtool("test", "rules", *(t.name for t in tests), cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_cases() -> dict[str, list[tuple[str, list[tuple[float, bool]]]]]:
    """alert -> [(test name, [(eval minutes, fires?), ...] in eval order)] from the unit tests."""
    cases: dict[str, list[tuple[str, list[tuple[float, bool]]]]] = {}
    for path in sorted(prometheus.UNIT_TESTS.glob("*.yml")):
        for test in yaml.safe_load(path.read_text())["tests"]:
            checks: dict[str, list[tuple[float, bool]]] = {}
            for case in test.get("alert_rule_test", []):
                at = _minutes(case["eval_time"])
                checks.setdefault(case["alertname"], []).append((at, bool(case.get("exp_alerts"))))
            for alert, seen in checks.items():
                cases.setdefault(alert, []).append((test["name"], sorted(seen)))
    return cases


def _minutes(duration: Any) -> float:
    text = str(duration)
    units = {"s": 1 / 60, "m": 1.0, "h": 60.0, "d": 1440.0}
    total, number = 0.0, ""
    for char in text:
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * units[char]
            number = ""
    return total


def test_every_alert_has_unit_tests_for_firing_and_silence() -> None:
    cases = _alert_cases()
    missing = []
    for alert in alert_names():
        tests = cases.get(alert, [])
        # Fires on its condition after its `for`: one test where it is silent first, then firing.
        fires_after = any(
            any(not fired for _, fired in seen[:i]) and fires
            for _, seen in tests for i, (_, fires) in enumerate(seen)
        )
        # Silent on healthy series: a test in which it never fires.
        silent = any(not any(fired for _, fired in seen) for _, seen in tests)
        if not (fires_after and silent):
            missing.append(f"{alert}: fires after its `for`={fires_after}, silent when healthy={silent}")
    assert missing == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_local_rule_file_is_the_deployed_prometheusrule(overlay: str, tmp_path: Path) -> None:
    """One source: what `make up`'s Prometheus loads is what each overlay deploys."""
    local = yaml.safe_load(prometheus.write_rules(tmp_path / "rules.yml").read_text())
    (deployed,) = of_kind(render_overlay(overlay), "PrometheusRule").values()
    assert local == {"groups": deployed["spec"]["groups"]}


def test_every_alert_is_per_namespace() -> None:
    """Dev and prod in one Prometheus never mix: every alert a unit test expects to fire carries
    the `namespace` of its series (aggregations are `by (namespace, ...)`)."""
    without = set()
    for path in sorted(prometheus.UNIT_TESTS.glob("*.yml")):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                for alert in case.get("exp_alerts") or []:
                    if "namespace" not in alert.get("exp_labels", {}):
                        without.add(case["alertname"])
    assert without == set()
    assert set(_alert_cases()) >= set(alert_names())


def test_lag_scaling_leaves_out_the_retry_tiers(tmp_path: Path) -> None:
    """KEDA scales each consumer on the lag of its input topic: its retry tiers are paused
    until their events are due (callingest.retry_tiers), so their lag is no backlog."""
    require_prometheus()
    topics = Topics("dev-", retry_tiers=4)
    tests = []
    for name, query in keda_expressions():
        def lag(topic: str, value: int, stage: str = name) -> dict[str, str]:
            return {"series": f'callingest_consumer_lag_messages{{service="{stage}", topic="{topic}", '
                              f'partition="0"}}', "values": f"{value}x10"}
        series = [lag(topics.name(stages.BY_NAME[name].input_topic), 100),
                  *(lag(retry, 1000) for retry in topics.retry_topics(name))]
        tests.append({"name": name, "interval": "1m", "input_series": series,
                      "promql_expr_test": [{"expr": query, "eval_time": "5m",
                                            "exp_samples": [{"labels": "{}", "value": 100}]}]})
    assert len(tests) == 4
    (tmp_path / "keda.yml").write_text(yaml.safe_dump({"tests": tests}))
    result = prometheus.promtool("test", "rules", "keda.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
