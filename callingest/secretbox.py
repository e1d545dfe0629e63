"""Secrets at rest: customer credentials are sealed with AES-256-GCM before they reach the store.

What is sealed is listed once, in :data:`SECRET_ITEMS` (fields of the sub-documents of an
array in a collection, e.g. ``networks.recording_auth_configs[].token``). A sealed value is
a sub-document ``{"alg": "A256GCM", "kid": <key id>, "nonce": <b64>, "ct": <b64>}``; the
additional authenticated data binds the key id and the value's place (collection, document
id, array, item id, field), so a sealed value copied to another network or config does not
open.

The data keys come from the ``SECRET_KEYS`` setting: ``kid:base64key[,kid:base64key...]``,
newest first. The first key seals; any listed key opens. ``callingest admin rotate-secrets``
(:func:`callingest.rotation.rotate`) re-seals every stored value with the first key. The dev stack, the tests
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from callingest.settings import Settings, dev_run_dir

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

def seal_value(codec: SecretCodec, plain: Any, context: str) -> Any:
    """``plain`` (a string or a list of strings) sealed for ``context``."""
    if isinstance(plain, list):
        return [codec.seal(str(p), context) for p in plain]
    return codec.seal(str(plain), context)


def open_value(codec: SecretCodec, stored: Any, context: str) -> Any:
    """The plain value of ``stored`` (a sealed value or a list of them) sealed for ``context``."""
    if isinstance(stored, list):
        return [codec.open(s, context) for s in stored]
    return codec.open(stored, context)


def is_current(codec: SecretCodec, stored: Any) -> bool:
    """True if every value of ``stored`` is sealed with ``codec``'s newest key."""
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
                item[name] = old if same else seal_value(codec, plain, context)
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
            opened[name] = open_value(codec, item[name], spec.context(document_id, item, name))
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


def load_keyring(settings: Settings) -> Keyring:
    """The keyring of ``SECRET_KEYS``; the dev profile falls back to :func:`dev_keys`.

    A missing or malformed value stops the process (exit 2) with a message naming the variable,
    as :func:`callingest.settings.load_settings` does.
    """
    raw = settings.secret_keys
    if not raw.get_secret_value():
        if settings.dev:
            return Keyring.parse(dev_keys(dev_run_dir()))
        _refuse("required (the data keys that seal stored credentials), e.g. "
                "`callingest admin generate-secret-key`; unset only in the dev profile")
    try:
        return Keyring.parse(raw.get_secret_value())
    except ValueError as exc:
        _refuse(str(exc))


def _refuse(message: str) -> NoReturn:
    print(f"callingest: bad setting {KEY_SETTING}: {message}", file=sys.stderr)
    raise SystemExit(2)
