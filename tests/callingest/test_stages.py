"""The stage graph is declared once (issue 13 point 3): every list of services, stages,
topics, ports and statuses is read from ``callingest.stages``, and each step takes the
typed resources its row names."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import typing
from datetime import UTC, datetime
from typing import Any

import pytest

from callingest import cli, events, replay, service, stages
from callingest.kafka import event_id
from callingest.pipeline import StageRunner
from callingest.settings import Settings
from callingest.stages import CALL_STAGES, SERVICE_PORTS, SERVICES, STAGES, Retry
from callingest.steps import NoResources, Resources, Stage, StageContext
from callingest.topics import Topics
from tests.conftest import ROOT
from tools import devstack

STAGE_NAME = re.compile('"(' + "|".join(s.name for s in STAGES) + ')"')


def test_no_module_but_the_graph_lists_the_stages() -> None:
    """A line naming two stages is a restated list (a tuple, a dict, a port map)."""
    restated = []
    for package in ("callingest", "services", "tools"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "callingest" / "stages.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if len(set(STAGE_NAME.findall(line))) >= 2:
                    restated.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert restated == []


def test_graph_is_a_chain_from_the_gateway() -> None:
    assert SERVICES == ("gateway", "validator", "fetcher", "normalizer", "notifier", "webhooks")
    assert CALL_STAGES == ("validator", "fetcher", "normalizer")
    assert [stages.upstream(s) for s in CALL_STAGES] == ["gateway", "validator", "fetcher"]
    assert [stages.status_before(s) for s in CALL_STAGES] == ["received", "validated", "fetched"]
    assert {s.name: s.retry for s in STAGES}["notifier"] is Retry.FOREVER
    assert [s.name for s in STAGES if s.terminal] == ["normalizer"]
    assert len(set(SERVICE_PORTS.values())) == len(SERVICES)


def _choices(parser: argparse.ArgumentParser, *path: str) -> Any:
    for name in path[:-1]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return next(a.choices for a in parser._actions if a.dest == path[-1])


def test_cli_choices_are_the_graphs() -> None:
    parser = cli._parser()
    assert tuple(_choices(parser, "serve", "service")) == SERVICES
    assert tuple(_choices(parser, "replay", "stage")) == CALL_STAGES
    for name in SERVICES:  # every service the CLI offers has an entry point
        assert callable(importlib.import_module(f"services.{name}.main").serve)


def test_devstack_runs_the_graphs_services_on_its_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVICES:
        monkeypatch.delenv(f"{name.upper()}_PORT", raising=False)
    assert devstack.SERVICES == SERVICES
    ports = devstack.Ports()
    assert {name: ports.of(name) for name in SERVICES} == SERVICE_PORTS
    monkeypatch.setenv("FETCHER_PORT", "18982")
    assert devstack.Ports().of("fetcher") == 18982


def test_service_ports_are_the_graphs() -> None:
    settings = Settings(callingest_env="dev")
    assert {name: service.port_of(name, settings) for name in SERVICES} == SERVICE_PORTS


def test_topics_are_the_graphs() -> None:
    topics = Topics("t-", retry_tiers=2)
    graph = {topics.name(t) for s in STAGES for t in (s.input_topic, s.output_topic) if t}
    retries = {f"t-retry.{s.name}.{tier}" for s in STAGES for tier in (0, 1)}
    assert set(topics.all()) == graph | retries | {topics.dead_letter}
    assert len(topics.all()) == len(set(topics.all()))


def test_each_step_takes_the_resources_its_row_names() -> None:
    for spec in STAGES:
        step = importlib.import_module(f"services.{spec.name}.step").step
        context = typing.get_type_hints(step)["ctx"]
        assert typing.get_origin(context) is StageContext
        (resources,) = typing.get_args(context)
        assert resources is spec.resources_type(), spec.name
        assert issubclass(resources, Resources) and dataclasses.is_dataclass(resources)


def test_stage_inputs_and_restarts_follow_the_graph() -> None:
    call = {"_id": "c1", "network_id": "1001", "external_call_unique_id": "x",
            "start_time": datetime(2026, 1, 1, tzinfo=UTC), "calling_phone_number": "+1",
            "destination_phone_number": "+2", "advertiser_campaign_id_from_network": "85",
            "call_direction": "inbound", "recording_url": "http://127.0.0.1/r.wav",
            "language_code": "en-US",
            "fetched": {"bucket": "b", "key": "k", "size_bytes": 1, "format": "wav"}}
    topics = Topics("t-")
    for name in CALL_STAGES:
        spec = stages.stage(name)
        topic, event, record = events.stage_input(call, name, 3)
        assert (topic, event) == (spec.input_topic, spec.input_event)
        assert record["event_id"] == event_id("c1", stages.upstream(name), 3)
        assert events.input_topic(topics, name) == topics.name(spec.input_topic)
        failed = {**call, "status": "failed", "failure": {"stage": name}}
        assert replay.restart_stage(failed) == name
    # The normalizer's permanent failure was the recording's bytes: a restart downloads again.
    normalizer = {**call, "status": "failed", "failure": {"stage": "normalizer", "retryable": False}}
    assert replay.restart_stage(normalizer) == "fetcher"
    normalizer["failure"]["retryable"] = True  # gave up on a transient error: the same bytes
    assert replay.restart_stage(normalizer) == "normalizer"
    assert replay.restart_stage({**normalizer, "fetched": None}) == "fetcher"
    with pytest.raises(ValueError):
        events.stage_input(call, "notifier", 1)


def test_runner_takes_topics_retries_and_bound_from_the_row() -> None:
    settings = Settings(callingest_env="dev", topic_prefix="t-", fetcher_max_in_flight=77,
                        max_in_flight=5, retry_delays_seconds=[1.0, 2.0])

    async def step(event: dict[str, Any], ctx: StageContext[NoResources]) -> Any:
        raise AssertionError("not run")

    producer: Any = None
    for spec in STAGES:
        runner = StageRunner(Stage(spec, step, NoResources()), settings, None,  # type: ignore[arg-type]
                             producer)
        assert runner.input_topic == f"t-{spec.input_topic}"
        assert runner.retry_topics == [f"t-retry.{spec.name}.0", f"t-retry.{spec.name}.1"]
        assert runner.max_in_flight == (77 if spec.name == "fetcher" else 5)


def _doc_row(spec: stages.StageSpec) -> str:
    produces = (f"`{spec.output_topic}` {spec.output_event}" if spec.output_topic else "-")
    return (f"| {spec.name} | `{spec.input_topic}` {spec.input_event} | {produces} | "
            f"{spec.status or '-'} | {spec.retry.value} | `{spec.resources}` | {spec.port} |")


def test_architecture_doc_shows_the_table_as_it_is() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("<!-- stage-table:")[1].split("<!-- /stage-table -->")[0]
    rows = [line for line in block.splitlines() if line.startswith("| ")][1:]
    assert rows == [_doc_row(spec) for spec in STAGES]
