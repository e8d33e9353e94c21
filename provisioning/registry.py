"""The device registry: tags paired with this gateway, in a small TinyDB document.

Installers read it (``provision list-tags``), so it is JSON; it is written
atomically (temporary file, fsync, rename, fsync of the directory) so a power
cut leaves the old or the new registry, never half of one. A tag's key (its
AES-128 CMAC key, set at pairing) is kept encrypted under the gateway's storage
key: the file read raw shows no key.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeGuard

from cryptography.exceptions import InvalidTag
from tinydb import Query, TinyDB
from tinydb.storages import Storage

from core import devices
from core.devices import DEFAULT_ABSENT_AFTER_S, PairedTag, tag_ref
from core.errors import UserError
from core.suites import storage_aead
from provisioning.identity import Identity, atomic_write

REGISTRY_FILE = "tags.json"
TAG_RE = devices.TAG_REF_RE
TAG_KEY_BYTES = 16
NONCE_BYTES = 12
#: The absence times a pairing may set, shared with the platform's commands.
MIN_ABSENT_AFTER_S = devices.MIN_ABSENT_AFTER_S
MAX_ABSENT_AFTER_S = devices.MAX_ABSENT_AFTER_S


class RegistryError(UserError):
    """The registry cannot do what was asked; the message says why and what to do."""


class AlreadyPairedError(RegistryError):
    """The device is paired already: pairing it again replaces its key only when asked."""


#: Prefix of the hash that names a device key in records (never the key itself).
_KID_DOMAIN = b"smartcorr.device-key\x00"


def device_key_id(key: bytes) -> str:
    """A tag's or kiosk's pairing key named without revealing it: the first 8 bytes of
    SHA-256 over a domain prefix and the key, in hex. Records name keys by it (a
    replacement names the old and the new one); a 128-bit random key cannot be found
    from it."""
    return hashlib.sha256(_KID_DOMAIN + key).digest()[:8].hex()


def new_device_key() -> bytes:
    """A fresh AES-128 pairing key (the installer loads it into the tag or kiosk)."""
    return secrets.token_bytes(TAG_KEY_BYTES)


def when(seconds: int) -> str:
    """A registry time for people: UTC, to the minute."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


class AtomicJSONStorage(Storage):
    """TinyDB storage writing the whole document atomically (TinyDB's own rewrites in place)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.path} is corrupt ({exc}); restore it from backup") \
                from None
        return _check_document(self.path, data)

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode(), 0o600)

    def close(self) -> None:
        pass


def _check_document(path: Path, data: object) -> dict[str, dict[str, Any]]:
    """TinyDB's shape: tables of documents keyed by a decimal id. Anything else is a
    :class:`RegistryError` naming the file and the place, never a traceback."""
    if not isinstance(data, dict):
        raise RegistryError(f"{path} is corrupt (not a JSON object); restore it from backup")
    for table, docs in data.items():
        if not isinstance(docs, dict):
            raise RegistryError(f"{path}: table {table!r} is corrupt (not an object); "
                                "restore the file from backup")
        for doc_id, doc in docs.items():
            if not (isinstance(doc_id, str) and doc_id.isdecimal() and isinstance(doc, dict)):
                raise RegistryError(f"{path}: table {table!r} entry {doc_id!r} is corrupt; "
                                    "restore the file from backup or unpair and pair again")
    return data


def parse_tag(text: str) -> str:
    """Accept ``T00001000``, ``0x1000`` or ``4096``; return the canonical reference."""
    value = text.strip().upper()
    if TAG_RE.match(value):
        return value
    try:
        number = int(value, 16) if value.startswith("0X") else int(value)
    except ValueError:
        raise RegistryError(f"tag {text!r}: give T + 8 hex digits, 0x… or a number") from None
    if not 0 <= number <= 0xFFFFFFFF:
        raise RegistryError(f"tag {text!r} is out of range (32-bit)")
    return tag_ref(number)


def open_registry(identity: Identity) -> TagRegistry:
    """The registry kept beside the gateway's identity."""
    return TagRegistry(identity.directory / REGISTRY_FILE, identity.storage_key)


