"""Schemathesis against the gateway's own openapi.json: every operation, at least 2,000
generated cases (valid and invalid by the schema, with and without a valid token).

No case gets a 5xx; every response's status, content type, headers and body conform to
the document.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, cast

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

from tests.security.conftest import API, TOKEN_A, SecureGateway

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(600)]

CASES_PER_OPERATION_AND_MODE = 260
MIN_CASES = 2000
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


def fuzz(base_url: str) -> tuple[Counter[str], Counter[int], list[str]]:
    """Run every operation in both generation modes; (cases per operation, statuses, failures)."""
    schema = schemathesis.openapi.from_url(f"{base_url}{API}/openapi.json")
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    session = requests.Session()
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(operation, mode, base_url, session, cases, statuses, failures)
    return cases, statuses, failures


def fuzz_operation(operation: Any, mode: GenerationMode, base_url: str,
                   session: requests.Session, cases: Counter[str], statuses: Counter[int],
                   failures: list[str]) -> None:
    """Send CASES_PER_OPERATION_AND_MODE cases of ``operation``; collect what went wrong."""
    label = f"{operation.method.upper()} {operation.path}"

    @settings(max_examples=CASES_PER_OPERATION_AND_MODE, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), with_token=st.booleans())
    def run(case: Any, with_token: bool) -> None:
        headers = {"Authorization": f"Bearer {TOKEN_A}"} if with_token else None
        cases[label] += 1
        try:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        except requests.RequestException as exc:
            failures.append(f"{label}: transport error {type(exc).__name__}")
            return
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except Exception as exc:
            if len(failures) < 50:
                failures.append(f"{label} -> {response.status_code}: {str(exc)[:500]}\n"
                                f"{case.as_curl_command()[:500]}")

    run()


async def test_every_operation_conforms_and_never_answers_5xx(gw: SecureGateway) -> None:
    cases, statuses, failures = await asyncio.to_thread(fuzz, gw.url)
    total = sum(cases.values())
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    print(f"\nRELIABILITY schemathesis: {total} cases, per operation {dict(cases)}, "
          f"statuses {dict(sorted(statuses.items()))}, 5xx: {server_errors}, "
          f"failures: {len(failures)}")
    assert len(cases) == 4, cases  # POST and PUT calls.json, GET call, GET recording
    assert total >= MIN_CASES
    assert server_errors == 0
    assert failures == [], "\n\n".join(failures[:10])
