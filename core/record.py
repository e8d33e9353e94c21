"""The record format shared by the gateway and the platform (docs/records.md).

Value types of the pipeline (:class:`Source`, :class:`Reading`,
:class:`Timestamp`), and the encoding both sides depend on: canonical bytes,
base64url, key ids, the record's fields. Sealing lives in :mod:`buffer.seal`,
verification in :mod:`central.record`.

Canonical bytes (docs/records.md, "Canonical bytes", defines them byte by byte): JSON
with object keys sorted by code point, no insignificant whitespace, UTF-8 (only ``"``,
``\\``, and U+0000..U+001F escaped), integers in the signed 64-bit range and no
floating-point numbers anywhere (a float has no single textual form across languages).
Binary values are unpadded base64url (RFC 4648 section 5) in their one form: :func:`unb64u`
refuses any other text.

:func:`canonical` and :func:`canonical_body` encode with orjson (C, one walk of the value)
and fall back to :func:`canonical_reference` (the json module: the definition in
Python) for every value orjson would write otherwise or refuses: a float, NaN or an
infinity (orjson writes NaN as ``null``), a key that is no str, a subclass of str, int,
dict or list, an integer beyond 64 bits, a lone surrogate, deep nesting.
tests/test_canonical.py proves the two byte for byte equal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from core.kinds import Priority, priority_of

#: Format 2 adds ``alg`` and signs with session keys certified by the gateway's identity;
#: format 1 (no ``alg``: Ed25519 by the identity key itself) is still verified.
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
GENESIS_PREV = b"\x00" * 32
#: The integers a record may hold: the signed 64-bit range, which every JSON reader of
#: the platform's languages takes exactly (docs/records.md, "Canonical bytes").
MIN_INT, MAX_INT = -(2**63), 2**63 - 1
JSON = Any  # JSON value without floats

#: Every field of a record and its JSON type (``bool`` is never an ``int`` here).
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "alg": str, "v": int, "gw": str, "seq": int, "prev": str, "boot": int, "t": int, "tq": str,
    "mono": int, "src": dict, "kind": str, "prio": str, "body": dict, "kid": str, "sig": str,
}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64u(text: str) -> bytes:
    """The bytes whose :func:`b64u` is exactly *text*; :class:`ValueError` for anything
    else: padding, a character outside the URL-safe alphabet (``+``, ``/``, whitespace),
    a length of 4n+1, or unused low bits of the last character that are not zero. Each
    byte string has one text, so a record cannot be altered without changing its bytes."""
    if len(text) % 4 == 1 or "+" in text or "/" in text or "=" in text:
        raise ValueError("Invalid base64url: padding, a character outside the URL-safe "
                         "alphabet or a length of 4n+1 (RFC 4648 section 5, unpadded)")
    standard = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
    try:  # strict: any character outside the alphabet (whitespace, non-ASCII) is an error
        data = binascii.a2b_base64(standard, strict_mode=True)
    except ValueError:  # binascii.Error, or a non-ASCII str
        raise ValueError("Invalid base64url: padding, a character outside the URL-safe "
                         "alphabet or a length of 4n+1 (RFC 4648 section 5, unpadded)"
                         ) from None
    if binascii.b2a_base64(data, newline=False) != standard.encode("ascii"):
        raise ValueError("Invalid base64url: non-zero unused bits (not its one form)")
    return data


def check_no_float(value: JSON, path: str) -> None:
    """Raise :class:`TypeError` naming where *value* holds a float."""
    if isinstance(value, float):
        raise TypeError(f"float at {path}: records carry integers (scale them) or strings")
    if isinstance(value, dict):
        for key, item in value.items():
            check_no_float(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_no_float(item, f"{path}[{index}]")


_SCALARS = frozenset({int, str, bool, type(None)})


def has_float(value: JSON) -> bool:
    """Fast check (the sealing hot path); :func:`check_no_float` says where."""
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


def canonical_reference(obj: JSON) -> bytes:
    """The one encoding that is signed and hashed, by its definition in Python
    (docs/records.md, "Canonical bytes"): :func:`canonical` gives the same bytes, faster.
    :class:`ValueError` for NaN, an infinity or a lone surrogate (UnicodeEncodeError),
    :class:`TypeError` for a value JSON cannot hold; a finite float is written (the
    platform refuses it: :func:`canonical_body` refuses it at sealing)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