class TagRegistry:
    def __init__(self, path: Path, storage_key: bytes) -> None:
        self.path = path
        self._aead = storage_aead(storage_key)
        self._db = TinyDB(str(path), storage=AtomicJSONStorage)
        self._tags = self._db.table("tags")

    def close(self) -> None:
        self._db.close()

    def get(self, tag: str) -> PairedTag | None:
        """The pairing of *tag*, if it is paired."""
        tag = parse_tag(tag)
        docs = self._tags.search(Query().tag == tag)
        return self._decode(docs[0]) if docs else None

    def pair(self, tag: str, key: bytes | None = None, *,
             absent_after_s: int | None = None, replace: bool = False) -> PairedTag:
        """Pair *tag* with *key* (generated when None). A tag paired already is refused
        (:class:`AlreadyPairedError`: the tag still holds its key, so a new one would make
        its beacons spoofs) unless *replace*: then its key is replaced and its settings
        kept (``absent_after_s`` unless given; ``paired_at``), ``replaced_at`` added."""
        tag = parse_tag(tag)
        key = key if key is not None else new_device_key()
        if len(key) != TAG_KEY_BYTES:
            raise RegistryError(f"tag {tag}: the key must be {TAG_KEY_BYTES} bytes "
                                f"({2 * TAG_KEY_BYTES} hex digits)")
        old = self.get(tag)
        if old is not None and not replace:
            raise already_paired(old)
        if absent_after_s is None:
            absent_after_s = DEFAULT_ABSENT_AFTER_S if old is None else old.absent_after_s
        if not MIN_ABSENT_AFTER_S <= absent_after_s <= MAX_ABSENT_AFTER_S:
            raise RegistryError(f"tag {tag}: --absent-after must be {MIN_ABSENT_AFTER_S}-"
                                f"{MAX_ABSENT_AFTER_S} seconds, got {absent_after_s}")
        nonce = os.urandom(NONCE_BYTES)
        now = int(time.time())
        doc: dict[str, Any] = {
            "tag": tag,
            "key_enc": (nonce + self._aead.encrypt(nonce, key, tag.encode())).hex(),
            "absent_after_s": absent_after_s,
            "paired_at": now if old is None else old.paired_at,
        }
        if old is not None:
            doc["replaced_at"] = now
        self._tags.upsert(doc, Query().tag == tag)
        return self._decode(doc)

    def unpair(self, tag: str) -> bool:
        return bool(self._tags.remove(Query().tag == parse_tag(tag)))

    def __iter__(self) -> Iterator[PairedTag]:
        return (self._decode(doc) for doc in self._tags.all())

    def snapshot(self) -> dict[str, PairedTag]:
        return {t.tag: t for t in self}

    def _decode(self, doc: Mapping[str, Any]) -> PairedTag:
        tag = doc.get("tag")
        where = f"{self.path}: entry {tag!r}" if isinstance(tag, str) else \
            f"{self.path}: an entry without a valid 'tag'"
        fix = "unpair and pair the tag again, or restore the file from backup"
        if not isinstance(tag, str) or not TAG_RE.match(tag):
            raise RegistryError(f"{where}: 'tag' must be T + 8 hex digits; {fix}")
        absent, paired = doc.get("absent_after_s"), doc.get("paired_at")
        if not _whole(absent) or not MIN_ABSENT_AFTER_S <= absent <= MAX_ABSENT_AFTER_S:
            raise RegistryError(f"{where}: 'absent_after_s' must be {MIN_ABSENT_AFTER_S}-"
                                f"{MAX_ABSENT_AFTER_S}, got {absent!r}; {fix}")
        if not _whole(paired):
            raise RegistryError(f"{where}: 'paired_at' must be a time in seconds, got "
                                f"{paired!r}; {fix}")
        try:
            raw = bytes.fromhex(doc["key_enc"])
        except (KeyError, TypeError, ValueError):
            raise RegistryError(f"{where}: 'key_enc' is missing or not hex; {fix}") from None
        try:
            key = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], tag.encode())
        except (InvalidTag, ValueError) as exc:
            raise RegistryError(
                f"{where}: the key does not decrypt with this gateway's storage key "
                f"(registry from another gateway, or altered?); {fix}") from exc
        if len(key) != TAG_KEY_BYTES:
            raise RegistryError(f"{where}: the key is {len(key)} bytes, not {TAG_KEY_BYTES}; "
                                f"{fix}")
        return PairedTag(tag, key, absent, paired)


def already_paired(old: PairedTag) -> AlreadyPairedError:
    """The refusal to pair a tag again without --replace: what is paired now, and how."""
    return AlreadyPairedError(
        f"tag {old.tag} is already paired (since {when(old.paired_at)}, absent after "
        f"{old.absent_after_s} s, key {device_key_id(old.key)}): pairing it again would give "
        "it a key the tag does not hold, and its beacons would be refused as spoofs. To "
        "replace its key, load the new key into the tag and give --replace (its settings "
        "are kept unless you give them); to pair another tag, check the number")


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
