"""The device registry: tags paired with this gateway, in a small TinyDB document.

Installers read it (``provision list-tags``), so it is JSON; it is written
atomically (temporary file, fsync, rename, fsync of the directory) so a power
cut leaves the old or the new registry, never half of one. A tag's key (its
AES-128 CMAC key, set at pairing) is kept encrypted under the gateway's storage
key: the file read raw shows no key.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tinydb import Query, TinyDB
from tinydb.storages import Storage

from core.devices import DEFAULT_ABSENT_AFTER_S, PairedTag, tag_ref
from core.errors import UserError
from provisioning.identity import Identity, atomic_write

REGISTRY_FILE = "tags.json"
TAG_RE = re.compile(r"^T[0-9A-F]{8}$")


class RegistryError(UserError):
    """The registry cannot do what was asked; the message says why and what to do."""


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
        return data if isinstance(data, dict) else None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode(), 0o600)

    def close(self) -> None:
        pass


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
        self._aead = AESGCM(storage_key)
        self._db = TinyDB(str(path), storage=AtomicJSONStorage)
        self._tags = self._db.table("tags")

    def close(self) -> None:
        self._db.close()

    def pair(self, tag: str, key: bytes | None = None, *,
             absent_after_s: int = DEFAULT_ABSENT_AFTER_S) -> PairedTag:
        tag = parse_tag(tag)
        key = key if key is not None else secrets.token_bytes(16)
        if len(key) != 16:
            raise RegistryError(f"tag {tag}: the key must be 16 bytes (32 hex digits)")
        if absent_after_s < 10:
            raise RegistryError(f"tag {tag}: absent_after_s must be at least 10 seconds")
        nonce = os.urandom(12)
        doc = {
            "tag": tag,
            "key_enc": (nonce + self._aead.encrypt(nonce, key, tag.encode())).hex(),
            "absent_after_s": absent_after_s,
            "paired_at": int(time.time()),
        }
        self._tags.upsert(doc, Query().tag == tag)
        return self._decode(doc)

    def unpair(self, tag: str) -> bool:
        return bool(self._tags.remove(Query().tag == parse_tag(tag)))

    def __iter__(self) -> Iterator[PairedTag]:
        return (self._decode(doc) for doc in self._tags.all())

    def snapshot(self) -> dict[str, PairedTag]:
        return {t.tag: t for t in self}

    def _decode(self, doc: Mapping[str, Any]) -> PairedTag:
        raw = bytes.fromhex(doc["key_enc"])
        try:
            key = self._aead.decrypt(raw[:12], raw[12:], str(doc["tag"]).encode())
        except InvalidTag as exc:
            raise RegistryError(
                f"{self.path}: the key of {doc['tag']} does not decrypt with this gateway's "
                "storage key (registry from another gateway?)") from exc
        return PairedTag(doc["tag"], key, int(doc["absent_after_s"]), int(doc["paired_at"]))
