"""The enrolment channel's messages (docs/enrolment.md): a gateway's request, the
platform's answer. Shared and sans-IO: the gateway (``provisioning/enrol.py``) writes
requests and checks answers, the platform (``central/ca.py``, ``central/enrolment.py``)
checks requests and writes answers; the same bytes travel on a USB stick (``request.json``,
``answer.json``) or over MQTT (:func:`core.topics.enrol_request_topic`).

Each message is the canonical bytes (:func:`core.record.canonical`) of one JSON object;
bytes that are not canonical are refused, never re-encoded.

* the **request**, signed by the gateway's identity key (``sig`` over the canonical bytes
  of the object without ``sig``)::

    {"format": "smartcorr-enrol-request/1", "type": "enrol", "request_id": "req-<32 hex>",
     "gateway_id": …, "created_ms": ms, "registration": {signing.pub}, "csr": PEM,
     "claim": "smartcorr-claim-…" | null, "sig": b64u}

  The CSR is signed by the gateway's TLS key, its CN is the gateway id and its extension
  :data:`KID_OID` names the identity key: the TLS key says which identity it belongs to,
  the identity key signs the CSR; the platform knows one box holds both. ``claim`` is the
  one-time claim token of the online path (null on the USB stick: carrying it is the
  authorisation).
* a **renewal** (``type`` ``renew``, docs/enrolment.md) is the same request with ``claim``
  null, the CSR of a *new* TLS key, and two more fields: ``current`` (the serial, hex, of
  the certificate the gateway holds now) and ``tls_sig`` (base64url of the ECDSA
  signature, DER, by that certificate's key over the canonical bytes of the object
  without ``sig`` and ``tls_sig``). ``sig`` (the identity key's) covers ``tls_sig``: the
  box that holds the registered identity key and the current TLS key asks.
* the **answer**: ``status`` ``issued``, signed by the CA's key (ECDSA, DER, over the
  canonical bytes without ``sig``)::

    {"format": "smartcorr-enrol-answer/1", "status": "issued", "request_id": …,
     "gateway_id": …, "certificate": PEM, "chain": [PEM, …], "files": {name: b64u},
     "issued_ms": ms, "sig": b64u}

  or ``status`` ``refused`` with a ``reason`` (:data:`REFUSALS`) and a ``detail`` for a
  person (unsigned: nothing is installed from it).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from core.errors import UserError
from core.record import JSON, MAX_INT, b64u, canonical, unb64u
from core.suites import SIGNATURE_ALGS, Signer, Verifier, key_id

REQUEST_FORMAT = "smartcorr-enrol-request/1"
ANSWER_FORMAT = "smartcorr-enrol-answer/1"
#: The request types: ``enrol`` (a first certificate), ``renew`` (the next one).
ENROL = "enrol"
RENEW = "renew"
REQUEST_TYPES = (ENROL, RENEW)
#: A certificate's serial as a renewal names it: lower-case hex, no leading zeros.
SERIAL_RE = re.compile(r"^[0-9a-f]{1,40}$")
#: The files of the offline path, in the directory carried on the USB stick.
REQUEST_FILE = "request.json"
ANSWER_FILE = "answer.json"
#: The X.509 extension (non-critical, a DER UTF8String) naming the gateway's identity key
#: id in its CSR and certificate: an OID under the UUID arc (ITU-T X.667), no registry.
KID_OID = x509.ObjectIdentifier("2.25.233804987667176709057568113806333693161")
#: The largest request read (a CSR and a registration: about 2 KiB).
MAX_REQUEST_BYTES = 16 * 1024
#: The largest answer read or written: under a broker's 1 MiB message limit (broker.md).
MAX_ANSWER_BYTES = 960 * 1024
#: Command material an answer carries (opaque files, ``command-*.pub|json``).
MAX_FILES = 8
COMMAND_FILE_RE = re.compile(r"^command-[a-z0-9][a-z0-9._-]{0,54}\.(?:pub|json)$")
REQUEST_ID_RE = re.compile(r"^req-[0-9a-f]{32}$")
GATEWAY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
#: A claim token: this prefix and 32 random bytes in base64url (43 characters).
CLAIM_PREFIX = "smartcorr-claim-"
CLAIM_RE = re.compile(rf"^{CLAIM_PREFIX}[A-Za-z0-9_-]{{43}}$")
#: Why a request is refused (an answer's ``reason``, :class:`EnrolmentError`'s).
REFUSALS = ("malformed", "bad_signature", "bad_csr", "claim_missing", "claim_unknown",
            "claim_expired", "claim_used", "claim_other_gateway", "registry", "busy",
            "unsupported",
            # renewal's own: the gateway is unknown, revoked or decommissioned; the
            # current certificate is not the platform's valid one; the current TLS key did
            # not sign; a certificate was issued to this gateway too recently
            "not_enrolled", "revoked", "decommissioned", "certificate", "bad_tls_signature",
            "too_soon")


class EnrolmentError(UserError):
    """A request or an answer that cannot be taken; ``reason`` is a word of
    :data:`REFUSALS` (or of the gateway's own checks), the message says why and what to do."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def new_request_id() -> str:
    return f"req-{secrets.token_hex(16)}"


def new_claim_token() -> str:
    return CLAIM_PREFIX + b64u(secrets.token_bytes(32))


def check_claim_token(text: str) -> str:
    """*text* (spaces around it removed) when it has the form of a claim token."""
    token = text.strip()
    if not CLAIM_RE.fullmatch(token):
        raise EnrolmentError("claim_malformed", "this is not a claim token: it starts with "
                             f"{CLAIM_PREFIX!r} and has 59 characters in all; copy it again "
                             "from 'ingest ca claim'")
    return token


def claim_hash(token: str) -> bytes:
    """What the platform stores of a claim token (SHA-256): the token itself, never."""
    return hashlib.sha256(token.encode("ascii")).digest()


def claim_id(token: str) -> str:
    """A claim token's public name (16 hex digits of its hash): in records and logs."""
    return claim_hash(token).hex()[:16]


# --- the identity key id in the CSR and the certificate --------------------------------------

def kid_extension(kid: str) -> x509.UnrecognizedExtension:
    data = kid.encode("utf-8")
    if len(data) > 127:
        raise ValueError("a key id of at most 127 bytes")
    return x509.UnrecognizedExtension(KID_OID, bytes([0x0C, len(data)]) + data)


def kid_of(extensions: x509.Extensions) -> str | None:
    """The identity key id an extension :data:`KID_OID` names; None without (or malformed)."""
    try:
        ext = extensions.get_extension_for_oid(KID_OID).value
    except x509.ExtensionNotFound:
        return None
    value = getattr(ext, "value", b"")
    if not isinstance(value, bytes) or len(value) < 2 or value[0] != 0x0C \
            or value[1] != len(value) - 2 or value[1] > 127:
        return None
    try:
        return value[2:].decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- parsing helpers -------------------------------------------------------------------------

def _load(data: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise EnrolmentError("malformed", f"the {what} has {len(data)} bytes (at most {limit})")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnrolmentError("malformed", f"the {what} is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise EnrolmentError("malformed", f"the {what} is not a JSON object")
    if canonical(obj) != data:
        raise EnrolmentError("malformed", f"the {what} is not in its canonical form (it was "
                             "edited or re-encoded): use the file as it was written")
    return obj


def _field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EnrolmentError("malformed", f"the {what}'s {name!r} is missing or of the wrong "
                             "type")
    return value


def _unsigned(obj: Mapping[str, Any]) -> bytes:
    return canonical({k: v for k, v in obj.items() if k != "sig"})


def _b64(text: str, what: str) -> bytes:
    try:
        return unb64u(text)
    except ValueError:
        raise EnrolmentError("malformed", f"the {what} is not base64url") from None


# --- the request -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EnrolRequest:
    """A request whose identity signature verified (:func:`parse_request`)."""

    kind: str
    request_id: str
    gateway_id: str
    created_ms: int
    registration: dict[str, JSON]
    csr_pem: str
    claim: str | None
    alg: str
    public_raw: bytes
    kid: str
    #: the request's bytes, as received (their SHA-256 names the request)
    data: bytes
    #: a renewal's: the serial of the certificate held now, and its key's signature
    current: str | None = None
    tls_sig: bytes | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def tls_signed(self) -> bytes:
        """What a renewal's ``tls_sig`` covers: the canonical bytes without the two
        signatures."""
        obj = json.loads(self.data)
        return canonical({k: v for k, v in obj.items() if k not in ("sig", "tls_sig")})

    def tls_signature_valid(self, public_key: object) -> bool:
        """Whether ``tls_sig`` verifies with *public_key* (the current certificate's)."""
        if self.tls_sig is None or not isinstance(public_key, ec.EllipticCurvePublicKey):
            return False
        try:
            public_key.verify(self.tls_sig, self.tls_signed(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


def make_request(identity: Signer, *, request_id: str, gateway_id: str,
                 registration: Mapping[str, JSON], csr_pem: str, claim: str | None,
                 created_ms: int, kind: str = ENROL, current: str | None = None,
                 tls_sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """The canonical bytes of a request signed by *identity* (its key is *registration*'s).
    A renewal (*kind* :data:`RENEW`) names the *current* certificate's serial and is signed
    first by its key (*tls_sign*: ECDSA, DER), then by *identity*."""
    obj: dict[str, JSON] = {
        "format": REQUEST_FORMAT, "type": kind, "request_id": request_id,
        "gateway_id": gateway_id, "created_ms": created_ms,
        "registration": dict(registration), "csr": csr_pem, "claim": claim}
    if kind == RENEW:
        if current is None or tls_sign is None or claim is not None:
            raise ValueError("a renewal names the current serial, is signed by its TLS key, "
                             "and carries no claim")
        obj["current"] = current
        obj["tls_sig"] = b64u(tls_sign(canonical(obj)))
    obj["sig"] = b64u(identity.sign(canonical(obj)))
    return canonical(obj)


def parse_request(data: bytes) -> EnrolRequest:
    """The request in *data*, its identity signature verified with the key its registration
    names; :class:`EnrolmentError` (``malformed``, ``bad_signature``, ``unsupported``)."""
    what = "enrolment request"
    obj = _load(data, what, MAX_REQUEST_BYTES)
    if obj.get("format") != REQUEST_FORMAT:
        raise EnrolmentError("unsupported", f"not an enrolment request of this platform "
                             f"(format {obj.get('format')!r}, expected {REQUEST_FORMAT!r})")
    kind = _field(obj, "type", str, what)
    if kind not in REQUEST_TYPES:
        raise EnrolmentError("unsupported", f"request type {kind!r} is not served here "
                             f"(served: {', '.join(REQUEST_TYPES)})")
    request_id = _field(obj, "request_id", str, what)
    gateway_id = _field(obj, "gateway_id", str, what)
    created = _field(obj, "created_ms", int, what)
    csr = _field(obj, "csr", str, what)
    reg = _field(obj, "registration", dict, what)
    claim = obj.get("claim")
    if claim is not None and not isinstance(claim, str):
        raise EnrolmentError("malformed", "the request's 'claim' is not text")
    if not REQUEST_ID_RE.fullmatch(request_id):
        raise EnrolmentError("malformed", f"request id {request_id[:80]!r} is not req-<32 hex>")
    if not GATEWAY_ID_RE.fullmatch(gateway_id):
        raise EnrolmentError("malformed", f"gateway id {gateway_id[:80]!r} is not valid "
                             "(3-63 of a-z, 0-9, '-')")
    if not 0 <= created <= MAX_INT:
        raise EnrolmentError("malformed", "the request's created_ms is out of range")
    current, tls_sig = _renewal_fields(obj, kind, claim)
    rwhat = "registration"
    alg = _field(reg, "alg", str, rwhat)
    kid = _field(reg, "kid", str, rwhat)
    raw = _b64(_field(reg, "key", str, rwhat), "registration's key")
    if reg.get("gateway_id") != gateway_id:
        raise EnrolmentError("malformed", f"the registration names gateway "
                             f"{str(reg.get('gateway_id'))[:80]!r}, the request {gateway_id!r}")
    if alg not in SIGNATURE_ALGS:
        raise EnrolmentError("unsupported", f"identity key algorithm {alg!r} unknown")
    try:
        verifier = Verifier(alg, raw)
    except ValueError as exc:
        raise EnrolmentError("malformed", f"the registration's key is no {alg} key "
                             f"({exc})") from None
    if key_id(alg, raw) != kid:
        raise EnrolmentError("malformed", "the registration's kid does not match its key")
    sig = _b64(_field(obj, "sig", str, what), "signature")
    if not verifier.verify(sig, _unsigned(obj)):
        raise EnrolmentError("bad_signature", f"the request's signature does not verify with "
                             f"the identity key {kid} it names: it was altered after the "
                             "gateway signed it")
    return EnrolRequest(kind, request_id, gateway_id, created, reg, csr, claim, alg, raw,
                        kid, data, current, tls_sig)


def _renewal_fields(obj: Mapping[str, Any], kind: str,
                    claim: str | None) -> tuple[str | None, bytes | None]:
    """A renewal's ``current`` and ``tls_sig`` (none in an enrolment)."""
    if kind != RENEW:
        if "current" in obj or "tls_sig" in obj:
            raise EnrolmentError("malformed", "an enrolment request carries no 'current' or "
                                 "'tls_sig' (a renewal's)")
        return None, None
    what = "renewal request"
    if claim is not None:
        raise EnrolmentError("malformed", "a renewal carries no claim token: the current "
                             "certificate's key authorises it")
    current = _field(obj, "current", str, what)
    if not SERIAL_RE.fullmatch(current):
        raise EnrolmentError("malformed", f"the renewal's 'current' {current[:50]!r} is not a "
                             "certificate serial (hex)")
    return current, _b64(_field(obj, "tls_sig", str, what), "TLS key's signature")


# --- the answer ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Answer:
    """An answer's fields (:func:`parse_answer`: its shape only; the gateway checks the
    certificate, the chain and the CA's signature)."""

    status: str
    request_id: str
    gateway_id: str | None = None
    certificate_pem: str = ""
    chain: tuple[str, ...] = ()
    files: Mapping[str, bytes] | None = None
    issued_ms: int = 0
    reason: str = ""
    detail: str = ""
    #: the bytes the CA's signature covers, and the signature
    signed: bytes = b""
    sig: bytes = b""


def make_answer(*, request_id: str, gateway_id: str, certificate_pem: str,
                chain: list[str], files: Mapping[str, bytes], issued_ms: int,
                sign: Callable[[bytes], bytes]) -> bytes:
    """An ``issued`` answer signed with *sign* (the CA's key)."""
    for name in files:
        if not COMMAND_FILE_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a command file name (command-*.pub|json)")
    obj: dict[str, JSON] = {
        "format": ANSWER_FORMAT, "status": "issued", "request_id": request_id,
        "gateway_id": gateway_id, "certificate": certificate_pem, "chain": list(chain),
        "files": {name: b64u(data) for name, data in sorted(files.items())},
        "issued_ms": issued_ms}
    obj["sig"] = b64u(sign(canonical(obj)))
    data = canonical(obj)
    if len(data) > MAX_ANSWER_BYTES:
        raise EnrolmentError("malformed", f"the answer would have {len(data)} bytes (at most "
                             f"{MAX_ANSWER_BYTES}): the command files are too big")
    return data


def make_refusal(request_id: str, reason: str, detail: str) -> bytes:
    if reason not in REFUSALS:
        raise ValueError(f"unknown refusal reason {reason!r}")
    return canonical({"format": ANSWER_FORMAT, "status": "refused", "request_id": request_id,
                      "reason": reason, "detail": detail[:1000]})


def parse_answer(data: bytes) -> Answer:
    what = "answer"
    obj = _load(data, what, MAX_ANSWER_BYTES)
    if obj.get("format") != ANSWER_FORMAT:
        raise EnrolmentError("unsupported", f"not an enrolment answer of this platform "
                             f"(format {obj.get('format')!r}, expected {ANSWER_FORMAT!r})")
    status = _field(obj, "status", str, what)
    request_id = _field(obj, "request_id", str, what)
    if status == "refused":
        reason = _field(obj, "reason", str, what)
        return Answer(status, request_id, reason=reason[:80],
                      detail=str(obj.get("detail", ""))[:1000])
    if status != "issued":
        raise EnrolmentError("malformed", f"answer status {status[:40]!r} unknown")
    chain = _field(obj, "chain", list, what)
    files = _field(obj, "files", dict, what)
    if not chain or not all(isinstance(c, str) for c in chain):
        raise EnrolmentError("malformed", "the answer's chain is empty or not PEM text")
    if len(files) > MAX_FILES:
        raise EnrolmentError("malformed", f"the answer carries {len(files)} files (at most "
                             f"{MAX_FILES})")
    decoded: dict[str, bytes] = {}
    for name, text in files.items():
        if not COMMAND_FILE_RE.fullmatch(name) or not isinstance(text, str):
            raise EnrolmentError("malformed", f"the answer carries a file named {name[:80]!r}:"
                                 " only command-*.pub and command-*.json are installed")
        decoded[name] = _b64(text, f"file {name}")
    return Answer(status, request_id, _field(obj, "gateway_id", str, what),
                  _field(obj, "certificate", str, what), tuple(chain), decoded,
                  _field(obj, "issued_ms", int, what), signed=_unsigned(obj),
                  sig=_b64(_field(obj, "sig", str, what), "CA's signature"))
