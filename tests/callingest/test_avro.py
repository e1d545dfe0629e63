"""schemas/ is the contract: every published version decodes, into the newest version."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import parse_schema

from callingest import avro

SCHEMAS = sorted(avro.SCHEMA_DIR.glob("*/v*.avsc"))
COMMON = ("event_id", "cuid", "occurred_at", "schema_version")


def sample(schema: dict) -> dict:
    """A record for ``schema`` with a value for every field (defaults where given)."""
    values = {
        "event_id": str(uuid.uuid4()), "cuid": "c" * 32, "network_id": "1001", "attempt": 2,
        "occurred_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "start_time": datetime(2016, 4, 11, 20, 0, tzinfo=UTC), "schema_version": 1,
    }
    out = {}
    for f in schema["fields"]:
        if f["name"] in values:
            out[f["name"]] = values[f["name"]]
        elif "default" in f:
            out[f["name"]] = f["default"]
        else:
            t = f["type"]
            kind = t["type"] if isinstance(t, dict) else t
            out[f["name"]] = {"string": "s", "long": 7, "int": 3, "double": 1.5, "boolean": True,
                              "enum": (t.get("symbols") or ["x"])[0] if isinstance(t, dict) else "x",
                              "array": []}.get(kind, "s")
    return out


def test_every_event_has_the_common_envelope() -> None:
    assert {p.parent.name for p in SCHEMAS} == {
        "CallSubmitted", "CallValidated", "RecordingFetched", "RecordingNormalized", "CallFailed"}
    for path in SCHEMAS:
        names = [f["name"] for f in json.loads(path.read_text())["fields"]]
        for field in COMMON:
            assert field in names, f"{path}: {field} missing"


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_published_version_still_decodes(path: Path) -> None:
    """A message written with any version on file is read by today's codec."""
    raw = json.loads(path.read_text())
    writer = avro.BY_FINGERPRINT[next(fp for fp, sv in avro.BY_FINGERPRINT.items()
                                      if sv.event == path.parent.name
                                      and sv.version == int(path.stem[1:]))]
    record = sample(raw)
    import io

    body = io.BytesIO()
    fastavro.schemaless_writer(body, parse_schema(raw, named_schemas={}), record)
    event, decoded = avro.decode(avro.MAGIC + writer.fingerprint + body.getvalue())
    assert event == path.parent.name
    assert decoded["cuid"] == record["cuid"]
    assert str(decoded["event_id"]) == record["event_id"]


def test_round_trip_and_refusals() -> None:
    raw = json.loads((avro.SCHEMA_DIR / "CallFailed" / "v1.avsc").read_text())
    record = sample(raw)
    data = avro.encode("CallFailed", record)
    assert data[:2] == b"\xc3\x01"
    assert avro.decode(data)[1]["attempt"] == 2
    with pytest.raises(avro.UndecodableMessage):
        avro.decode(b"plain json {}")
    with pytest.raises(avro.UndecodableMessage):
        avro.decode(b"\xc3\x01" + b"\x00" * 8 + b"body")
    with pytest.raises(avro.UndecodableMessage):
        avro.decode(data[:12])
    with pytest.raises(ValueError):
        avro.encode("CallFailed", {**record, "stage": "nowhere"})
    with pytest.raises(ValueError):
        avro.encode("NoSuchEvent", record)
