"""The sealed record: canonical encoding, Ed25519 signature and hash chain (docs/records.md).

Sans-IO. :class:`Sealer` turns readings into sealed records; :func:`verify_record`
is what the platform runs on each record it receives.

Canonical bytes: JSON with keys sorted, no insignificant whitespace, UTF-8 (not
``\\u`` escapes), and no floating-point numbers anywhere (integers and strings
only: a float has no single textual form across languages). The signature
(``sig``) is over the canonical bytes of the record without ``sig``; ``prev`` is
the SHA-256 of the complete canonical bytes of the record with the previous
``seq``. Binary values are unpadded base64url (RFC 4648 section 5).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

FORMAT_VERSION = 1
GENESIS_PREV = b"\x00" * 32
JSON = Any  # JSON value without floats


class Priority(enum.IntEnum):
    """Delivery classes, highest first (DESIGN.md section 3)."""

    ALARM = 0
    CHECKIN = 1
    STATUS = 2
    POSITION = 3
    HEARTBEAT = 4

    @property
    def label(self) -> str:
        return self.name.lower()


KIND_PRIORITY: dict[str, Priority] = {
    "tag.tamper": Priority.ALARM,
    "tag.spoof": Priority.ALARM,
    "gateway.moved": Priority.ALARM,
    "gateway.returned": Priority.STATUS,
    "checkin": Priority.CHECKIN,
    "tag.tamper_restored": Priority.STATUS,
    "tag.absent": Priority.STATUS,
    "tag.present": Priority.STATUS,
    "tag.battery_low": Priority.STATUS,
    "tag.battery_ok": Priority.STATUS,
    "kiosk.status": Priority.STATUS,
    "kiosk.tamper": Priority.ALARM,
    "kiosk.tamper_cleared": Priority.STATUS,
    "kiosk.fault": Priority.STATUS,
    "kiosk.fault_cleared": Priority.STATUS,
    "device.up": Priority.STATUS,
    "device.lost": Priority.STATUS,
    "time.step": Priority.STATUS,
    "gap": Priority.ALARM,
    "tag.presence": Priority.POSITION,
    "gnss.fix": Priority.POSITION,
    "gateway.health": Priority.HEARTBEAT,
    "gateway.boot": Priority.STATUS,
    "device.error": Priority.STATUS,
    # first out, so the platform learns the new key before records signed with it
    "key.rotate": Priority.ALARM,
}


class RecordError(Exception):
    """A record failed verification; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_no_float(value: JSON, path: str) -> None:
    if isinstance(value, float):
        raise TypeError(f"float at {path}: records carry integers (scale them) or strings")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_no_float(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_no_float(item, f"{path}[{index}]")


_SCALARS = frozenset({int, str, bool, type(None)})
#: The record's fields that sort after "sig".
_AFTER_SIG = ("src", "t", "tq", "v")


def _has_float(value: JSON) -> bool:
    """Fast check (the sealing hot path); :func:`_check_no_float` says where."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is dict:
            stack.extend(item.values())
        elif kind is list or kind is tuple:
            stack.extend(item)
        elif isinstance(item, float):
            return True
        elif isinstance(item, Mapping):
            stack.extend(item.values())
    return False


def canonical(obj: Mapping[str, JSON]) -> bytes:
    """The one encoding that is signed and hashed."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


_DUMPS = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return b64u(hashlib.sha256(raw).digest()[:12])


@dataclass(frozen=True, slots=True)
class Source:
    cls: str
    id: str
    fw: str | None = None

    def to_json(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {"class": self.cls, "id": self.id}
        if self.fw is not None:
            out["fw"] = self.fw
        return out


@dataclass(frozen=True, slots=True)
class Reading:
    """Something a driver observed; not yet a record."""

    kind: str
    source: Source
    body: Mapping[str, JSON]
    mono_ns: int
    #: (device serial, device event id) when a device waits for this to be committed.
    device_event: tuple[str, int] | None = None
    #: More (key, value) pairs the store keeps with this record, in its transaction
    #: (e.g. a tag's rolling counter: replay protection that survives restarts).
    ledger: tuple[tuple[str, int], ...] = ()

    @property
    def priority(self) -> Priority:
        return KIND_PRIORITY.get(self.kind, Priority.STATUS)


@dataclass(frozen=True, slots=True)
class Timestamp:
    utc_ms: int
    quality: str  # gnss | ntp | rtc | unsynced
    mono_ms: int


@dataclass(frozen=True, slots=True)
class SealedRecord:
    seq: int
    priority: Priority
    kind: str
    data: bytes  # complete canonical bytes, signature included
    digest: bytes  # SHA-256 of data: the next record's prev


class Sealer:
    """Numbers, chains and signs records. Its state is persisted by the store."""

    def __init__(
        self,
        gateway_id: str,
        signing_key: Ed25519PrivateKey,
        *,
        last_seq: int,
        last_digest: bytes,
        boot: int,
    ) -> None:
        self.gateway_id = gateway_id
        self._key = signing_key
        self.kid = key_id(signing_key.public_key())
        self.last_seq = last_seq
        self.last_digest = last_digest
        self.boot = boot

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return self._key

    def use_key(self, key: Ed25519PrivateKey) -> None:
        """Sign from the next record on with *key*."""
        self._key = key
        self.kid = key_id(key.public_key())

    def seal(self, reading: Reading, ts: Timestamp) -> SealedRecord:
        if _has_float(reading.body):
            _check_no_float(dict(reading.body), "body")  # raises, naming where
        seq = self.last_seq + 1
        rec: dict[str, JSON] = {
            "v": FORMAT_VERSION,
            "gw": self.gateway_id,
            "seq": seq,
            "prev": b64u(self.last_digest),
            "boot": self.boot,
            "t": ts.utc_ms,
            "tq": ts.quality,
            "mono": ts.mono_ms,
            "src": reading.source.to_json(),
            "kind": reading.kind,
            "prio": reading.priority.label,
            "body": dict(reading.body),
            "kid": self.kid,
        }
        # Encode once, then splice "sig" in at its sorted place: between "seq" and the
        # fields after it (src, t, tq, v), whose encoding is the tail of the whole.
        # canonical() of the signed dict gives the same bytes (tested).
        unsigned = _DUMPS(rec)
        tail = _DUMPS({k: rec[k] for k in _AFTER_SIG})  # '{"src":…,"v":1}'
        head = unsigned[: len(unsigned) - len(tail) + 1]  # '{"body":…,"seq":N,'
        sig = b64u(self._key.sign(unsigned.encode("utf-8")))
        data = (head + '"sig":"' + sig + '",' + tail[1:]).encode("utf-8")
        digest = hashlib.sha256(data).digest()
        self.last_seq = seq
        self.last_digest = digest
        return SealedRecord(seq, reading.priority, reading.kind, data, digest)


@dataclass(frozen=True, slots=True)
class VerifiedRecord:
    gateway_id: str
    seq: int
    prev: bytes
    digest: bytes
    kind: str
    record: dict[str, JSON]


REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int, "gw": str, "seq": int, "prev": str, "boot": int, "t": int, "tq": str,
    "mono": int, "src": dict, "kind": str, "prio": str, "body": dict, "kid": str, "sig": str,
}


def rotation_body(new_key: Ed25519PublicKey) -> dict[str, JSON]:
    """Body of a ``key.rotate`` record: signed by the old key, it vouches for the new one."""
    return {"new_kid": key_id(new_key),
            "new_key": b64u(new_key.public_bytes(Encoding.Raw, PublicFormat.Raw))}


def announced_key(record: Mapping[str, JSON]) -> Ed25519PublicKey | None:
    """The new key a verified ``key.rotate`` record announces (None if malformed)."""
    body = record.get("body")
    if record.get("kind") != "key.rotate" or not isinstance(body, dict):
        return None
    try:
        key = Ed25519PublicKey.from_public_bytes(unb64u(str(body.get("new_key", ""))))
    except ValueError:
        return None
    return key if key_id(key) == body.get("new_kid") else None


def verify_record(data: bytes, keys: Mapping[str, Ed25519PublicKey]) -> VerifiedRecord:
    """Check one record on its own: shape, canonical form, known key, signature."""
    try:
        rec = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError("malformed", f"not JSON: {exc}") from None
    if not isinstance(rec, dict):
        raise RecordError("malformed", "not a JSON object")
    for name, kind in REQUIRED_FIELDS.items():
        if not isinstance(rec.get(name), kind) or isinstance(rec.get(name), bool):
            raise RecordError("malformed", f"field {name!r} missing or not {kind}")
    if rec["v"] != FORMAT_VERSION:
        raise RecordError("version", f"format version {rec['v']} not supported")
    try:
        _check_no_float(rec, "record")
        complete = canonical(rec)
    except (TypeError, ValueError) as exc:
        raise RecordError("malformed", str(exc)) from None
    key = keys.get(rec["kid"])
    if key is None:
        raise RecordError("unknown_key", f"key id {rec['kid']!r} is not trusted")
    sig_text = rec.pop("sig")
    try:
        key.verify(unb64u(sig_text), canonical(rec))
        prev = unb64u(rec["prev"])
    except (InvalidSignature, ValueError):
        raise RecordError("bad_signature", f"seq {rec['seq']} of {rec['gw']}") from None
    rec["sig"] = sig_text
    return VerifiedRecord(
        rec["gw"], rec["seq"], prev, hashlib.sha256(complete).digest(), rec["kind"], rec
    )
