"""``callingest admin rotate-secrets``: every stored secret re-sealed with the newest data key.

Idempotent (a value sealed with the newest key is left alone) and resumable (each document is
written on its own compare-and-set; a run cut short is finished by the next), with progress
and counts. The sealing itself is :mod:`callingest.secretbox`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from callingest.secretbox import (
    SECRET_ITEMS,
    SecretCodec,
    SecretInvalid,
    SecretItems,
    SecretUnavailable,
    is_current,
    load_keyring,
    open_value,
    seal_value,
)
from callingest.settings import Settings


@dataclass
class RotationReport:
    """Counts of one :func:`rotate` run."""

    documents: int = 0        #: documents looked at
    resealed: int = 0         #: values sealed again with the primary key
    current: int = 0          #: values already sealed with it
    retried: int = 0          #: documents changed by someone else meanwhile, read again
    #: values that do not open (key missing or value altered): where, and why; left as they are
    unreadable: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.documents} document(s) checked, {self.resealed} secret(s) re-encrypted, "
                f"{self.current} already current, {len(self.unreadable)} unreadable"
                + (f", {self.retried} retried after a concurrent change" if self.retried else ""))


Progress = Callable[[str, int, int], None]


async def rotate(db: AsyncDatabase[dict[str, Any]], codec: SecretCodec,
                 places: tuple[SecretItems, ...] = SECRET_ITEMS,
                 progress: Progress | None = None) -> RotationReport:
    """Re-seal every stored secret of ``places`` with the primary key.

    Idempotent (values already sealed with it are left alone) and resumable (each document is
    written on its own, so a run that stops part-way leaves every value readable, old or new,
    and the next run carries on). A document changed between read and write (``config apply``)
    is read again. ``progress(collection, done, total)`` is called after each document.
    """
    report = RotationReport()
    for collection in dict.fromkeys(p.collection for p in places):
        specs = [p for p in places if p.collection == collection]
        coll = db[collection]
        projection = {spec.array: 1 for spec in specs}
        total = await coll.count_documents({})
        done = 0
        async for doc in coll.find({}, projection).sort("_id", 1):
            report.documents += 1
            await _rotate_document(coll, specs, codec, doc, projection, report)
            done += 1
            if progress is not None:
                progress(collection, done, max(total, done))
    return report


async def _rotate_document(coll: Any, specs: list[SecretItems], codec: SecretCodec,
                           doc: dict[str, Any], projection: dict[str, int],
                           report: RotationReport) -> None:
    for _attempt in range(20):
        changed: dict[str, list[dict[str, Any]]] = {}
        resealed, current, unreadable = 0, 0, []
        for spec in specs:
            new_items, before = [], resealed
            for item in doc.get(spec.array) or []:
                new_item = dict(item)
                for name in spec.fields:
                    stored = item.get(name)
                    if stored is None or is_current(codec, stored):
                        current += stored is not None
                        continue
                    context = spec.context(doc["_id"], item, name)
                    try:
                        new_item[name] = seal_value(codec, open_value(codec, stored, context), context)
                        resealed += 1
                    except (SecretUnavailable, SecretInvalid) as exc:
                        unreadable.append(f"{spec.collection} {doc['_id']} {spec.array} "
                                          f"{item.get(spec.id_key)} {name}: {exc}")
                new_items.append(new_item)
            if resealed > before:
                changed[spec.array] = new_items
        if changed:
            # Compare-and-set on the arrays it rewrites: a concurrent `config apply` wins, and
            # the document is read again.
            result = await coll.update_one(
                {"_id": doc["_id"], **{array: doc[array] for array in changed}},
                {"$set": changed})
            if result.matched_count != 1:
                report.retried += 1
                fresh = await coll.find_one({"_id": doc["_id"]}, projection)
                if fresh is None:
                    return
                doc = fresh
                continue
        report.resealed += resealed
        report.current += current
        report.unreadable += unreadable
        return
    report.unreadable.append(f"{coll.name} {doc['_id']}: kept changing; run again")


async def run_rotation(settings: Settings) -> int:
    """``callingest admin rotate-secrets``: progress on stderr, counts on stdout; 1 if any value
    could not be re-encrypted."""
    from tqdm import tqdm

    from callingest import mongo

    keyring = load_keyring(settings)
    bars: dict[str, Any] = {}

    def progress(collection: str, done: int, total: int) -> None:
        bar = bars.get(collection)
        if bar is None:
            bar = bars[collection] = tqdm(total=total, desc=f"re-encrypting {collection}",
                                          unit="doc", file=sys.stderr)
        bar.total = total
        bar.update(done - bar.n)

    client = mongo.open_client(settings)
    try:
        report = await rotate(mongo.database(client, settings), keyring, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
        await client.close()
    for line in report.unreadable:
        print(f"unreadable {line}", file=sys.stderr)
    print(f"rotate-secrets (newest key {keyring.primary}): {report.line()}")
    return 1 if report.unreadable else 0
