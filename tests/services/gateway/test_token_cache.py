"""The gateway's token cache: a known token is trusted for ``AUTH_CACHE_SECONDS``, an unknown one
refused for ``NEGATIVE_CACHE_SECONDS``, and a full cache pushes out the least recently used."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from callingest.config_file import hash_token as token_hash
from services.gateway import auth
from services.gateway.auth import TokenAuthenticator
from services.gateway.errors import NotAuthorized

pytestmark = pytest.mark.mongo


def _token_doc(token: str) -> dict[str, Any]:
    return {"_id": token_hash(token), "network_id": "1001", "advertisers": ["adv-1"]}


async def test_a_revoked_token_works_until_its_cache_entry_expires(db: Any) -> None:
    await db.api_tokens.insert_one(_token_doc("tok-revoked"))
    authenticator = TokenAuthenticator(db, cache_seconds=0.5)
    principal = await authenticator.authenticate("tok-revoked")
    assert principal.network_id == "1001" and principal.advertisers == frozenset({"adv-1"})
    await db.api_tokens.delete_one({"_id": token_hash("tok-revoked")})
    assert await authenticator.authenticate("tok-revoked") == principal  # cached
    await asyncio.sleep(0.6)
    with pytest.raises(NotAuthorized):
        await authenticator.authenticate("tok-revoked")


async def test_an_unknown_token_is_refused_from_the_cache_for_a_short_while(
        db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "NEGATIVE_CACHE_SECONDS", 0.3)
    authenticator = TokenAuthenticator(db, cache_seconds=3600)
    with pytest.raises(NotAuthorized):
        await authenticator.authenticate("tok-new")
    await db.api_tokens.insert_one(_token_doc("tok-new"))
    with pytest.raises(NotAuthorized):  # the refusal is cached
        await authenticator.authenticate("tok-new")
    await asyncio.sleep(0.4)
    assert (await authenticator.authenticate("tok-new")).network_id == "1001"


async def test_a_full_cache_pushes_out_the_least_recently_used(
        db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_CACHE_ENTRIES", 2)
    await db.api_tokens.insert_many([_token_doc("tok-a"), _token_doc("tok-b")])
    authenticator = TokenAuthenticator(db, cache_seconds=3600)
    await authenticator.authenticate("tok-a")
    await authenticator.authenticate("tok-b")
    await authenticator.authenticate("tok-a")  # a is now the more recently used
    await db.api_tokens.delete_many({})
    with pytest.raises(NotAuthorized):
        await authenticator.authenticate("tok-c")  # a third entry: b goes
    assert (await authenticator.authenticate("tok-a")).network_id == "1001"  # still cached
    with pytest.raises(NotAuthorized):
        await authenticator.authenticate("tok-b")  # read again: revoked
