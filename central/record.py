"""What the platform runs on each record it receives: shape, canonical form, key, signature.

Depends only on the shared record format (:mod:`core.record`, :mod:`core.suites`,
:mod:`core.session`; docs/records.md). Which key may sign which record is the
verifier's business (:mod:`central.verifier`): here a record is checked against the one
key it is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.record import (
    FORMAT_VERSION,
    JSON,
    LEGACY_FORMAT_VERSION,
    REQUIRED_FIELDS,
    canonical,
    check_no_float,
    unb64u,
)
from core.session import KEY_CLASSES
from core.suites import ED25519, SIGNATURE_ALGS, Verifier, digest, key_id


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
    #: the class of the identity key behind the signature: ``tpm`` or ``file``
    key_class: str = ""


@dataclass(frozen=True, slots=True)
class Registration:
    """What the platform registered for a gateway at enrolment: its identity key
    (``signing.pub`` of the gateway's identity directory)."""

    gateway_id: str
    alg: str
    public_raw: bytes
    kid: str
    key_class: str
    suite: str

    @classmethod
    def from_json(cls, obj: object) -> Registration:
        if not isinstance(obj, Mapping):
            raise ValueError("not a gateway registration (not a JSON object)")  # noqa: TRY004
        try:
            alg, key_class = str(obj["alg"]), str(obj["class"])
            raw = unb64u(str(obj["key"]))
            reg = cls(str(obj["gateway_id"]), alg, raw, str(obj["kid"]), key_class,
                      str(obj.get("suite", "ed25519")))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"not a gateway registration ({exc})") from None
        if alg not in SIGNATURE_ALGS or key_class not in KEY_CLASSES:
            raise ValueError(f"registration of {reg.gateway_id}: algorithm {alg!r} or class "
                             f"{key_class!r} unknown")
        Verifier(alg, raw)  # a key of that algorithm?
        if key_id(alg, raw) != reg.kid:
            raise ValueError(f"registration of {reg.gateway_id}: kid does not match the key")
        return reg

    def verifier(self) -> Verifier:
        return Verifier(self.alg, self.public_raw)


def load_registrations(paths: list[Path]) -> dict[str, Registration]:
    """Registrations by gateway id, from the gateways' ``signing.pub`` files."""
    out: dict[str, Registration] = {}
    for path in paths:
        try:
            reg = Registration.from_json(json.loads(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        out[reg.gateway_id] = reg
    return out


def parse_record(data: bytes) -> dict[str, JSON]:
    """A record's fields, shape-checked (types, version, canonical-able); not yet verified.
    A format-1 record has no ``alg`` (:func:`verify_parsed` takes it as Ed25519)."""
    try:
        rec = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError("malformed", f"not JSON: {exc}") from None
    if not isinstance(rec, dict):
        raise RecordError("malformed", "not a JSON object")
    legacy = rec.get("v") == LEGACY_FORMAT_VERSION and "alg" not in rec
    for name, kind in REQUIRED_FIELDS.items():
        if legacy and name == "alg":
            continue
        if not isinstance(rec.get(name), kind) or isinstance(rec.get(name), bool):
            raise RecordError("malformed", f"field {name!r} missing or not {kind}")
    if rec["v"] not in (FORMAT_VERSION, LEGACY_FORMAT_VERSION):
        raise RecordError("version", f"format version {rec['v']} not supported")
    if not legacy and rec["alg"] not in SIGNATURE_ALGS:
        raise RecordError("malformed", f"unknown algorithm {rec['alg']!r}")
    try:
        check_no_float(rec, "record")
        canonical(rec)
    except (TypeError, ValueError) as exc:
        raise RecordError("malformed", str(exc)) from None
    return rec


KeyLookup = Callable[[dict[str, JSON]], tuple[Verifier, str] | None]


def verify_record(data: bytes, key_for: KeyLookup) -> VerifiedRecord:
    """Check one record on its own: shape, canonical form, signature by the key
    *key_for(record)* gives (with its class), or ``unknown_key`` when it gives none."""
    rec = parse_record(data)
    return verify_parsed(rec, key_for)


def verify_parsed(rec: dict[str, JSON], key_for: KeyLookup) -> VerifiedRecord:
    found = key_for(rec)
    if found is None:
        raise RecordError("unknown_key", f"key id {rec['kid']!r} is not trusted for "
                          f"gateway {rec['gw']!r}")
    key, key_class = found
    legacy = "alg" not in rec
    alg = ED25519 if legacy else str(rec["alg"])
    if key.alg != alg:
        raise RecordError("bad_signature", f"seq {rec['seq']} of {rec['gw']}: alg {alg!r} "
                          f"but key {rec['kid']!r} is {key.alg}")
    complete = canonical(rec)
    sig_text = rec.pop("sig")
    try:
        good = key.verify(unb64u(str(sig_text)), canonical(rec))
        prev = unb64u(str(rec["prev"]))
    except ValueError:
        good = False
    rec["sig"] = sig_text
    if not good:
        raise RecordError("bad_signature", f"seq {rec['seq']} of {rec['gw']}")
    return VerifiedRecord(str(rec["gw"]), int(rec["seq"]),
                          prev, digest(alg, complete), str(rec["kind"]), rec, key_class)
