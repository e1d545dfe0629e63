"""Schemathesis against the gateway's own openapi.json.

Stateless: every operation, at least 2,000 generated cases (valid and invalid by the schema,
with and without a valid token); no case gets a 5xx, every response's status, content type,
headers and body conform to the document. Valid submissions are drawn from the document's
named formats (``services.gateway.openapi.REQUEST_FORMATS``), registered below with
strategies for this test's network, and carry a valid token: at least 20 % of all
submissions must reach the accepted path (201 or 202).

Stateful: sequences along the document's ``links`` (submit -> read the call, its recording,
retry it, resubmit it), with a validator and a fetcher running so that calls fail (their
recording host refuses) and retries are accepted; 0 5xx and no failed check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import phonenumbers
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from callingest import config_apply, config_file, mongo
from callingest.settings import Settings
from callingest.topics import Topics, ensure_topics
from tests.conftest import (
    DEV_KEYRING,
    TEST_LOGS,
    Services,
    delete_topics,
    make_settings,
    used_secret,
)
from tools import devstack

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(900)]

API = "/api/2022-03-01"
TOKEN = used_secret(f"fuzz-{uuid.uuid4().hex}")
CASES_PER_OPERATION_AND_MODE = int(os.environ.get("FUZZ_CASES", "200"))
MIN_CASES = 2000
MIN_ACCEPTED_SHARE = 0.20
STATEFUL_SCENARIOS = int(os.environ.get("FUZZ_SCENARIOS", "60"))
SUBMIT = {"POST /api/2022-03-01/calls.json", "PUT /api/2022-03-01/calls.json"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]

SIGNALS = [f"Signal {i}" for i in range(20)]
FIELDS = [f"field_{i}" for i in range(20)]
CAMPAIGNS = ["85", "86"]
AUTH_CONFIGS = ["7", "8"]
TIMEZONE = "America/New_York"
_CAMPAIGN_ITEMS = [f'{{id_from_network: "{c}", type: ExternalOnly, signal_ai_enabled: true}}'
                   for c in CAMPAIGNS]
CONFIG = f"""
networks:
  - id: "6001"
    name: Fuzz Network
    timezone: {TIMEZONE}
    multi_language_enabled: true
    call_ingestion_enabled: true
    csm_email: csm-fuzz@example.com
    api_tokens: [{{token: {TOKEN}}}]
    signals: [{", ".join(SIGNALS)}]
    custom_data_fields: [{", ".join(FIELDS)}]
    recording_auth_configs:
      - {{id: 7, method: bearer_header, token: fuzz-secret}}
      - {{id: 8, method: custom_header, name: X-Api-Key, token: fuzz-secret}}
    advertisers:
      - id: adv-f
        campaigns: [{", ".join(_CAMPAIGN_ITEMS)}]
"""


def _phone_numbers() -> list[str]:
    """Valid numbers of every region phonenumbers has examples for, E.164 and NANP national."""
    numbers = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None and phonenumbers.is_valid_number(example):
                e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
                numbers.append(e164)
                if region == "US":
                    numbers.append(e164[2:])
    return numbers


def _start_times() -> st.SearchStrategy[str]:
    """The spec's timestamp forms, for moments from 2001-09-10 (10-digit epochs) until now."""
    moments = st.datetimes(min_value=datetime(2001, 9, 10), max_value=datetime.now() - timedelta(days=1),
                           timezones=st.just(UTC))
    local = ZoneInfo(TIMEZONE)
    forms = [
        lambda m: m.strftime("%Y-%m-%dT%H:%M:%SZ"),
        lambda m: m.strftime("%Y/%m/%dT%H:%M:%S.000+00:00"),
        lambda m: str(int(m.timestamp())),
        lambda m: str(int(m.timestamp() * 1000)),
        lambda m: m.strftime("%Y%m%d%H%M%S000"),
        lambda m: m.astimezone(local).strftime("%Y/%m/%d %I:%M:%S %p"),
    ]
    return st.tuples(moments, st.sampled_from(forms)).map(lambda pair: pair[1](pair[0]))


def register_formats() -> None:
    """Strategies for the document's named formats, for this test's network."""
    formats: dict[str, st.SearchStrategy[str]] = {
        # Fresh per draw: hypothesis repeats simple values (the zero UUID), and a repeated id
        # with other content is a legitimate 409.
        "external-call-unique-id": st.builds(lambda: f"fuzz-{uuid.uuid4().hex}"),
        "phone-number": st.sampled_from(_phone_numbers()),
        "call-start-time": _start_times(),
        "campaign-id-from-network": st.sampled_from(CAMPAIGNS),
        "recording-url": st.from_regex(r"\Ahttp://127\.0\.0\.1:9/[a-z0-9]{1,16}\.(wav|mp3)\Z"),
        "recording-auth-config-id": st.sampled_from(AUTH_CONFIGS),
        "signal-name": st.sampled_from(SIGNALS),
        "custom-data-field": st.sampled_from(FIELDS),
        "api-token": st.just(TOKEN),
    }
    for name, strategy in formats.items():
        schemathesis.openapi.format(name, strategy)


@dataclass
class FuzzGateway:
    settings: Settings
    url: str


