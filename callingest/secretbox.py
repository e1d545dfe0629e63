"""Secrets at rest: customer credentials are sealed with AES-256-GCM before they reach the store.

What is sealed is listed once, in :data:`SECRET_ITEMS` (fields of the sub-documents of an
array in a collection, e.g. ``networks.recording_auth_configs[].token``). A sealed value is
a sub-document ``{"alg": "A256GCM", "kid": <key id>, "nonce": <b64>, "ct": <b64>}``; the
additional authenticated data binds the key id and the value's place (collection, document
id, array, item id, field), so a sealed value copied to another network or config does not
open.

The data keys come from the ``SECRET_KEYS`` setting: ``kid:base64key[,kid:base64key...]``,
newest first. The first key seals; any listed key opens. ``callingest admin rotate-secrets``
(:func:`rotate`) re-seals every stored value with the first key. The dev stack, the tests
and the benchmarks use a key generated once into ``.run/secret-keys`` (:func:`dev_keys`).

Who opens: only the fetcher and the webhooks deliverer, at the moment of use, through
:func:`open_item`. ``config apply`` and ``rotate-secrets`` seal, and open only to
compare with / re-seal a value (never to show it).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pymongo.asynchronous.database import AsyncDatabase

from callingest.settings import Settings

ALG = "A256GCM"
KEY_SETTING = "SECRET_KEYS"
_KID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_URLSAFE = str.maketrans("-_", "+/")


@dataclass(frozen=True)
class SecretItems:
    """Where sealed values live: ``fields`` of the sub-documents in ``<collection>.<array>[]``,
    items told apart by ``id_key``. A field holds one secret or a list of them."""

    collection: str
    array: str
    fields: tuple[str, ...]
    id_key: str = "id"

    def context(self, document_id: Any, item: Mapping[str, Any], field: str) -> str:
        """The place of one value; part of what the cipher authenticates."""
        return f"{self.collection}/{document_id}/{self.array}/{item.get(self.id_key)}/{field}"


RECORDING_AUTH_CONFIGS = SecretItems("networks", "recording_auth_configs", ("token",))
WEBHOOKS = SecretItems("networks", "webhooks", ("secret", "previous_secrets"))
#: Every stored secret. A new kind of secret is one more entry here: ``config apply``
#: (:func:`seal_document`) and ``rotate-secrets`` then handle it, and its user opens it with
#: :func:`open_item` at the moment of use.
SECRET_ITEMS: tuple[SecretItems, ...] = (RECORDING_AUTH_CONFIGS, WEBHOOKS)


class SecretUnavailable(Exception):
    """The value was sealed with a key that is not configured (message names the key id)."""


class SecretInvalid(Exception):
    """The stored value is malformed or fails authentication (tampered, or moved)."""


class SecretCodec(Protocol):
    """How secrets are written to and read from the store (a :class:`Keyring` in the product)."""

    def seal(self, plaintext: str, context: str) -> Any: ...

    def open(self, stored: Any, context: str) -> str: ...

    def is_current(self, stored: Any) -> bool: ...


# A field's value is one secret or a list of them; these apply the codec to either.

def _seal(codec: SecretCodec, plain: Any, context: str) -> Any:
    if isinstance(plain, list):
        return [codec.seal(str(p), context) for p in plain]
    return codec.seal(str(plain), context)


def _open(codec: SecretCodec, stored: Any, context: str) -> Any:
    if isinstance(stored, list):
        return [codec.open(s, context) for s in stored]
    return codec.open(stored, context)


def _current(codec: SecretCodec, stored: Any) -> bool:
    if isinstance(stored, list):
        return all(codec.is_current(s) for s in stored)
    return codec.is_current(stored)


def _same(codec: SecretCodec, stored: Any, plain: Any, context: str) -> bool:
    """True if ``stored`` is sealed (not a value from before encryption) and opens to ``plain``."""
    olds, news = (stored, plain) if isinstance(plain, list) else ([stored], [plain])
    if not isinstance(olds, list) or len(olds) != len(news) or any(isinstance(o, str) for o in olds):
        return False
    try:
        return all(secrets.compare_digest(codec.open(o, context).encode(), str(n).encode())
                   for o, n in zip(olds, news, strict=True))
    except (SecretUnavailable, SecretInvalid):
        return False


def seal_document(codec: SecretCodec, collection: str, doc: dict[str, Any],
                  existing: Mapping[str, Any] | None,
                  places: tuple[SecretItems, ...] = SECRET_ITEMS) -> dict[str, Any]:
    """A copy of ``doc`` (about to be written to ``collection``, secrets in plain text) with every
    secret of ``places`` sealed. A secret equal to what ``existing`` (the stored
    document) holds keeps its stored sealed value, so re-applying an unchanged file writes nothing."""
    out = dict(doc)
    for spec in places:
        if spec.collection != collection or spec.array not in doc:
            continue
        stored = {str(i.get(spec.id_key)): i for i in (existing or {}).get(spec.array) or []}
        items = []
        for item in doc[spec.array] or []:
            item = dict(item)
            old_item = stored.get(str(item.get(spec.id_key)), {})
            for name in spec.fields:
                plain, old = item.get(name), old_item.get(name)
                if plain is None:
                    continue
                context = spec.context(doc["_id"], item, name)
                same = old is not None and _same(codec, old, plain, context)
                item[name] = old if same else _seal(codec, plain, context)
            items.append(item)
        out[spec.array] = items
    return out


def open_item(codec: SecretCodec, spec: SecretItems, document_id: Any,
              item: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the stored ``item`` with its secret fields opened: for the moment of use only.

    Raises :class:`SecretUnavailable` (key not configured) or :class:`SecretInvalid`."""
    opened = dict(item)
    for name in spec.fields:
        if item.get(name) is not None:
            opened[name] = _open(codec, item[name], spec.context(document_id, item, name))
    return opened


