"""``callingest config apply``: the documents a validated configuration file describes,
written to the store (:func:`apply`), and what the run changed, one line each.

Parsing and validation are :mod:`callingest.config_file`'s; a file reaching :func:`apply` is
valid as a whole.
"""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from callingest import webhooks
from callingest.config_file import ConfigFile, campaign_id, hash_token
from callingest.secretbox import SecretCodec, seal_document


def documents(config: ConfigFile) -> dict[str, list[dict[str, Any]]]:
    """The MongoDB documents ``config`` describes, by collection; secrets still in clear
    (:func:`apply` seals them before writing)."""
    networks, tokens, campaigns = [], [], []
    for n in config.networks:
        networks.append({
            "_id": n.id,
            "name": n.name,
            "timezone": n.timezone,
            "default_language_code": n.default_language_code,
            "multi_language_enabled": n.multi_language_enabled,
            "call_ingestion_enabled": n.call_ingestion_enabled,
            "csm_email": n.csm_email,
            "signals": n.signals,
            "custom_data_fields": n.custom_data_fields,
            "recording_auth_configs": [c.model_dump() for c in n.recording_auth_configs],
            "advertisers": [a.id for a in n.advertisers],
            "webhooks": [{"id": w.id, "url": w.url, "events": w.events, "secret": w.secret,
                          "previous_secrets": list(w.previous_secrets)} for w in n.webhooks],
        })
        for t in n.api_tokens:
            tokens.append({"_id": hash_token(t.token), "network_id": n.id,
                           "advertisers": t.advertisers})
        for a in n.advertisers:
            for c in a.campaigns:
                campaigns.append({
                    "_id": campaign_id(n.id, c.id_from_network),
                    "network_id": n.id,
                    "advertiser_id": a.id,
                    "id_from_network": c.id_from_network,
                    "type": c.type,
                    "signal_ai_enabled": c.signal_ai_enabled,
                    "voice_signals": c.voice_signals,
                })
    return {"networks": networks, "api_tokens": tokens, "campaigns": campaigns}


#: Collections whose documents belong to a network (``network_id``), with what removing one is
#: called: the file is the source of truth for each network it lists, so of those networks
#: whatever the file no longer names is removed (as their advertisers, webhooks and recording
#: auth configs are, being fields of the network's document; an advertiser's campaigns go with
#: it). Networks the file does not list are left alone. Calls keep their campaign id and
#: advertiser, so the calls of a removed campaign are still viewed and listed.
OWNED_BY_NETWORK = {"api_tokens": "revoked", "campaigns": "removed"}


async def apply(db: AsyncDatabase[dict[str, Any]], config: ConfigFile,
                codec: SecretCodec) -> list[str]:
    """Upsert every document of ``config``, its secrets sealed by ``codec``, and remove what the
    file no longer names of the networks it lists; returns one line per created, changed or
    removed document."""
    changes: list[str] = []
    wanted = documents(config)
    for collection, docs in wanted.items():
        for doc in docs:
            existing = await db[collection].find_one({"_id": doc["_id"]})
            doc = seal_document(codec, collection, doc, existing)
            label = _label(collection, doc)
            if existing is None:
                await db[collection].insert_one(doc)
                changes.append(f"created {label}")
            elif {k: existing.get(k) for k in doc} != doc:
                await db[collection].replace_one({"_id": doc["_id"]}, doc)
                changes.append(f"updated {label}: {', '.join(_changed(existing, doc))}")
    listed = [n.id for n in config.networks]
    for collection, removed in OWNED_BY_NETWORK.items():
        unlisted = {"network_id": {"$in": listed}, "_id": {"$nin": [d["_id"] for d in wanted[collection]]}}
        gone = await db[collection].find(unlisted).sort("_id", 1).to_list(None)
        if gone:
            await db[collection].delete_many({**unlisted, "_id": {"$in": [d["_id"] for d in gone]}})
        changes.extend(f"{removed} {_label(collection, doc)}" for doc in gone)
    return changes


def webhook_warnings(config: ConfigFile, allow_loopback: bool) -> list[str]:
    """Webhooks the deliverer will refuse on this deployment (loopback without
    ``ALLOW_LOOPBACK_WEBHOOKS``): stored anyway, but said out loud."""
    warnings = []
    for n in config.networks:
        for w in n.webhooks:
            try:
                webhooks.check_webhook_url(w.url, allow_loopback=allow_loopback)
            except ValueError as exc:
                warnings.append(f"warning: webhook {w.id} of network {n.id}: {exc}; deliveries "
                                "will be refused (ALLOW_LOOPBACK_WEBHOOKS is false)")
    return warnings


def _changed(existing: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """The fields of ``doc`` that differ from ``existing``, never their values; in a list of
    entries with an ``id`` (auth configs, webhooks) the entries added, changed or removed,
    as ``field[id]``."""
    names: list[str] = []
    for key, value in doc.items():
        old = existing.get(key)
        if old == value:
            continue
        if isinstance(value, list) and all(isinstance(e, dict) and "id" in e for e in [*value, *(old or [])]):
            before, after = {e["id"]: e for e in old or []}, {e["id"]: e for e in value}
            names.extend(f"{key}[{i}]" for i in {**before, **after} if before.get(i) != after.get(i))
        else:
            names.append(key)
    return names


def _label(collection: str, doc: dict[str, Any]) -> str:
    if collection == "api_tokens":
        return f"api token of network {doc['network_id']} (sha256 {doc['_id'][:8]}...)"
    if collection == "campaigns":
        return f"campaign {doc['id_from_network']} of network {doc['network_id']}"
    return f"network {doc['_id']}"