#: Keys sorted (orjson compares their UTF-8 bytes: the code-point order of the
#: definition); subclasses of str, int, dict and list, dataclasses and datetimes are not
#: written by orjson's own rules but refused, so :func:`canonical_reference` decides.
_ORJSON_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS
                   | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME)
#: Every digit as "0", and "." and "E" as "e": a float's text has a "." or an exponent
#: after a digit ("1.5", "1e+16"), so once translated it holds "0e".
_FLOATISH = bytes.maketrans(b"123456789.E", b"000000000ee")


def _fast(obj: JSON) -> bytes | None:
    """orjson's bytes for *obj* when they are certainly its canonical bytes; None when
    :func:`canonical_reference` must decide.

    The float check is on the bytes orjson wrote, not a second walk of *obj*: a finite
    float is written with a "." or an exponent after a digit, NaN and the infinities as
    ``null``; bytes with none of these (inside strings or not) hold no float. Only bytes
    that have one (a "1.2.0" or "0E" in a string, a ``null``) are walked
    (:func:`has_float`). Two ``find`` calls on the translated bytes: ``in`` first tries
    its operand as an integer, which costs more than the search here."""
    try:
        out = orjson.dumps(obj, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: a type, a key, a range, a surrogate, depth
        return None
    marked = out.translate(_FLOATISH)
    if (marked.find(b"0e") >= 0 or marked.find(b"null") >= 0) and has_float(obj):
        return None
    return out


def canonical(obj: Mapping[str, JSON]) -> bytes:
    """The one encoding that is signed and hashed: exactly :func:`canonical_reference`'s
    bytes (and exceptions) for any JSON value, computed with orjson where it can be.

    The one difference: orjson writes an :class:`enum.Enum` member as its value and a
    :class:`uuid.UUID` as its text, which the json module refuses (TypeError); the bytes
    are then the canonical bytes of that JSON value (tests/test_canonical.py)."""
    out = _fast(obj)
    return canonical_reference(obj) if out is None else out


def canonical_float_free(obj: Mapping[str, JSON]) -> bytes:
    """:func:`canonical` of a value known to hold no float, NaN or infinity (the platform's
    parser refused them before): orjson's bytes without the float check."""
    try:
        return orjson.dumps(obj, option=_ORJSON_OPTIONS)
    except TypeError:
        return canonical_reference(obj)


def _odd_number(value: JSON) -> bool:
    """A float, or an integer beyond the signed 64-bit range, anywhere in a parsed value."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is int:
            if not MIN_INT <= item <= MAX_INT:
                return True
        elif kind is float:
            return True
    return False


def parse_canonical(data: bytes) -> dict[str, JSON] | None:
    """The JSON object whose canonical bytes are exactly *data*, holding no float and no
    integer beyond 64 bits (orjson: parsed and encoded again, in C); None for any other
    bytes, whose faults a slower parser names (central/record.py). A duplicate key, an
    escape not in the table, whitespace or another order make the bytes encoded again
    differ from *data*."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or _odd_number(obj):
        return None
    try:
        encoded = orjson.dumps(obj, option=_ORJSON_OPTIONS)
    except TypeError:  # nesting past orjson's limit
        return None
    return obj if encoded == data else None


def canonical_body(body: JSON, path: str = "body") -> bytes:
    """The canonical bytes of a record's *body* (or any part of a record), refusing a
    float anywhere with a :class:`TypeError` that names where (:func:`check_no_float`)."""
    out = _fast(body)
    if out is None:
        check_no_float(body, path)
        out = canonical_reference(body)
    return out


def key_id(public_key: Ed25519PublicKey) -> str:
    """base64url of the first 12 bytes of SHA-256 over the raw Ed25519 public key
    (:func:`core.suites.key_id` for every algorithm)."""
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
    """Something a driver observed; not yet a record. Its kind must be in the kind table
    (:class:`core.kinds.UnknownKindError` otherwise)."""

    kind: str
    source: Source
    body: Mapping[str, JSON]
    mono_ns: int
    #: (device serial, device event id) when a device waits for this to be committed.
    device_event: tuple[str, int] | None = None
    #: More (key, value) pairs the store keeps with this record, in its transaction
    #: (e.g. a tag's rolling counter: replay protection that survives restarts).
    ledger: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        priority_of(self.kind)  # an unknown kind fails where it is made, not at sealing

    @property
    def priority(self) -> Priority:
        return priority_of(self.kind)


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
