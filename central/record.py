"""What the platform runs on each record it receives: shape, canonical form, key, signature.

Depends only on the shared record format (:mod:`core.record`, docs/records.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from core.record import (
    FORMAT_VERSION,
    JSON,
    REQUIRED_FIELDS,
    canonical,
    check_no_float,
    key_id,
    unb64u,
)


class RecordError(Exception):
    """A record failed verification; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VerifiedRecord:
    gateway_id: str
    seq: int
    prev: bytes
    digest: bytes
    kind: str
    record: dict[str, JSON]


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
        check_no_float(rec, "record")
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