def without_secrets(collection: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a stored document with every secret of :data:`SECRET_ITEMS` replaced by a
    placeholder (``sealed:<kid>``, or ``unsealed`` for a value from before encryption): what
    read models hold, so only the code that opens a secret ever has it."""
    out = dict(doc)
    for spec in SECRET_ITEMS:
        if spec.collection != collection or not isinstance(doc.get(spec.array), list):
            continue
        out[spec.array] = [
            {**item, **{name: _placeholder(item[name]) for name in spec.fields
                        if item.get(name) is not None}} for item in doc[spec.array]]
    return out


def _placeholder(stored: Any) -> Any:
    if isinstance(stored, list):
        return [_placeholder(s) for s in stored]
    if isinstance(stored, Mapping) and isinstance(stored.get("kid"), str):
        return f"sealed:{stored['kid']}"
    return "unsealed"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise SecretInvalid("sealed value has a non-text part")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SecretInvalid("sealed value is not base64") from None


@dataclass(frozen=True)
class Keyring:
    """Data keys by id; ``primary`` (the first configured) seals, any of them opens."""

    keys: Mapping[str, bytes] = field(repr=False)
    primary: str

    def __repr__(self) -> str:
        return f"Keyring(primary={self.primary!r}, kids={sorted(self.keys)!r})"

    @classmethod
    def parse(cls, text: str) -> Keyring:
        """From ``kid:base64key[,kid:base64key...]``, newest first; ValueError naming the problem
        (never the key material)."""
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for n, entry in enumerate(e.strip() for e in text.split(",")):
            if not entry:
                continue
            kid, sep, material = entry.partition(":")
            if not sep or not _KID.match(kid):
                raise ValueError(f"entry {n + 1} is not 'kid:base64key' with kid of [A-Za-z0-9_.-]")
            material = material.strip().translate(_URLSAFE)
            try:
                key = base64.b64decode(material + "=" * (-len(material) % 4), validate=True)
            except binascii.Error:
                raise ValueError(f"key {kid!r} is not base64") from None
            if len(key) != 32:
                raise ValueError(f"key {kid!r} is {len(key)} bytes; AES-256 needs 32")
            if kid in keys:
                raise ValueError(f"key id {kid!r} is listed twice")
            keys[kid] = key
            order.append(kid)
        if not order:
            raise ValueError("no key given")
        return cls(keys=keys, primary=order[0])

    def _aad(self, kid: str, context: str) -> bytes:
        return f"callingest-secret/{ALG}/{kid}/{context}".encode()

    def seal(self, plaintext: str, context: str) -> dict[str, str]:
        """``plaintext`` sealed with the primary key for the place ``context``."""
        nonce = os.urandom(12)
        ct = AESGCM(self.keys[self.primary]).encrypt(nonce, plaintext.encode("utf-8"),
                                                     self._aad(self.primary, context))
        return {"alg": ALG, "kid": self.primary, "nonce": _b64(nonce), "ct": _b64(ct)}

    def open(self, stored: Any, context: str) -> str:
        """The plaintext of a sealed value. A plain string is a value stored before encryption
        (read as is; ``rotate-secrets`` seals it)."""
        if isinstance(stored, str):
            return stored
        if not isinstance(stored, Mapping) or stored.get("alg") != ALG:
            raise SecretInvalid("stored secret is not a sealed value of a known algorithm")
        kid = stored.get("kid")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise SecretUnavailable(f"sealed with key {kid!r}, which is not in {KEY_SETTING}")
        try:
            plain = AESGCM(key).decrypt(_unb64(stored.get("nonce")), _unb64(stored.get("ct")),
                                        self._aad(kid, context))  # type: ignore[arg-type]
        except (InvalidTag, ValueError):
            raise SecretInvalid("sealed value fails authentication (altered, or not from here)") \
                from None
        return plain.decode("utf-8")

    def is_current(self, stored: Any) -> bool:
        """True if ``stored`` is sealed with the primary key (nothing for rotation to do)."""
        return isinstance(stored, Mapping) and stored.get("alg") == ALG \
            and stored.get("kid") == self.primary


def generate_key_entry(kid: str | None = None) -> str:
    """A new ``kid:base64key`` entry for ``SECRET_KEYS`` (32 random bytes)."""
    kid = kid or f"k{secrets.token_hex(4)}"
    if not _KID.match(kid):
        raise ValueError("a key id is 1-64 characters of [A-Za-z0-9_.-]")
    return f"{kid}:{_b64(secrets.token_bytes(32))}"


def dev_keys(run_dir: Path) -> str:
    """The dev stack's ``SECRET_KEYS``: generated once into ``<run_dir>/secret-keys`` (mode 0600)."""
    path = run_dir / "secret-keys"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    run_dir.mkdir(parents=True, exist_ok=True)
    entry = generate_key_entry("dev1")
    draft = run_dir / f".secret-keys.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(entry + "\n")
    try:
        os.link(draft, path)  # appears whole, or not at all if another process was first
    except FileExistsError:
        return path.read_text().strip()
    finally:
        draft.unlink()
    return entry


def _dev_profile(settings: Settings) -> bool:
    # CALLINGEST_ENV=dev: ``Settings.dev`` of the settings' dev profile (absent before it: False).
    return bool(getattr(settings, "dev", False))


def _dev_run_dir() -> Path:
    root = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("CALLINGEST_RUN_DIR", root / ".run"))


def load_keyring(settings: Settings) -> Keyring:
    """The keyring of ``SECRET_KEYS``; the dev profile falls back to :func:`dev_keys`.

    A missing or malformed value stops the process (exit 2) with a message naming the variable,
    as :func:`callingest.settings.load_settings` does.
    """
    raw = settings.secret_keys
    if raw is None or not raw.get_secret_value():
        if _dev_profile(settings):
            return Keyring.parse(dev_keys(_dev_run_dir()))
        _refuse("required (the data keys that seal stored credentials), e.g. "
                "`callingest admin generate-secret-key`; unset only in the dev profile")
    try:
        return Keyring.parse(raw.get_secret_value())
    except ValueError as exc:
        _refuse(str(exc))


def _refuse(message: str) -> NoReturn:
    print(f"callingest: bad setting {KEY_SETTING}: {message}", file=sys.stderr)
    raise SystemExit(2)


# -- rotation ----------------------------------------------------------------------------------


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
                    if stored is None or _current(codec, stored):
                        current += stored is not None
                        continue
                    context = spec.context(doc["_id"], item, name)
                    try:
                        new_item[name] = _seal(codec, _open(codec, stored, context), context)
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
