"""The kiosks paired with this gateway: serial and check-in key, beside the tag registry.

A kiosk signs each check-in with its pairing key (AES-128 CMAC, docs/kiosk.md); the
gateway takes a check-in only from a kiosk paired here, under that key. The file
(``kiosks.json``, a small TinyDB document installers read with ``provision
list-kiosks``) is written atomically like the tag registry, and each key is kept
encrypted under the gateway's storage key, bound to the kiosk's serial: the file read
raw shows no key, and a key moved to another entry does not decrypt.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from tinydb import Query, TinyDB

from core.devices import KIOSK_SERIAL_MAX, PairedKiosk
from core.suites import storage_aead
from provisioning.identity import Identity
from provisioning.registry import (
    AlreadyPairedError,
    AtomicJSONStorage,
    RegistryError,
    device_key_id,
    when,
)

KIOSKS_FILE = "kiosks.json"
KIOSK_KEY_BYTES = 16
_NONCE_BYTES = 12
#: The longest serial a HELLO can carry (docs/serial-protocol.md, section 5).
SERIAL_MAX = KIOSK_SERIAL_MAX
_FIX = "unpair and pair the kiosk again, or restore the file from backup"


def parse_serial(text: str) -> str:
    """A kiosk serial as its HELLO says it: 1 to 230 printable ASCII characters."""
    serial = text.strip()
    if not 1 <= len(serial) <= SERIAL_MAX or not all(" " <= c <= "~" for c in serial):
        raise RegistryError(f"kiosk serial {text!r}: give the serial the kiosk reports "
                            f"(1-{SERIAL_MAX} printable ASCII characters)")
    return serial


def parse_key(text: str) -> bytes:
    """A pairing key given as 32 hex digits (spaces allowed); never echoed in the error."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise RegistryError(f"the kiosk key must be {2 * KIOSK_KEY_BYTES} hex digits") from None
    if len(key) != KIOSK_KEY_BYTES:
        raise RegistryError(f"the kiosk key must be {KIOSK_KEY_BYTES} bytes "
                            f"({2 * KIOSK_KEY_BYTES} hex digits), got {len(key)}")
    return key


def already_paired(old: PairedKiosk) -> AlreadyPairedError:
    """The refusal to pair a kiosk again without --replace: what is paired now, and how."""
    return AlreadyPairedError(
        f"kiosk {old.serial} is already paired (since {when(old.paired_at)}, key "
        f"{device_key_id(old.key)}): pairing it again would give it a key the kiosk does not "
        "hold, and its check-ins would be refused as spoofs. To replace its key, load the "
        "new key into the kiosk and give --replace")


def open_kiosks(identity: Identity) -> KioskRegistry:
    """The kiosk registry kept beside the gateway's identity."""
    return KioskRegistry(identity.directory / KIOSKS_FILE, identity.storage_key)


def _aad(serial: str) -> bytes:
    return b"kiosk:" + serial.encode("ascii")


class KioskRegistry:
    def __init__(self, path: Path, storage_key: bytes) -> None:
        self.path = path
        self._aead = storage_aead(storage_key)
        self._db = TinyDB(str(path), storage=AtomicJSONStorage)
        self._kiosks = self._db.table("kiosks")

    def close(self) -> None:
        self._db.close()

    def get(self, serial: str) -> PairedKiosk | None:
        """The pairing of kiosk *serial*, if it is paired."""
        docs = self._kiosks.search(Query().serial == parse_serial(serial))
        return self._decode(docs[0]) if docs else None

    def pair(self, serial: str, key: bytes | None = None, *,
             replace: bool = False) -> PairedKiosk:
        """Pair the kiosk *serial* (a key is generated when none is given). A kiosk paired
        already is refused (:class:`AlreadyPairedError`) unless *replace*: then its key is
        replaced, ``paired_at`` kept and ``replaced_at`` added."""
        serial = parse_serial(serial)
        key = key if key is not None else secrets.token_bytes(KIOSK_KEY_BYTES)
        if len(key) != KIOSK_KEY_BYTES:
            raise RegistryError(f"kiosk {serial}: the key must be {KIOSK_KEY_BYTES} bytes")
        old = self.get(serial)
        if old is not None and not replace:
            raise already_paired(old)
        nonce = os.urandom(_NONCE_BYTES)
        now = int(time.time())
        doc: dict[str, Any] = {
            "serial": serial,
            "key_enc": (nonce + self._aead.encrypt(nonce, key, _aad(serial))).hex(),
            "paired_at": now if old is None else old.paired_at,
        }
        if old is not None:
            doc["replaced_at"] = now
        self._kiosks.upsert(doc, Query().serial == serial)
        return self._decode(doc)

    def unpair(self, serial: str) -> bool:
        return bool(self._kiosks.remove(Query().serial == parse_serial(serial)))

    def __iter__(self) -> Iterator[PairedKiosk]:
        return (self._decode(doc) for doc in self._kiosks.all())

    def snapshot(self) -> dict[str, PairedKiosk]:
        return {k.serial: k for k in self}

    def _decode(self, doc: Mapping[str, Any]) -> PairedKiosk:
        serial, paired = doc.get("serial"), doc.get("paired_at")
        if not isinstance(serial, str) or not serial:
            raise RegistryError(f"{self.path}: an entry without a valid 'serial'; {_FIX}")
        where = f"{self.path}: kiosk {serial!r}"
        if not isinstance(paired, int) or isinstance(paired, bool):
            raise RegistryError(f"{where}: 'paired_at' must be a time in seconds; {_FIX}")
        try:
            raw = bytes.fromhex(doc["key_enc"])
        except (KeyError, TypeError, ValueError):
            raise RegistryError(f"{where}: 'key_enc' is missing or not hex; {_FIX}") from None
        try:
            key = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _aad(serial))
        except (InvalidTag, ValueError, UnicodeEncodeError) as exc:
            raise RegistryError(f"{where}: the key does not decrypt with this gateway's "
                                f"storage key (another gateway's file, or altered?); {_FIX}") \
                from exc
        if len(key) != KIOSK_KEY_BYTES:
            raise RegistryError(f"{where}: the key is {len(key)} bytes; {_FIX}")
        return PairedKiosk(serial, key, paired)