@pytest.fixture(scope="module")
async def fuzz_gateway(servers: devstack.Ports) -> AsyncIterator[FuzzGateway]:
    """The gateway with a validator and a fetcher (recordings on a refusing port fail at once)."""
    settings = make_settings(servers, max_processing_attempts=1)
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    await ensure_topics(settings.kafka_bootstrap_servers, topics.all(), 3, 1)
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    await mongo.ensure_indexes(db)
    TEST_LOGS.mkdir(parents=True, exist_ok=True)
    path = TEST_LOGS / f"fuzz-config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(CONFIG)
    await config_apply.apply(db, config_file.load(path), DEV_KEYRING)
    path.unlink()
    log_dir = TEST_LOGS / f"fuzz-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    services = Services(settings, log_dir)
    try:
        gateway = services.start("gateway", env={"AUTH_FAILURE_THRESHOLD": "1000000"})
        services.start("validator")
        services.start("fetcher")
        yield FuzzGateway(settings, gateway.url)
    finally:
        services.stop_all()
        with contextlib.suppress(Exception):
            await client.drop_database(settings.mongodb_database)
        await client.close()
        await delete_topics(settings, topics.all())


# -- stateless -------------------------------------------------------------------------------


@dataclass
class Tally:
    cases: Counter[str]
    statuses: Counter[int]
    submissions: Counter[int]
    failures: list[str]


def fuzz(base_url: str) -> Tally:
    """Run every operation in both generation modes."""
    schema = schemathesis.openapi.from_url(f"{base_url}{API}/openapi.json")
    tally = Tally(Counter(), Counter(), Counter(), [])
    session = requests.Session()
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(operation, mode, base_url, session, tally)
    return tally


def fuzz_operation(operation: Any, mode: GenerationMode, base_url: str,
                   session: requests.Session, tally: Tally) -> None:
    """Send CASES_PER_OPERATION_AND_MODE cases of ``operation``; collect what went wrong.

    Valid submissions always carry the token (the accepted path); every other case
    carries it or not at random."""
    label = f"{operation.method.upper()} {operation.path}"
    always_token = label in SUBMIT and mode is GenerationMode.POSITIVE

    @settings(max_examples=CASES_PER_OPERATION_AND_MODE, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), with_token=st.booleans())
    def run(case: Any, with_token: bool) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"} if with_token or always_token else None
        tally.cases[label] += 1
        try:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        except requests.RequestException as exc:
            tally.failures.append(f"{label}: transport error {type(exc).__name__}")
            return
        tally.statuses[response.status_code] += 1
        if label in SUBMIT:
            tally.submissions[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except Exception as exc:
            if len(tally.failures) < 50:
                tally.failures.append(f"{label} -> {response.status_code}: {str(exc)[:500]}\n"
                                      f"{case.as_curl_command()[:500]}")

    run()


async def test_every_operation_conforms_and_never_answers_5xx(fuzz_gateway: FuzzGateway) -> None:
    register_formats()
    tally = await asyncio.to_thread(fuzz, fuzz_gateway.url)
    total = sum(tally.cases.values())
    server_errors = sum(n for status, n in tally.statuses.items() if status >= 500)
    submissions = sum(tally.submissions.values())
    accepted = tally.submissions[201] + tally.submissions[202]
    print(f"\nRELIABILITY schemathesis: {total} cases, per operation {dict(tally.cases)}, "
          f"statuses {dict(sorted(tally.statuses.items()))}, 5xx: {server_errors}, "
          f"submissions {submissions}, accepted (201/202) {accepted} "
          f"({accepted / max(submissions, 1):.1%}), failures: {len(tally.failures)}")
    # POST, PUT and GET calls.json, GET call, GET recording, POST retry
    assert len(tally.cases) == 6, tally.cases
    assert total >= MIN_CASES
    assert server_errors == 0
    assert tally.failures == [], "\n\n".join(tally.failures[:10])
    assert accepted >= MIN_ACCEPTED_SHARE * submissions, tally.submissions


# -- stateful --------------------------------------------------------------------------------


async def test_stateful_sequences_along_the_links(fuzz_gateway: FuzzGateway) -> None:
    register_formats()
    statuses: Counter[str] = Counter()
    await asyncio.to_thread(run_state_machine, fuzz_gateway.url, statuses)
    print(f"\nRELIABILITY schemathesis stateful: {sum(statuses.values())} calls, "
          f"{dict(sorted(statuses.items()))}")
    assert not [k for k in statuses if k.endswith((" 500", " 502", " 503", " 504"))], statuses
    # The sequences went past the submission: the links were followed, retries accepted.
    assert statuses["POST /api/2022-03-01/calls.json 201"] > 0, statuses
    assert any(k.startswith("GET /api/2022-03-01/calls/{cuid}.json 200") for k in statuses), statuses
    assert statuses["POST /api/2022-03-01/calls/{cuid}/retry.json 202"] > 0, statuses
    assert statuses["PUT /api/2022-03-01/calls.json 202"] > 0, statuses


def run_state_machine(base_url: str, statuses: Counter[str]) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}{API}/openapi.json")
    session = requests.Session()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    base = schema.as_state_machine()

    class Machine(base):  # type: ignore[valid-type, misc]
        def call(self, case: Any, **kwargs: Any) -> Any:
            if case.operation.path.endswith("/retry.json"):
                # Let the call fail first (its recording host refuses): the retry then applies.
                _wait_until_failed(session, base_url, case, headers)
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
            statuses[f"{case.method.upper()} {case.operation.path} {response.status_code}"] += 1
            return response

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None,
                              **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, headers=headers,
                                   recorder=self.recorder)

    Machine.run(settings=settings(max_examples=STATEFUL_SCENARIOS, stateful_step_count=6,
                                  deadline=None, database=None,
                                  suppress_health_check=list(HealthCheck)))


def _wait_until_failed(session: requests.Session, base_url: str, case: Any,
                       headers: dict[str, str]) -> None:
    cuid = (case.path_parameters or {}).get("cuid")
    if not isinstance(cuid, str) or not cuid.isalnum():
        return
    for _ in range(50):
        answer = session.get(f"{base_url}{API}/calls/{cuid}.json", headers=headers, timeout=10)
        if answer.status_code != 200 or answer.json().get("status") == "failed":
            return
        time.sleep(0.1)
