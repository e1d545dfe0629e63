"""Avro codec for every event, using the Avro single-object encoding.

Each message is ``C3 01`` + the 8-byte little-endian CRC-64-AVRO fingerprint
of the writer schema + the Avro binary body. The fingerprint names the exact
schema version that wrote the message, so every version ever published under
``schemas/<Event>/v<N>.avsc`` stays decodable; records are read into the
newest version of their event (Avro schema resolution fills defaults).

Schemas are loaded and parsed once, at import.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


class UndecodableMessage(ValueError):
    """The bytes are not an event this platform knows how to read."""


@dataclass(frozen=True)
class SchemaVersion:
    event: str
    version: int
    parsed: Any
    fingerprint: bytes


def _load(schema_dir: Path) -> tuple[dict[str, SchemaVersion], dict[bytes, SchemaVersion]]:
    latest: dict[str, SchemaVersion] = {}
    by_fingerprint: dict[bytes, SchemaVersion] = {}
    for path in sorted(schema_dir.glob("*/v*.avsc")):
        event = path.parent.name
        version = int(path.stem[1:])
        parsed = parse_schema(json.loads(path.read_text()), named_schemas={})
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
        fp = fp[::-1]  # the spec stores the 64-bit fingerprint little-endian
        sv = SchemaVersion(event, version, parsed, fp)
        by_fingerprint[fp] = sv
        if event not in latest or latest[event].version < version:
            latest[event] = sv
    if not latest:
        raise RuntimeError(f"no Avro schemas found under {schema_dir}")
    return latest, by_fingerprint


LATEST, BY_FINGERPRINT = _load(SCHEMA_DIR)
EVENTS = frozenset(LATEST)


def encode(event: str, record: dict[str, Any]) -> bytes:
    """Serialize ``record`` with the newest schema of ``event``; raises ValueError if it does not fit."""
    try:
        schema = LATEST[event]
    except KeyError:
        raise ValueError(f"unknown event {event!r}") from None
    out = io.BytesIO()
    out.write(MAGIC)
    out.write(schema.fingerprint)
    fastavro.schemaless_writer(out, schema.parsed, record, strict=True)
    return out.getvalue()


def decode(data: bytes | None) -> tuple[str, dict[str, Any]]:
    """``(event name, record)`` read into the newest version of its event.

    Raises :class:`UndecodableMessage` for anything else (foreign bytes, an
    unknown schema fingerprint, a truncated body).
    """
    if not data or len(data) < 10 or data[:2] != MAGIC:
        raise UndecodableMessage("not an Avro single-object encoded message")
    writer = BY_FINGERPRINT.get(bytes(data[2:10]))
    if writer is None:
        raise UndecodableMessage(f"unknown schema fingerprint {bytes(data[2:10]).hex()}")
    reader = LATEST[writer.event]
    try:
        record = fastavro.schemaless_reader(io.BytesIO(data[10:]), writer.parsed, reader.parsed)
    except Exception as exc:  # fastavro raises several types for corrupt bodies
        raise UndecodableMessage(f"corrupt {writer.event} body: {type(exc).__name__}") from None
    return writer.event, record  # type: ignore[return-value]

