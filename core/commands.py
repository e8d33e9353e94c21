"""The platform's commands to one gateway (docs/commands.md). Shared and sans-IO: the
platform signs them (``central/commands.py``), the gateway checks them (``app/commands.py``);
neither reads a clock or a file here.

A command is the canonical bytes (:func:`core.record.canonical`) of one JSON object::

    {"alg": …, "body": {…}, "cseq": n, "gw": "gw-…", "issued_at_ms": ms, "kid": …,
     "kind": "pair-tag", "not_after_ms": ms, "sig": b64u, "v": 1}

``sig`` is the signature by the command key ``kid`` (certified by the platform's command
root for the gateway's region: :mod:`core.command_keys`) over the canonical bytes of the
object without ``sig``. ``cseq`` numbers the commands of one gateway 1, 2, 3…: the
gateway applies them in that order, each exactly once.

:func:`check_command` decides, in the order of :data:`REASONS`, whether the gateway may
apply a command: the first check that fails names the refusal. A refusal after the
signature, the gateway and the sequence checked out **uses up** the command's cseq
(:data:`CONSUMING`: the platform sent it, the gateway answered it); the others do not
(anyone's garbage must not move the sequence).

Each kind is an entry of :data:`KINDS`: a body validator returning a typed body, or
raising :class:`BodyError` naming the field and why. A new kind is a validator here, an
entry in the table, and an effect on the gateway (``app/commands.py``).

A device's pairing key travels **encrypted to one gateway** (:class:`SealedKey`): to the
gateway's own encryption key (:class:`BoxKey`, made at ``provision init`` and announced in
a signed ``key.encryption`` record and in ``enc.pub``, signed by the identity key:
:func:`make_box_document`). Suite ``ed25519``: X25519, HKDF-SHA256, AES-256-GCM with the
gateway, the device's class and id as associated data; suite ``sm``: SM2 public-key
encryption (GB/T 32918.4, C1C3C2) of the SM3 digest of that associated data (16 bytes)
followed by the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from core.command_keys import ANY_REGION, CommandKeyring
from core.command_keys import Refusal as KeyRefusal
from core.devices import (
    KIOSK_SERIAL_MAX,
    MAX_ABSENT_AFTER_S,
    MIN_ABSENT_AFTER_S,
    TAG_REF_RE,
)
from core.diag_transfer import DiagBodyError, RequestDiag, validate_request_diag
from core.record import JSON, MAX_INT, b64u, canonical, has_float, unb64u
from core.suites import SIGNATURE_ALGS, Signer, Verifier, key_id
from core.supervision import BODY_PARSERS as SUPERVISION_PARSERS
from core.supervision import Refusal as SupervisionRefusal

__all__ = ["BOX_ALGS", "BOX_FORMAT", "BOX_SM2", "BOX_X25519", "CONSUMING", "FIELDS",
           "FORMAT_VERSION", "KINDS", "MAX_COMMAND_BYTES", "MAX_LIFETIME_MS", "MAX_SKEW_MS",
           "REASONS", "SETTINGS", "BodyError", "BoxKey", "BoxPublic", "Command", "Duplicate",
           "KindSpec", "PairKiosk", "PairTag", "Refusal", "SealedKey", "SetConfig", "Setting",
           "UnpairKiosk", "UnpairTag", "box_alg_of_suite", "check_command", "command_digest",
           "device_key_aad", "digest_value", "make_box_document", "parse_box_document",
           "register_kind", "reopen", "sign_command", "validate_body"]

FORMAT_VERSION = 1
#: The largest command read: refused (``too_large``) before it is parsed.
MAX_COMMAND_BYTES = 64 * 1024
#: A command is valid for at most this long after it was issued, ms (7 days): the bound
#: on how late a command can still act when the gateway has no trusted time.
MAX_LIFETIME_MS = 7 * 86_400_000
#: A command issued up to this far ahead of the gateway's trusted time is taken (the
#: platform's clock and the gateway's disagree a little), ms.
MAX_SKEW_MS = 5 * 60_000
#: The fields of a command, each required, no other.
FIELDS: dict[str, type] = {"alg": str, "body": dict, "cseq": int, "gw": str,
                           "issued_at_ms": int, "kid": str, "kind": str,
                           "not_after_ms": int, "sig": str, "v": int}
GATEWAY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
KIND_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
#: A key id: base64url (core.suites.key_id), bounded.
KID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: Every refusal, in the order the checks run (docs/commands.md, "The checks"); the last
#: two are the gateway's when it applies a command that passed them all.
REASONS = (
    "too_large",  # over MAX_COMMAND_BYTES: not parsed
    "malformed",  # not a JSON object, a field missing, unknown or of the wrong type
    "non_canonical",  # not the canonical bytes of what it holds (edited or re-encoded)
    "unsigned",  # no ``sig``
    "unknown_key",  # kid: no certificate held (core.command_keys)
    "revoked",  # kid: revoked by the root's list
    "wrong_region",  # kid: certified for another region
    "expired_key",  # kid: its certificate expired
    "key_not_yet_valid",  # kid: its certificate starts later
    "bad_signature",  # the signature does not verify (or alg is not the key's)
    "wrong_gateway",  # signed, but for another gateway
    "replayed",  # cseq at or below the last one answered, other bytes
    "out_of_order",  # cseq beyond the next one: one was lost, send it first
    "expired",  # not_after_ms passed
    "not_yet_valid",  # issued_at_ms ahead of trusted time by more than MAX_SKEW_MS
    "unknown_kind",  # a kind this gateway does not know
    "bad_body",  # the kind's body: a field missing, unknown, of the wrong type or range
    "conflict",  # the gateway's state forbids it (a tag paired with another key, no replace)
    "failed",  # the effect could not be applied (an I/O error): nothing changed
)
#: Refusals that use up the command's cseq: the platform's signature and the sequence
#: checked out, so this command is answered (the next one is cseq + 1).
CONSUMING = frozenset({"expired", "not_yet_valid", "unknown_kind", "bad_body", "conflict",
                       "failed"})


def command_digest(data: bytes) -> str:
    """A command's name in records and in the platform's table: SHA-256 of its bytes, hex
    (never its body: a ``pair-tag`` carries a key, even if encrypted)."""
    return hashlib.sha256(data).hexdigest()


def digest_value(sha256_hex: str) -> int:
    """A command's digest as an integer of the store's ledger (the first 8 bytes, signed)."""
    return int.from_bytes(bytes.fromhex(sha256_hex)[:8], "big", signed=True)


# --- outcomes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """A command every check passed: ``body`` is its kind's typed body."""

    data: bytes = field(repr=False)
    gw: str
    cseq: int
    issued_at_ms: int
    not_after_ms: int
    kind: str
    body: Any = field(repr=False)
    kid: str
    alg: str
    sha256: str

    @property
    def secret(self) -> bool:
        """Whether the body carries a key (even encrypted): never in a record, nor a log."""
        return KINDS[self.kind].secret


