"""Hostile request bodies: huge numbers, deep nesting, invalid UTF-8, duplicate keys, NaN,
10,000 signals. Each gets a 4xx with the errors body; the gateway's memory stays bounded.

(tests/services/gateway/test_gateway_api.py::test_bad_bodies_are_4xx_with_errors_body covers
malformed JSON, non-objects, 100,000 nested brackets, oversize and non-JSON bodies.)
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.system.security.conftest import API, TOKEN_A, SecureGateway, call_body

pytestmark = [pytest.mark.stack, pytest.mark.kafka, pytest.mark.mongo]

ROUNDS = 20
RSS_GROWTH_BOUND_MB = 40.0
RSS_BOUND_MB = 300.0


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def _call_json(external_id: str, *, top: dict[str, str] | None = None,
               **raw_fields: str) -> str:
    """A call body as JSON text, with call fields (and top-level members such as signals)
    given as raw JSON fragments."""
    call = call_body(external_id)["call"]
    parts = [f'"{k}": {raw_fields.pop(k) if k in raw_fields else json.dumps(v)}'
             for k, v in call.items()]
    parts += [f'"{k}": {v}' for k, v in raw_fields.items()]
    members = "".join(f', "{k}": {v}' for k, v in (top or {}).items())
    return '{"call": {' + ", ".join(parts) + "}" + members + "}"


def hostile_bodies() -> dict[str, bytes]:
    uid = uuid.uuid4().hex
    huge_int = "9" * 4000
    deep = "[" * 50_000 + "]" * 50_000
    deep_objects = '{"a":' * 20_000 + "1" + "}" * 20_000
    signals = json.dumps([{"name": "Sale", "value": True}] * 10_000)
    texts = {
        "huge-int-campaign": _call_json(f"h1{uid}", advertiser_campaign_id_from_network=huge_int),
        "huge-int-phone": _call_json(f"h2{uid}", calling_phone_number=huge_int),
        "huge-int-start-time": _call_json(f"h3{uid}", start_time=huge_int),
        "too-many-digits": _call_json(f"h4{uid}", destination_phone_number="9" * 20_000),
        "huge-float": _call_json(f"h5{uid}", start_time="1e400"),
        "negative-huge-float": _call_json(f"h6{uid}", calling_phone_number="-1e400"),
        "huge-exponent": _call_json(f"h7{uid}", advertiser_campaign_id_from_network="1e999999999"),
        "deep-array-in-call": _call_json(f"h8{uid}", top={"signals": deep}),
        "deep-object-in-call": _call_json(f"h9{uid}", top={"custom_data": deep_objects}),
        "deep-top-level": deep_objects,
        "lone-surrogate": _call_json(f"hb{uid}", call_direction='"\\ud800"'),
        "duplicate-call-key": '{"call": {"external_call_unique_id": "x"}, '
                              + _call_json(f"hc{uid}")[1:],
        "duplicate-field-key": _call_json(f"hd{uid}").replace(
            '"call_direction": "inbound"', '"call_direction": "inbound", "call_direction": 5'),
        "duplicate-token-key": '{"oauth_token": "a", "oauth_token": "' + TOKEN_A + '", '
                               + _call_json(f"he{uid}")[1:],
        "nan": _call_json(f"hf{uid}", start_time="NaN"),
        "infinity": _call_json(f"hg{uid}", calling_phone_number="Infinity"),
        "negative-infinity": _call_json(f"hh{uid}", advertiser_campaign_id_from_network="-Infinity"),
        "10000-signals": _call_json(f"hi{uid}", top={"signals": signals}),
        "10000-custom-data": _call_json(f"hj{uid}", top={"custom_data": json.dumps(
            [{"name": "channel", "value": "x"}] * 10_000)}),
        "nul-bytes": _call_json(f"hk{uid}", call_direction='"in\\u0000bound"'),
        "long-string": _call_json(f"hl{uid}", external_call_unique_id=json.dumps("x" * 900_000)),
    }
    bodies = {name: text.encode() for name, text in texts.items()}
    bodies["invalid-utf8-in-string"] = _call_json(f"ha{uid}").encode().replace(
        b'"inbound"', b'"in\xff\xfebound"')
    bodies["invalid-utf8-overlong"] = _call_json(f"hm{uid}").encode().replace(
        b'"inbound"', b'"\xc0\xafinbound"')
    return bodies


async def post(http: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, Any]:
    async with http.post(f"{url}{API}/calls.json", data=data, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN_A}"}) as resp:
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw[:200]


async def test_hostile_bodies_get_4xx_with_errors_body_and_memory_stays_bounded(
    gw: SecureGateway,
) -> None:
    pid = gw.services.running["gateway"].proc.pid
    bodies = hostile_bodies()
    answers: dict[str, tuple[int, Any]] = {}
    async with aiohttp.ClientSession() as http:
        for name, data in bodies.items():  # warm up: first answers, caches filled
            answers[name] = await post(http, gw.url, data)
        before, _ = rss_mb(pid)
        for _ in range(ROUNDS):
            for name, data in bodies.items():
                status, _ = await post(http, gw.url, data)
                assert status < 500, name
        after, peak = rss_mb(pid)
    wrong = {name: (status, body) for name, (status, body) in answers.items()
             if not (400 <= status < 500 and isinstance(body, dict)
                     and set(body.get("errors", {})) == {"class", "invalid_data"})}
    assert wrong == {}, wrong
    assert await gw.db.calls.count_documents({"network_id": "4001"}) == 0
    print(f"\nRELIABILITY hostile: {len(bodies)} bodies x {ROUNDS + 1} rounds, "
          f"gateway RSS {before:.0f} -> {after:.0f} MiB, peak {peak:.0f} MiB")
    assert after - before < RSS_GROWTH_BOUND_MB
    assert peak < RSS_BOUND_MB
