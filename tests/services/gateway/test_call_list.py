"""GET /api/2022-03-01/calls.json on the real gateway: filters, pages, scopes, errors, indexes."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from services.gateway.domain import Principal
from services.gateway.listing import ORDER, CallQuery
from tests.services.gateway.conftest import ADVERTISER_TOKEN, NETWORK_TOKEN, OTHER_NETWORK_TOKEN
from tests.services.gateway.test_gateway_api import Client, assert_error, call_body, post

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

LIST = "/api/2022-03-01/calls.json"


async def listing(client: Client, token: str = NETWORK_TOKEN, **params: Any) -> tuple[int, Any]:
    resp = await client.get(LIST, params={k: str(v) for k, v in params.items()},
                            headers={"Authorization": f"Bearer {token}"})
    return resp.status, await resp.json(content_type=None)


async def every_page(client: Client, token: str = NETWORK_TOKEN, **params: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    cursor = None
    for _ in range(200):
        status, body = await listing(client, token, **params, **({"cursor": cursor} if cursor else {}))
        assert status == 200, body
        assert set(body) == {"calls", "next_cursor"}
        calls.extend(body["calls"])
        cursor = body["next_cursor"]
        if cursor is None:
            return calls
    raise AssertionError("no last page")


async def submit(client: Client, external_id: str, **overrides: Any) -> str:
    status, body = await post(client, call_body(external_id, **overrides))
    assert status == 201, body
    return str(body["cuid"])


def received_at(call: dict[str, Any]) -> str:
    return str(call["history"][0]["at"])


async def test_newest_first_with_filters_limit_and_cursor(gateway: Client, configured_db: Any) -> None:
    cuids = [await submit(gateway, f"list-{i}") for i in range(7)]
    other_advertiser = await submit(gateway, "list-adv2", advertiser_campaign_id_from_network=90)
    await configured_db.calls.update_one({"_id": cuids[2]}, {"$set": {"status": "failed"}})
    await configured_db.calls.update_one({"_id": cuids[5]}, {"$set": {"status": "failed"}})

    status, body = await listing(gateway)
    assert status == 200 and body["next_cursor"] is None
    assert [c["cuid"] for c in body["calls"]] == [other_advertiser, *reversed(cuids)]
    assert body["calls"][0]["external_call_unique_id"] == "list-adv2"
    assert "content_hash" not in body["calls"][0] and "recording_url" not in body["calls"][0]

    pages = []
    status, body = await listing(gateway, limit=3)
    pages.append(body)
    while body["next_cursor"]:
        assert isinstance(body["next_cursor"], str)
        status, body = await listing(gateway, limit=3, cursor=body["next_cursor"])
        assert status == 200
        pages.append(body)
    assert [len(p["calls"]) for p in pages] == [3, 3, 2]
    assert [c["cuid"] for p in pages for c in p["calls"]] == [other_advertiser, *reversed(cuids)]

    status, body = await listing(gateway, status="failed")
    assert [c["cuid"] for c in body["calls"]] == [cuids[5], cuids[2]]
    assert {c["status"] for c in body["calls"]} == {"failed"}
    status, body = await listing(gateway, external_call_unique_id="list-3")
    assert [c["cuid"] for c in body["calls"]] == [cuids[3]]
    status, body = await listing(gateway, external_call_unique_id="nope")
    assert body == {"calls": [], "next_cursor": None}

    everything = (await listing(gateway))[1]["calls"]
    newest_first = [received_at(c) for c in everything]
    assert newest_first == sorted(newest_first, reverse=True)
    since, until = received_at(everything[5]), received_at(everything[2])
    status, body = await listing(gateway, since=since, until=until)
    assert status == 200
    assert [c["cuid"] for c in body["calls"]] == [c["cuid"] for c in everything
                                                  if since <= received_at(c) <= until]
    assert len(body["calls"]) >= 4

    # A scoped token sees only its advertisers' calls; another network sees none of them.
    scoped = await every_page(gateway, ADVERTISER_TOKEN, limit=2)
    assert [c["cuid"] for c in scoped] == list(reversed(cuids))
    status, body = await listing(gateway, OTHER_NETWORK_TOKEN)
    assert (status, body) == (200, {"calls": [], "next_cursor": None})


@pytest.mark.parametrize("params", [
    {"status": "done"}, {"status": ""}, {"limit": 0}, {"limit": 101}, {"limit": "ten"},
    {"limit": "-1"}, {"limit": "５"}, {"since": "yesterday"}, {"until": "2026-13-01T00:00:00Z"},
    {"since": "2026-11-30T12:00:00Z", "until": "2026-11-29T12:00:00Z"},
    {"since": "9999-12-31T23:59:59-14:00"}, {"until": "0001-01-01T00:00:00+14:00"},
    {"cursor": "not-a-cursor"}, {"cursor": "WzEsMl0"}, {"external_call_unique_id": ""},
    {"external_call_unique_id": "x" * 256}, {"colour": "blue"},
])
async def test_bad_parameters_are_400(gateway: Client, params: dict[str, Any]) -> None:
    status, body = await listing(gateway, **params)
    assert_error(status, body, 400, "InvalidParameter")


async def test_repeated_parameter_and_auth(gateway: Client) -> None:
    resp = await gateway.get(f"{LIST}?limit=1&limit=2", headers={"Authorization": f"Bearer {NETWORK_TOKEN}"})
    assert_error(resp.status, await resp.json(), 400, "InvalidParameter")
    resp = await gateway.get(LIST)
    assert_error(resp.status, await resp.json(), 401, "NotAuthorized")
    resp = await gateway.get(LIST, params={"oauth_token": NETWORK_TOKEN, "limit": "1"})
    assert resp.status == 200
    # An offset typed into a URL unencoded ("+" arrives as a space) still reads as an offset.
    resp = await gateway.get(f"{LIST}?since=2016-01-01T00:00:00+00:00&until=2016-01-02T00:00:00Z",
                             headers={"Authorization": f"Bearer {NETWORK_TOKEN}"})
    assert resp.status == 200, await resp.text()


@pytest.mark.slow
async def test_no_call_skipped_or_repeated_across_pages_while_calls_arrive(
    gateway: Client, configured_db: Any
) -> None:
    before = set(await asyncio.gather(*(submit(gateway, f"page-{i}") for i in range(40))))
    counter = itertools.count()
    stop = asyncio.Event()

    async def keep_inserting() -> None:
        while not stop.is_set():
            await asyncio.gather(*(submit(gateway, f"late-{next(counter)}") for _ in range(3)))

    inserter = asyncio.create_task(keep_inserting())
    try:
        seen: list[str] = []
        cursor = None
        while True:
            status, body = await listing(gateway, limit=4, **({"cursor": cursor} if cursor else {}))
            assert status == 200, body
            seen.extend(c["cuid"] for c in body["calls"])
            cursor = body["next_cursor"]
            if cursor is None:
                break
            await asyncio.sleep(0.05)  # let inserts land between pages
    finally:
        stop.set()
        await inserter
    assert next(counter) >= 6, "inserts did not run during the paging"
    assert len(seen) == len(set(seen)), "a call was repeated across pages"
    assert before <= set(seen), "a call that existed before the paging was skipped"


async def test_every_list_query_is_served_by_an_index(configured_db: Any) -> None:
    """For each filter, an index of the store starts with the query's equality fields and
    continues with the sort keys (or is the unique id index): no query scans the collection."""
    indexes = [list(info["key"]) for info in (await configured_db.calls.index_information()).values()]
    order = list(ORDER)
    principals = [Principal("1001", None), Principal("1001", frozenset({"adv-1", "adv-2"}))]
    queries = [CallQuery(), CallQuery(status="failed"), CallQuery(external_call_unique_id="x"),
               CallQuery(since=None, until=None, limit=5)]
    for principal, query in itertools.product(principals, queries):
        eq_fields = {"network_id"}
        if principal.advertisers is not None:
            eq_fields.add("advertiser_id")
        if query.status:
            eq_fields.add("status")
        if query.external_call_unique_id:
            assert [("network_id", 1), ("external_call_unique_id", 1)] in indexes
            continue

        def serves(key: list[tuple[str, int]], eq: set[str]) -> bool:
            return {f for f, _ in key[: len(eq)]} == eq and key[len(eq):] == order

        assert any(serves(key, eq_fields) for key in indexes) or any(
            serves(key, eq_fields - {"advertiser_id"}) for key in indexes
            if principal.advertisers is not None and query.status), (principal, query, indexes)