@dataclass(frozen=True)
class Refusal:
    """Why a command is not applied; what could be read of it (None where it could not).
    ``detail`` says it for a person and never holds key material."""

    reason: str
    detail: str
    sha256: str
    cseq: int | None = None
    kind: str | None = None
    kid: str | None = None
    #: the body's field at fault (``bad_body``), e.g. ``key.ct``
    field: str | None = None
    #: the cseq the gateway expects next (``replayed``, ``out_of_order``)
    expected_cseq: int | None = None

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown refusal reason {self.reason!r}")

    @property
    def consumes(self) -> bool:
        """Whether this refusal uses up the command's cseq (:data:`CONSUMING`)."""
        return self.reason in CONSUMING and self.cseq is not None

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Duplicate:
    """The command answered at *cseq* again, byte for byte (the broker delivered it once
    more: its acknowledgement was lost): acknowledge it, record nothing."""

    cseq: int
    sha256: str


# --- the bodies ----------------------------------------------------------------------------

class BodyError(ValueError):
    """A body refused: *field* (dotted, e.g. ``key.ct``) and why."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


@dataclass(frozen=True)
class SealedKey:
    """A device's 16-byte pairing key encrypted to one gateway's :class:`BoxKey`."""

    alg: str
    kid: str  # the gateway's encryption key
    ct: bytes = field(repr=False)
    epk: bytes | None = field(default=None, repr=False)  # X25519's ephemeral public key

    def to_json(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {"alg": self.alg, "ct": b64u(self.ct), "kid": self.kid}
        if self.epk is not None:
            out["epk"] = b64u(self.epk)
        return out


@dataclass(frozen=True)
class PairTag:
    tag: str
    key: SealedKey
    #: None: the default for a new pairing, the one held for a replacement
    absent_after_s: int | None
    replace: bool
    #: the key in clear, when the checker held the gateway's box key
    plain: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class UnpairTag:
    tag: str


@dataclass(frozen=True)
class PairKiosk:
    serial: str
    key: SealedKey
    replace: bool
    plain: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class UnpairKiosk:
    serial: str


@dataclass(frozen=True)
class Setting:
    """A setting the platform may change (``set-config``): its range, and whether it is a
    tag's (the body names the tag) or the gateway's."""

    low: int
    high: int
    per_tag: bool
    unit: str = "s"


#: What ``set-config`` may set, and in which range.
SETTINGS: dict[str, Setting] = {
    # the gateway.health interval (app/assembly.py; 5 minutes by default)
    "health_interval_s": Setting(60, 86_400, per_tag=False),
    # a paired tag's absence time (core/devices.py: the registry's bounds)
    "absent_after_s": Setting(MIN_ABSENT_AFTER_S, MAX_ABSENT_AFTER_S, per_tag=True),
}


@dataclass(frozen=True)
class SetConfig:
    key: str
    value: int
    tag: str | None


class BodyContext(Protocol):
    """What a body validator may know: the gateway's id and, on the gateway, its box key."""

    @property
    def gateway_id(self) -> str: ...

    @property
    def box(self) -> BoxKey | None: ...


