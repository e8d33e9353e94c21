"""What the platform runs on each record it receives: shape, canonical form, key, signature.

Depends only on the shared record format (:mod:`core.record`, :mod:`core.suites`,
:mod:`core.session`; docs/records.md). Which key may sign which record is the
verifier's business (:mod:`central.verifier`): here a record is checked against the one
key it is given.

The received bytes are never re-encoded: a record is accepted only if they are exactly
the canonical encoding of what they parse to (``non_canonical`` otherwise), so the bytes
signed, hashed into the chain and stored are the bytes received.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.record import (
    FORMAT_VERSION,
    JSON,
    LEGACY_FORMAT_VERSION,
    MAX_INT,
    MIN_INT,
    REQUIRED_FIELDS,
    canonical_float_free,
    check_no_float,
    parse_canonical,
    unb64u,
)
from core.session import KEY_CLASSES
from core.suites import ED25519, SIGNATURE_ALGS, Verifier, digest, key_id
from core.topics import TOPIC_ROOT

#: The record fields that hold binary values (base64url in its one form).
BINARY_FIELDS = ("prev", "sig")
_RECORDS_TOPIC = re.compile(rf"{re.escape(TOPIC_ROOT)}/([a-z0-9][a-z0-9-]{{2,62}})/records")


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


def gateway_of_topic(topic: str) -> str | None:
    """The gateway whose records topic *topic* is (``smartcorr/v1/gw/<gw>/records``,
    :func:`core.topics.records_topic`), or None for any other topic."""
    match = _RECORDS_TOPIC.fullmatch(topic)
    return match.group(1) if match else None


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")


def _object(pairs: list[tuple[str, JSON]]) -> dict[str, JSON]:
    """json's object hook: an object with two members of one name is no record (which
    one counts differs between JSON readers)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


def _constant(name: str) -> JSON:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _check_ints(value: JSON, path: str) -> None:
    """Raise :class:`ValueError` naming an integer outside the signed 64-bit range."""
    stack: list[tuple[JSON, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, int) and not isinstance(item, bool) and \
                not MIN_INT <= item <= MAX_INT:
            raise ValueError(f"integer at {where} outside the signed 64-bit range")


def _parse_json(data: bytes, odd: list[str]) -> JSON:
    """*data* parsed by the json module with hooks: a duplicate key is ``non_canonical``,
    no JSON ``malformed``; numbers with a fraction or an exponent, or beyond 64 bits, are
    appended to *odd*."""

    def number(text: str) -> float:
        odd.append(text)
        return float(text)

    def integer(text: str) -> int:
        value = int(text)
        if not MIN_INT <= value <= MAX_INT:
            odd.append(text)
        return value

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_object,
                          parse_constant=_constant, parse_float=number, parse_int=integer)
    except _DuplicateKeyError as exc:
        raise RecordError("non_canonical", str(exc)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError("malformed", f"not JSON: {exc}") from None


def parse_record(data: bytes) -> dict[str, JSON]:
    """A record's fields, shape-checked (types, version, canonical bytes); not yet verified.
    A format-1 record has no ``alg`` (:func:`verify_parsed` takes it as Ed25519).

    The checks run in the order of docs/records.md ("What the platform checks"), the
    first that fails giving the reason: ``malformed`` (no UTF-8 JSON object, a field
    missing or of another type, a float, an integer beyond 64 bits, a string with no
    UTF-8, a binary field not in its one base64url form), ``non_canonical`` (a duplicate
    key, or bytes that are not exactly :func:`core.record.canonical` of what they parse
    to), ``version``."""
    parsed = parse_canonical(data)  # the common case: canonical bytes, parsed in C
    fast = parsed is not None
    odd: list[str] = []  # numbers with a fraction or an exponent, or beyond 64 bits
    if parsed is None:  # something is wrong: the parser with hooks says what, in order
        rec: JSON = _parse_json(data, odd)
    else:
        rec = parsed
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
    if not legacy and rec["v"] != FORMAT_VERSION:
        raise RecordError("malformed", f"a record of format {rec['v']} has no 'alg' "
                          f"(format {FORMAT_VERSION} has)")
    if not fast:  # parse_canonical proved all of this for the bytes it parsed
        try:
            if odd:  # the walks below say where (the decoder's hooks only that there is one)
                check_no_float(rec, "record")
                _check_ints(rec, "record")
            encoded = canonical_float_free(rec)  # the hooks saw every number: no float
        except (TypeError, ValueError) as exc:
            raise RecordError("malformed", str(exc)) from None
        if encoded != data:
            raise RecordError("non_canonical", "the bytes are not the canonical encoding of "
                              "the record (docs/records.md, Canonical bytes)")
    for name in BINARY_FIELDS:
        try:
            unb64u(str(rec[name]))
        except ValueError as exc:
            raise RecordError("malformed", f"field {name!r}: {exc}") from None
    return rec


KeyLookup = Callable[[dict[str, JSON]], tuple[Verifier, str] | None]


def verify_record(data: bytes, key_for: KeyLookup) -> VerifiedRecord:
    """Check one record on its own: shape, canonical bytes, signature by the key
    *key_for(record)* gives (with its class), or ``unknown_key`` when it gives none."""
    rec = parse_record(data)
    return verify_parsed(rec, key_for, data)


def covered_record(rec: dict[str, JSON], key: Verifier, key_class: str,
                   data: bytes) -> VerifiedRecord:
    """A record :func:`parse_record` gave from *data* whose bytes a verified head statement
    signed with *key* (``covers``: core/head.py): verified by that signature, its own is
    not checked here."""
    alg = ED25519 if "alg" not in rec else str(rec["alg"])
    if key.alg != alg:
        raise RecordError("bad_signature", f"seq {rec['seq']} of {rec['gw']}: alg {alg!r} "
                          f"but key {rec['kid']!r} is {key.alg}")
    return VerifiedRecord(str(rec["gw"]), int(rec["seq"]), unb64u(str(rec["prev"])),
                          digest(alg, data), str(rec["kind"]), rec, key_class)


def verify_parsed(rec: dict[str, JSON], key_for: KeyLookup,
                  data: bytes | None = None) -> VerifiedRecord:
    """Verify a record :func:`parse_record` gave from *data*, the bytes received (its
    chain digest is over them; without them, over the canonical bytes, which are equal)."""
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
    complete = canonical_float_free(rec) if data is None else data
    sig_text = rec.pop("sig")
    try:
        good = key.verify(unb64u(str(sig_text)), canonical_float_free(rec))
        prev = unb64u(str(rec["prev"]))
    except ValueError:
        good = False
    rec["sig"] = sig_text
    if not good:
        raise RecordError("bad_signature", f"seq {rec['seq']} of {rec['gw']}")
    return VerifiedRecord(str(rec["gw"]), int(rec["seq"]),
                          prev, digest(alg, complete), str(rec["kind"]), rec, key_class)