@dataclass(frozen=True)
class _Context:
    gateway_id: str
    box: BoxKey | None


Validator = Callable[[Mapping[str, Any], BodyContext], Any]


@dataclass(frozen=True)
class KindSpec:
    """A kind of command: its body validator, and whether its body holds a key."""

    kind: str
    validate: Validator
    secret: bool = False


def _only(body: Mapping[str, Any], required: tuple[str, ...],
          optional: tuple[str, ...] = ()) -> None:
    for name in required:
        if name not in body:
            raise BodyError(name, "is required")
    for name in body:
        if name not in required and name not in optional:
            raise BodyError(name, "is not a field of this kind")


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body[name]
    if not isinstance(value, str):
        raise BodyError(name, "must be text")
    return value


def _whole(body: Mapping[str, Any], name: str, low: int, high: int, unit: str = "") -> int:
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise BodyError(name, "must be an integer")
    if not low <= value <= high:
        raise BodyError(name, f"must be {low}-{high}{' ' + unit if unit else ''}, got {value}")
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BodyError(name, "must be true or false")
    return value


def _tag(body: Mapping[str, Any]) -> str:
    tag = _text(body, "tag")
    if not TAG_REF_RE.fullmatch(tag):
        raise BodyError("tag", "must be T and 8 upper-case hex digits (T0000ABCD)")
    return tag


def _serial(body: Mapping[str, Any]) -> str:
    serial = _text(body, "serial")
    if not 1 <= len(serial) <= KIOSK_SERIAL_MAX or not all(" " <= c <= "~" for c in serial) \
            or serial != serial.strip():
        raise BodyError("serial", f"must be 1-{KIOSK_SERIAL_MAX} printable ASCII characters, "
                                  "no space around them (as the kiosk's HELLO says it)")
    return serial


def _b64(value: object, name: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise BodyError(name, "must be base64url text")
    try:
        raw = unb64u(value)
    except ValueError:
        raise BodyError(name, "is not unpadded base64url") from None
    if size is not None and len(raw) != size:
        raise BodyError(name, f"must be {size} bytes, has {len(raw)}")
    return raw


def _sealed(body: Mapping[str, Any], ctx: BodyContext, device: str,
            ident: str) -> tuple[SealedKey, bytes | None]:
    value = body["key"]
    if not isinstance(value, dict):
        raise BodyError("key", "must be an object (alg, kid, ct[, epk]): the device key "
                               "encrypted to this gateway, never the key in clear")
    alg = value.get("alg")
    if alg not in BOX_ALGS:
        raise BodyError("key.alg", f"must be one of {', '.join(BOX_ALGS)}")
    fields = {"alg", "kid", "ct", "epk"} if alg == BOX_X25519 else {"alg", "kid", "ct"}
    for name in sorted(fields):
        if name not in value:
            raise BodyError(f"key.{name}", "is required")
    for name in value:
        if name not in fields:
            raise BodyError(f"key.{name}", f"is not a field of an {alg} key")
    kid = value["kid"]
    if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
        raise BodyError("key.kid", "must be the gateway's encryption key id")
    ct = _b64(value["ct"], "key.ct", _CT_BYTES[alg])
    epk = _b64(value["epk"], "key.epk", 32) if alg == BOX_X25519 else None
    sealed = SealedKey(alg, kid, ct, epk)
    box = ctx.box
    if box is None:
        return sealed, None
    if kid != box.kid or alg != box.alg:
        raise BodyError("key.kid", f"is encrypted to key {kid} ({alg}), not to this gateway's "
                                   f"{box.kid} ({box.alg}): encrypt it to the key of the "
                                   "gateway's latest key.encryption record")
    try:
        plain = box.open(sealed, device_key_aad(ctx.gateway_id, device, ident))
    except ValueError:
        raise BodyError("key.ct", f"does not decrypt with this gateway's key for this "
                                  f"{device} (made for another gateway or {device}, or "
                                  "altered)") from None
    return sealed, plain


def _pair_tag(body: Mapping[str, Any], ctx: BodyContext) -> PairTag:
    _only(body, ("tag", "key"), ("absent_after_s", "replace"))
    tag = _tag(body)
    absent = None
    if "absent_after_s" in body:
        absent = _whole(body, "absent_after_s", MIN_ABSENT_AFTER_S, MAX_ABSENT_AFTER_S, "s")
    sealed, plain = _sealed(body, ctx, "tag", tag)
    return PairTag(tag, sealed, absent, _flag(body, "replace"), plain)


def _unpair_tag(body: Mapping[str, Any], _ctx: BodyContext) -> UnpairTag:
    _only(body, ("tag",))
    return UnpairTag(_tag(body))


def _pair_kiosk(body: Mapping[str, Any], ctx: BodyContext) -> PairKiosk:
    _only(body, ("serial", "key"), ("replace",))
    serial = _serial(body)
    sealed, plain = _sealed(body, ctx, "kiosk", serial)
    return PairKiosk(serial, sealed, _flag(body, "replace"), plain)


def _unpair_kiosk(body: Mapping[str, Any], _ctx: BodyContext) -> UnpairKiosk:
    _only(body, ("serial",))
    return UnpairKiosk(_serial(body))


def _set_config(body: Mapping[str, Any], _ctx: BodyContext) -> SetConfig:
    _only(body, ("key", "value"), ("tag",))
    key = _text(body, "key")
    setting = SETTINGS.get(key)
    if setting is None:
        raise BodyError("key", f"{key[:40]!r} is not a setting the platform may change "
                               f"(those are: {', '.join(sorted(SETTINGS))})")
    value = _whole(body, "value", setting.low, setting.high, setting.unit)
    tag = None
    if setting.per_tag:
        if "tag" not in body:
            raise BodyError("tag", f"is required: {key} is a tag's setting")
        tag = _tag(body)
    elif "tag" in body:
        raise BodyError("tag", f"{key} is the gateway's setting, not a tag's")
    return SetConfig(key, value, tag)


def _supervision(kind: str) -> Validator:
    """The validator of a supervision kind: its body parsed by core/supervision.py
    (docs/supervision.md), a refusal there a :class:`BodyError` naming the field and, first
    in its text, the supervision reason (``end: period_too_long: …``)."""
    parse = SUPERVISION_PARSERS[kind]

    def validate(body: Mapping[str, Any], _ctx: BodyContext) -> Any:
        got = parse(body)
        if isinstance(got, SupervisionRefusal):
            raise BodyError(got.field or kind, f"{got.reason}: {got.detail}")
        return got

    return validate


def _request_diag(body: Mapping[str, Any], _ctx: BodyContext) -> RequestDiag:
    """core/diag_transfer.py's validator (``include_personal`` is always refused)."""
    try:
        return validate_request_diag(body)
    except DiagBodyError as exc:
        raise BodyError(exc.field, exc.why) from None


#: The kinds this gateway knows, by name (docs/commands.md, "The kinds"); the supervision
#: kinds' bodies are core/supervision.py's (docs/supervision.md); ``request-diag``'s
#: core/diag_transfer.py's.
KINDS: dict[str, KindSpec] = {
    "pair-tag": KindSpec("pair-tag", _pair_tag, secret=True),
    "unpair-tag": KindSpec("unpair-tag", _unpair_tag),
    "pair-kiosk": KindSpec("pair-kiosk", _pair_kiosk, secret=True),
    "unpair-kiosk": KindSpec("unpair-kiosk", _unpair_kiosk),
    "set-config": KindSpec("set-config", _set_config),
    **{kind: KindSpec(kind, _supervision(kind)) for kind in SUPERVISION_PARSERS},
    "request-diag": KindSpec("request-diag", _request_diag),
}


def validate_body(kind: str, body: Mapping[str, Any], *, gateway_id: str,
                  box: BoxKey | None = None) -> Any:
    """The typed body of a command of *kind* (the platform checks what it is about to
    sign); BodyError naming the field, KeyError for an unknown kind."""
    return KINDS[kind].validate(body, _Context(gateway_id, box))


def register_kind(kind: str, validate: Validator, *, secret: bool = False) -> KindSpec:
    """Add a kind (its validator raises :class:`BodyError`); refused if the name is taken
    or not a kind name."""
    if not KIND_RE.fullmatch(kind) or kind in KINDS:
        raise ValueError(f"kind {kind!r} is not a new kind name")
    spec = KINDS[kind] = KindSpec(kind, validate, secret)
    return spec


# --- checking a command ------------------------------------------------------------------

class _DuplicateKeyError(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKeyError("an object names a member twice")
    return obj


def check_command(  # noqa: PLR0911 - one return per reason, in their order
        data: bytes, *, gateway_id: str, keyring: CommandKeyring | None,
        region: str | None, now_ms: int | None, last_cseq: int, floor_ms: int = 0,
        applied: Callable[[int], int | None] | None = None,
        box: BoxKey | None = None) -> Command | Refusal | Duplicate:
    """Whether this gateway may apply the command *data*: the :class:`Command`, or the
    first :class:`Refusal` in the order of :data:`REASONS`, or a :class:`Duplicate`.

    *now_ms* is the gateway's **trusted** time (NTP or GNSS), None when it has none: then
    *floor_ms* (a time known to have passed) stands in, a command whose ``not_after_ms``
    is at or below it is expired, and its key is judged at ``max(floor_ms,
    issued_at_ms)``. *last_cseq* is the last cseq answered (0: none); *applied(cseq)* the
    :func:`digest_value` of the command answered at that cseq, when still known. With
    *box* (the gateway's encryption key) device keys are decrypted and checked. *region*
    None: only province-wide command keys. *keyring* None: no command keys installed,
    every signed command is ``unknown_key``. Never raises on any input."""
    sha = command_digest(data)
    seen: dict[str, Any] = {}

    def refuse(reason: str, detail: str, **extra: Any) -> Refusal:
        return Refusal(reason, detail, sha, seen.get("cseq"), seen.get("kind"),
                       seen.get("kid"), **extra)

    if len(data) > MAX_COMMAND_BYTES:
        return refuse("too_large", f"{len(data)} bytes, at most {MAX_COMMAND_BYTES}")
    try:
        obj = json.loads(data, object_pairs_hook=_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return refuse("malformed", "not a JSON text in UTF-8 (or an object names a member "
                                   "twice)")
    if not isinstance(obj, dict):
        return refuse("malformed", "not a JSON object")
    # what the record of a refusal can say of it (unauthenticated: bounded, printable)
    cseq_seen = obj.get("cseq")
    if isinstance(cseq_seen, int) and not isinstance(cseq_seen, bool) \
            and 0 < cseq_seen <= MAX_INT:
        seen["cseq"] = cseq_seen
    for name in ("kind", "kid"):
        value = obj.get(name)
        if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
            seen[name] = value
    if has_float(obj):
        return refuse("malformed", "a number with a fraction or exponent: commands carry "
                                   "integers only")
    try:
        if canonical(obj) != data:
            return refuse("non_canonical", "not the canonical bytes of what it holds (sorted "
                                           "keys, no whitespace, UTF-8): edited or re-encoded")
    except (TypeError, ValueError):
        return refuse("malformed", "not encodable as canonical JSON")
    if not obj.get("sig"):
        return refuse("unsigned", "no signature (sig)")
    problem = _fields(obj)
    if problem is not None:
        return refuse("malformed", problem)
    cseq, kind, kid, alg = obj["cseq"], obj["kind"], obj["kid"], obj["alg"]
    issued, not_after = obj["issued_at_ms"], obj["not_after_ms"]
    sig = unb64u(obj["sig"])
    at = now_ms if now_ms is not None else max(floor_ms, issued)
    if keyring is None:
        return refuse("unknown_key", "no command keys are installed on this gateway (they "
                                     "come with enrolment)")
    found = keyring.key_for(kid, region or ANY_REGION, at)
    if isinstance(found, KeyRefusal):
        reason = {"expired": "expired_key", "not_yet_valid": "key_not_yet_valid"}.get(
            found.reason, found.reason)
        return refuse(reason, found.detail)
    if found.cert.alg != alg:
        return refuse("bad_signature", f"the command says {alg}, key {kid} is {found.cert.alg}")
    unsigned = canonical({k: v for k, v in obj.items() if k != "sig"})
    if not found.verifier.verify(sig, unsigned):
        return refuse("bad_signature", f"the signature does not verify with command key {kid}")
    if obj["gw"] != gateway_id:
        return refuse("wrong_gateway", f"the command is for {obj['gw']}, this is {gateway_id}")
    if cseq <= last_cseq:
        known = applied(cseq) if applied is not None else None
        if known is not None and known == digest_value(sha):
            return Duplicate(cseq, sha)
        return refuse("replayed", f"cseq {cseq} was answered already (the last one answered "
                                  f"is {last_cseq}), with other bytes",
                      expected_cseq=last_cseq + 1)
    if cseq > last_cseq + 1:
        return refuse("out_of_order", f"cseq {cseq}, but {last_cseq + 1} is next: send the "
                                      "missing command(s) first", expected_cseq=last_cseq + 1)
    if now_ms is not None:
        if now_ms >= not_after:
            return refuse("expired", f"valid until {not_after}, trusted time is {now_ms}")
        if issued > now_ms + MAX_SKEW_MS:
            return refuse("not_yet_valid", f"issued at {issued}, trusted time is only {now_ms}")
    elif not_after <= floor_ms:
        return refuse("expired", f"valid until {not_after}, and time is known to be past "
                                 f"{floor_ms} (no trusted time now)")
    spec = KINDS.get(kind)
    if spec is None:
        return refuse("unknown_kind", f"kind {kind!r} is not known here (known: "
                                      f"{', '.join(sorted(KINDS))})")
    try:
        body = spec.validate(obj["body"], _Context(gateway_id, box))
    except BodyError as exc:
        return refuse("bad_body", f"{kind}: {exc}", field=exc.field)
    return Command(data, obj["gw"], cseq, issued, not_after, kind, body, kid, alg, sha)


def reopen(data: bytes, *, gateway_id: str, box: BoxKey | None) -> Command:
    """A command :func:`check_command` accepted before (the gateway's pending file), read
    again to complete it after a crash: its form and body are checked, not its key, its
    time nor its sequence (they were, when the decision to apply it was written down).
    ValueError when it is not such a command."""
    try:
        obj = json.loads(data, object_pairs_hook=_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("not a command") from None
    if not isinstance(obj, dict) or has_float(obj) or canonical(obj) != data:
        raise ValueError("not a command's canonical bytes")
    problem = _fields(obj)
    if problem is not None:
        raise ValueError(problem)
    if obj["gw"] != gateway_id or obj["kind"] not in KINDS:
        raise ValueError(f"not a command of a known kind for {gateway_id}")
    try:
        body = KINDS[obj["kind"]].validate(obj["body"], _Context(gateway_id, box))
    except BodyError as exc:
        raise ValueError(f"its body: {exc}") from None
    return Command(data, obj["gw"], obj["cseq"], obj["issued_at_ms"], obj["not_after_ms"],
                   obj["kind"], body, obj["kid"], obj["alg"], command_digest(data))


def _fields(obj: Mapping[str, Any]) -> str | None:  # noqa: PLR0911 - one per problem
    """What is wrong with the command's fields (their set, types and ranges), or None."""
    missing = sorted(set(FIELDS) - set(obj))
    if missing:
        return f"field {missing[0]!r} is missing"
    extra = sorted(set(obj) - set(FIELDS))
    if extra:
        return f"{extra[0][:40]!r} is not a field of a command"
    for name, kind in FIELDS.items():
        value = obj[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name!r} must be {'an integer' if kind is int else kind.__name__}"
    if obj["v"] != FORMAT_VERSION:
        return f"format version {obj['v']} is not {FORMAT_VERSION}"
    if not GATEWAY_ID_RE.fullmatch(obj["gw"]):
        return "'gw' is not a gateway id (3-63 of a-z, 0-9, '-')"
    if not 1 <= obj["cseq"] <= MAX_INT:
        return "'cseq' must be 1 or more"
    issued, not_after = obj["issued_at_ms"], obj["not_after_ms"]
    if not 0 <= issued <= MAX_INT or not 0 <= not_after <= MAX_INT:
        return "times must be milliseconds since 1970"
    if not 0 < not_after - issued <= MAX_LIFETIME_MS:
        return (f"not_after_ms must follow issued_at_ms by 1 ms to {MAX_LIFETIME_MS} ms "
                "(7 days)")
    if not KIND_RE.fullmatch(obj["kind"]):
        return "'kind' is not a kind name"
    if obj["alg"] not in SIGNATURE_ALGS:
        return f"'alg' must be one of {', '.join(SIGNATURE_ALGS)}"
    if not KID_RE.fullmatch(obj["kid"]):
        return "'kid' is not a key id (base64url, at most 64 characters)"
    try:
        unb64u(obj["sig"])
    except ValueError:
        return "'sig' is not unpadded base64url"
    return None


def sign_command(signer: Signer, *, gw: str, cseq: int, issued_at_ms: int,
                 not_after_ms: int, kind: str, body: Mapping[str, JSON]) -> bytes:
    """The canonical bytes of a command signed by *signer* (a command key)."""
    obj: dict[str, JSON] = {
        "alg": signer.alg, "body": dict(body), "cseq": cseq, "gw": gw,
        "issued_at_ms": issued_at_ms, "kid": key_id(signer.alg, signer.public_raw),
        "kind": kind, "not_after_ms": not_after_ms, "v": FORMAT_VERSION}
    obj["sig"] = b64u(signer.sign(canonical(obj)))
    return canonical(obj)


# --- the gateway's encryption key ------------------------------------------------------------

BOX_X25519 = "x25519-hkdf-sha256-aes256gcm"
BOX_SM2 = "sm2-sm3"
BOX_ALGS = (BOX_X25519, BOX_SM2)
#: The ciphertext of a 16-byte device key: AES-GCM (16 + 16 tag); SM2 C1C3C2 of 32 bytes
#: (64 + 32 + 32).
_CT_BYTES = {BOX_X25519: 32, BOX_SM2: 128}
_HKDF_INFO = b"smartcorr device key/1"
_AAD_PREFIX = b"smartcorr-device-key/1\x00"
DEVICE_KEY_BYTES = 16
BOX_FORMAT = "smartcorr-gateway-box/1"
_BOX_FIELDS = {"alg": str, "created_ms": int, "format": str, "gw": str, "key": str,
               "kid": str, "sig": str, "signer_alg": str, "signer_kid": str}


def box_alg_of_suite(suite_name: str) -> str:
    """The encryption of a gateway of suite *suite_name* (``ed25519`` or ``sm``)."""
    return BOX_SM2 if suite_name == "sm" else BOX_X25519


def device_key_aad(gateway_id: str, device: str, ident: str) -> bytes:
    """What a sealed device key is bound to: the gateway, the device's class (``tag``,
    ``kiosk``) and its id; the key decrypts for that one only."""
    return _AAD_PREFIX + f"{gateway_id}\x00{device}\x00{ident}".encode()


def _box_kid(alg: str, public_raw: bytes) -> str:
    h = hashes.Hash(hashes.SM3() if alg == BOX_SM2 else hashes.SHA256())
    h.update(public_raw)
    return b64u(h.finalize()[:12])


def _sm3(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


def _x25519_keys(shared: bytes, epk: bytes, public_raw: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=epk + public_raw,
               info=_HKDF_INFO).derive(shared)
    return okm[:32], okm[32:]


def _sm2_module() -> Any:
    import gmssl_fast

    return gmssl_fast


@dataclass(frozen=True)
class BoxPublic:
    """A gateway's encryption public key: what the platform seals device keys to."""

    alg: str
    public_raw: bytes

    def __post_init__(self) -> None:
        if self.alg not in BOX_ALGS:
            raise ValueError(f"unknown encryption {self.alg!r}")
        size = 32 if self.alg == BOX_X25519 else 65
        if len(self.public_raw) != size or (self.alg == BOX_SM2 and self.public_raw[0] != 4):
            raise ValueError(f"not an {self.alg} public key")

    @property
    def kid(self) -> str:
        return _box_kid(self.alg, self.public_raw)

    def seal(self, key: bytes, aad: bytes, *, ephemeral: bytes | None = None) -> SealedKey:
        """*key* (16 bytes) encrypted to this key, bound to *aad* (:func:`device_key_aad`).
        *ephemeral* (an X25519 private key, 32 bytes) only for test vectors."""
        if len(key) != DEVICE_KEY_BYTES:
            raise ValueError(f"a device key is {DEVICE_KEY_BYTES} bytes")
        if self.alg == BOX_X25519:
            eph = X25519PrivateKey.from_private_bytes(ephemeral) if ephemeral is not None \
                else X25519PrivateKey.generate()
            epk = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            shared = eph.exchange(X25519PublicKey.from_public_bytes(self.public_raw))
            aes_key, nonce = _x25519_keys(shared, epk, self.public_raw)
            return SealedKey(self.alg, self.kid, AESGCM(aes_key).encrypt(nonce, key, aad), epk)
        gm = _sm2_module()
        ct = bytes(gm.SM2(public_key=self.public_raw.hex()).encrypt(_sm3(aad)[:16] + key))
        return SealedKey(self.alg, self.kid, ct)

    def to_json(self) -> dict[str, JSON]:
        return {"alg": self.alg, "key": b64u(self.public_raw), "kid": self.kid}


class BoxKey:
    """A gateway's encryption private key (held encrypted under its storage key)."""

    def __init__(self, alg: str, private: bytes, public_raw: bytes | None = None) -> None:
        self.alg = alg
        self._private = private
        if alg == BOX_X25519:
            self._x = X25519PrivateKey.from_private_bytes(private)
            raw = self._x.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        elif alg == BOX_SM2:
            if public_raw is None:
                raise ValueError("an SM2 private key needs its public key beside it")
            raw = public_raw
            self._sm2 = _sm2_module().SM2(private_key=private.hex(), public_key=raw.hex())
        else:
            raise ValueError(f"unknown encryption {alg!r}")
        self.public = BoxPublic(alg, raw)

    @classmethod
    def generate(cls, alg: str) -> BoxKey:
        if alg == BOX_X25519:
            return cls(alg, X25519PrivateKey.generate().private_bytes(
                Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        if alg == BOX_SM2:
            pair = _sm2_module().SM2.generate()
            public = bytes.fromhex(pair.public_key_hex)
            if len(public) == 64:
                public = b"\x04" + public
            return cls(alg, bytes.fromhex(pair.private_key_hex), public)
        raise ValueError(f"unknown encryption {alg!r}")

    @property
    def kid(self) -> str:
        return self.public.kid

    def private_bytes(self) -> bytes:
        return self._private

    def open(self, sealed: SealedKey, aad: bytes) -> bytes:
        """The device key of *sealed*; ValueError when it does not decrypt for *aad*."""
        if sealed.alg != self.alg or sealed.kid != self.kid:
            raise ValueError("sealed to another key")
        if self.alg == BOX_X25519:
            if sealed.epk is None or len(sealed.epk) != 32:
                raise ValueError("no ephemeral key")
            try:
                shared = self._x.exchange(X25519PublicKey.from_public_bytes(sealed.epk))
                aes_key, nonce = _x25519_keys(shared, sealed.epk, self.public.public_raw)
                key = AESGCM(aes_key).decrypt(nonce, sealed.ct, aad)
            except InvalidTag:
                raise ValueError("does not decrypt") from None
        else:
            try:
                plain = bytes(self._sm2.decrypt(sealed.ct))
            except Exception as exc:  # gmssl_fast's own errors
                raise ValueError("does not decrypt") from exc
            if len(plain) != 16 + DEVICE_KEY_BYTES or plain[:16] != _sm3(aad)[:16]:
                raise ValueError("does not decrypt for this device")
            key = plain[16:]
        if len(key) != DEVICE_KEY_BYTES:
            raise ValueError("not a device key")
        return key


def make_box_document(identity: Signer, *, gateway_id: str, box: BoxPublic,
                      created_ms: int) -> dict[str, JSON]:
    """``enc.pub`` and the body of a ``key.encryption`` record: the gateway's encryption
    public key, signed by its identity key (so the platform believes it through the
    identity it registered)."""
    obj: dict[str, JSON] = {
        "format": BOX_FORMAT, "gw": gateway_id, **box.to_json(), "created_ms": created_ms,
        "signer_alg": identity.alg, "signer_kid": key_id(identity.alg, identity.public_raw)}
    obj["sig"] = b64u(identity.sign(canonical(obj)))
    return obj


def parse_box_document(obj: object, identities: Mapping[str, Verifier],
                       gateway_id: str) -> BoxPublic:
    """The encryption key a box document (:func:`make_box_document`) names, once its
    signature verifies with one of *identities* (the gateway's identity keys, by kid);
    ValueError otherwise."""
    if not isinstance(obj, dict) or set(obj) != set(_BOX_FIELDS):
        raise ValueError(f"not a {BOX_FORMAT} document (fields {sorted(_BOX_FIELDS)})")
    for name, kind in _BOX_FIELDS.items():
        if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
            raise ValueError(f"{name!r} is of the wrong type")  # noqa: TRY004 - one family
    if obj["format"] != BOX_FORMAT or obj["gw"] != gateway_id:
        raise ValueError(f"not the encryption key of {gateway_id}")
    box = BoxPublic(obj["alg"], unb64u(obj["key"]))
    if box.kid != obj["kid"]:
        raise ValueError("its kid does not match its key")
    verifier = identities.get(obj["signer_kid"])
    if verifier is None or verifier.alg != obj["signer_alg"]:
        raise ValueError(f"signed by {obj['signer_kid']}, not an identity key of {gateway_id}")
    unsigned = canonical({k: v for k, v in obj.items() if k != "sig"})
    if not verifier.verify(unb64u(obj["sig"]), unsigned):
        raise ValueError("its identity signature does not verify")
    return box
