"""The platform's command keys: an offline root certifies them, a root-signed list revokes
them (docs/command-keys.md). Shared, sans-IO: the platform makes and checks these
documents, the gateway checks them; neither reads a clock here (times come from the
caller, in milliseconds since 1970 UTC).

Three documents, each the canonical bytes of one JSON object (:func:`core.record.canonical`)
whose ``sig`` is over the canonical bytes of the object without ``sig``, by the key that
``root_kid`` names. Bytes that are not canonical are refused, never re-encoded.

* the root's public key, ``command-root.pub``::

    {"alg": …, "format": "smartcorr-command-root/1", "key": b64u(raw public key), "kid": …}

  unsigned: it is the trust anchor, brought to the gateway by enrolment (and its
  fingerprint, :func:`fingerprint`, written down at the root's ceremony);
* a command key's certificate::

    {"alg": …, "format": "smartcorr-command-key/1", "issued_at": ms, "key": b64u(…),
     "kid": …, "not_after": ms, "not_before": ms, "region": "R" | "*",
     "root_alg": …, "root_kid": …, "serial": n, "sig": …}

* the revocation list, cumulative (each names every revoked key not yet expired), with a
  ``number`` that only goes up::

    {"format": "smartcorr-command-revocations/1", "issued_at": ms, "number": n,
     "revoked": [{"kid": …, "not_after": ms, "reason": …, "revoked_at": ms,
                  "serial": n}, …], "root_alg": …, "root_kid": …, "sig": …}

The gateway's :class:`CommandKeyring` holds the root's public key, the certificates
(at most :data:`MAX_CERTIFICATES`) and the newest revocation list, persisted as two
files (:data:`ROOT_FILE`, :data:`KEYS_FILE`; :meth:`CommandKeyring.files`). A command
key never certifies another key, and a revocation is undone only by a list with a
higher number signed by the root: a stolen command key can neither name its successor
nor take itself off the list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from core.record import JSON, MAX_INT, b64u, canonical, unb64u
from core.suites import SIGNATURE_ALGS, Signer, Verifier, digest, key_id

__all__ = ["ANY_REGION", "CERT_FORMAT", "FILES", "KEYS_FILE", "KEYS_FORMAT", "MAX_CERTIFICATES",
           "MAX_DOCUMENT_BYTES", "MAX_REVOKED", "REASONS", "REFUSALS", "REVOCATIONS_FORMAT",
           "ROOT_FILE", "ROOT_FORMAT", "Added",
           "CommandKey", "CommandKeyCert", "CommandKeyError", "CommandKeyring", "CommandRoot",
           "Refusal", "RevocationList", "Revoked", "Skipped", "check_region", "fingerprint",
           "make_certificate", "make_revocations", "parse_certificate", "parse_revocations"]

ROOT_FORMAT = "smartcorr-command-root/1"
CERT_FORMAT = "smartcorr-command-key/1"
REVOCATIONS_FORMAT = "smartcorr-command-revocations/1"
KEYS_FORMAT = "smartcorr-command-keys/1"
#: The files a gateway holds (in its identity directory) and an export carries.
ROOT_FILE = "command-root.pub"
KEYS_FILE = "command-keys.json"
FILES = (ROOT_FILE, KEYS_FILE)
#: A certificate valid everywhere in the province.
ANY_REGION = "*"
REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
#: Why a key is revoked: its private key may be known to others; it was replaced by a
#: successor; it is no longer used.
REASONS = ("compromised", "superseded", "retired")
#: Certificates a keyring holds at most (one per region and a successor each, for a
#: province of a few dozen regions); past it, expired or revoked ones are evicted,
#: oldest first, else the new one is refused.
MAX_CERTIFICATES = 64
#: Entries a revocation list holds at most (the root drops expired keys from it).
MAX_REVOKED = 1024
#: The largest document parsed: a certificate, a revocation list or a keys file.
MAX_DOCUMENT_BYTES = 512 * 1024

#: The reasons of :class:`CommandKeyError` and :class:`Refusal` (docs/command-keys.md).
REFUSALS = ("malformed", "wrong_root", "bad_signature", "expired", "not_yet_valid",
            "wrong_region", "revoked", "unknown_key", "full", "serial_conflict",
            "rollback")

_CERT_FIELDS: dict[str, type] = {
    "alg": str, "format": str, "issued_at": int, "key": str, "kid": str, "not_after": int,
    "not_before": int, "region": str, "root_alg": str, "root_kid": str, "serial": int,
    "sig": str}
_LIST_FIELDS: dict[str, type] = {
    "format": str, "issued_at": int, "number": int, "revoked": list, "root_alg": str,
    "root_kid": str, "sig": str}
_ENTRY_FIELDS: dict[str, type] = {
    "kid": str, "not_after": int, "reason": str, "revoked_at": int, "serial": int}
_ROOT_FIELDS: dict[str, type] = {"alg": str, "format": str, "key": str, "kid": str}


class CommandKeyError(ValueError):
    """A document refused: ``reason`` is one word of :data:`REFUSALS`, the message says
    what is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def fingerprint(alg: str, public_raw: bytes) -> str:
    """The whole hash of the root's public key (SHA-256, or SM3 for SM2), in groups of
    four hex digits: what the ceremony writes down and an installer compares."""
    text = digest(alg, public_raw).hex()
    return " ".join(text[i:i + 4] for i in range(0, len(text), 4))


# --- parsing helpers ---------------------------------------------------------------------

def _load(data: bytes, what: str) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray):
        raise CommandKeyError("malformed", f"{what}: not bytes")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise CommandKeyError("malformed", f"{what}: {len(data)} bytes, more than "
                                           f"{MAX_DOCUMENT_BYTES}")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CommandKeyError("malformed", f"{what}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CommandKeyError("malformed", f"{what}: not a JSON object")
    return obj


def _shape(obj: Mapping[str, Any], fields: Mapping[str, type], what: str) -> None:
    if set(obj) != set(fields):
        missing = sorted(set(fields) - set(obj))
        extra = sorted(set(obj) - set(fields))
        raise CommandKeyError("malformed", f"{what}: fields missing {missing}, unknown "
                                           f"{extra}")
    for name, kind in fields.items():
        value = obj[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CommandKeyError("malformed", f"{what}: {name} is not {kind.__name__}")
        if isinstance(value, int) and not 0 <= value <= MAX_INT:
            raise CommandKeyError("malformed", f"{what}: {name} out of range")


def _canonical_or_refuse(obj: dict[str, Any], data: bytes, what: str) -> bytes:
    """The signed bytes of *obj* (canonical without ``sig``), once *data* is shown to be
    its canonical bytes."""
    try:
        whole = canonical(obj)
        signed = canonical({k: v for k, v in obj.items() if k != "sig"})
    except (ValueError, TypeError) as exc:  # lone surrogates, NaN
        raise CommandKeyError("malformed", f"{what}: {exc}") from None
    if whole != data:
        raise CommandKeyError("malformed", f"{what}: not canonical bytes (sorted keys, no "
                                           "whitespace, UTF-8)")
    return signed


def _b64(value: str, what: str) -> bytes:
    try:
        return unb64u(value)
    except ValueError as exc:
        raise CommandKeyError("malformed", f"{what}: {exc}") from None


def _verifier(alg: str, raw: bytes, what: str) -> Verifier:
    if alg not in SIGNATURE_ALGS:
        raise CommandKeyError("malformed", f"{what}: algorithm {alg!r} unknown (known: "
                                           f"{', '.join(SIGNATURE_ALGS)})")
    try:
        return Verifier(alg, raw)
    except ValueError:  # gmssl's GmsslValueError is one
        raise CommandKeyError("malformed", f"{what}: not a {alg} public key") from None


# --- the root -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CommandRoot:
    """The root's public key: the one trust anchor of commands."""

    alg: str
    public_raw: bytes

    @property
    def kid(self) -> str:
        return key_id(self.alg, self.public_raw)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.alg, self.public_raw)

    def verifier(self) -> Verifier:
        return _verifier(self.alg, self.public_raw, "command root")

    def to_json(self) -> dict[str, JSON]:
        return {"alg": self.alg, "format": ROOT_FORMAT, "key": b64u(self.public_raw),
                "kid": self.kid}

    def to_bytes(self) -> bytes:
        """The ``command-root.pub`` file: indented JSON, for people to read."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def of(cls, signer: Signer) -> CommandRoot:
        return cls(signer.alg, signer.public_raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> CommandRoot:
        obj = _load(data, ROOT_FILE)
        _shape(obj, _ROOT_FIELDS, ROOT_FILE)
        if obj["format"] != ROOT_FORMAT:
            raise CommandKeyError("malformed", f"{ROOT_FILE}: format {obj['format']!r}, "
                                               f"expected {ROOT_FORMAT!r}")
        raw = _b64(obj["key"], f"{ROOT_FILE}: key")
        _verifier(obj["alg"], raw, ROOT_FILE)
        root = cls(obj["alg"], raw)
        if obj["kid"] != root.kid:
            raise CommandKeyError("malformed", f"{ROOT_FILE}: kid {obj['kid']!r} is not its "
                                               f"key's ({root.kid})")
        return root


# --- certificates -------------------------------------------------------------------------

@dataclass(frozen=True)
class CommandKeyCert:
    """A command key certified by the root (shape-checked; :class:`CommandKeyring`
    verifies the signature)."""

    alg: str
    public_raw: bytes
    kid: str
    region: str
    serial: int
    not_before: int
    not_after: int
    issued_at: int
    root_alg: str
    root_kid: str
    sig: bytes
    signed: bytes  # the canonical bytes without sig
    data: bytes  # the whole document

    def verifier(self) -> Verifier:
        return _verifier(self.alg, self.public_raw, f"certificate {self.serial}")

    def covers(self, region: str) -> bool:
        return self.region in (ANY_REGION, region)

    def to_json(self) -> dict[str, JSON]:
        obj: dict[str, JSON] = json.loads(self.data)
        return obj


def check_region(region: str, *, allow_any: bool = True) -> str:
    """*region* when it is a region name (or ``*``); CommandKeyError otherwise."""
    if (allow_any and region == ANY_REGION) or REGION_RE.match(region):
        return region
    raise CommandKeyError("malformed", f"region {region!r}: 1-63 lower-case letters, digits "
                                       f"and '-'{', or * for every region' if allow_any else ''}")


def make_certificate(root: Signer, key_alg: str, key_public: bytes, *, region: str,
                     serial: int, not_before: int, not_after: int,
                     issued_at: int) -> bytes:
    """The canonical bytes of a certificate of the command key (*key_alg*, *key_public*)
    signed by *root*."""
    _verifier(key_alg, key_public, "the certified key")
    check_region(region)
    if not 1 <= serial <= MAX_INT or not 0 <= not_before < not_after <= MAX_INT:
        raise CommandKeyError("malformed", "serial >= 1 and not_before < not_after")
    claims: dict[str, JSON] = {
        "alg": key_alg, "format": CERT_FORMAT, "issued_at": issued_at,
        "key": b64u(key_public), "kid": key_id(key_alg, key_public),
        "not_after": not_after, "not_before": not_before, "region": region,
        "root_alg": root.alg, "root_kid": key_id(root.alg, root.public_raw),
        "serial": serial}
    return canonical({**claims, "sig": b64u(root.sign(canonical(claims)))})


def parse_certificate(data: bytes) -> CommandKeyCert:
    """The certificate in *data*, shape-checked; :class:`CommandKeyError` for anything
    else (never another exception)."""
    what = "command key certificate"
    obj = _load(data, what)
    _shape(obj, _CERT_FIELDS, what)
    if obj["format"] != CERT_FORMAT:
        raise CommandKeyError("malformed", f"{what}: format {obj['format']!r}, expected "
                                           f"{CERT_FORMAT!r}")
    signed = _canonical_or_refuse(obj, bytes(data), what)
    raw = _b64(obj["key"], f"{what}: key")
    _verifier(obj["alg"], raw, what)
    if obj["kid"] != key_id(obj["alg"], raw):
        raise CommandKeyError("malformed", f"{what}: kid is not its key's")
    check_region(obj["region"])
    if obj["root_alg"] not in SIGNATURE_ALGS:
        raise CommandKeyError("malformed", f"{what}: root_alg {obj['root_alg']!r} unknown")
    if obj["serial"] < 1 or obj["not_before"] >= obj["not_after"]:
        raise CommandKeyError("malformed", f"{what}: serial < 1 or not_before >= not_after")
    return CommandKeyCert(obj["alg"], raw, obj["kid"], obj["region"], obj["serial"],
                          obj["not_before"], obj["not_after"], obj["issued_at"],
                          obj["root_alg"], obj["root_kid"], _b64(obj["sig"], f"{what}: sig"),
                          signed, bytes(data))


# --- revocation lists ---------------------------------------------------------------------

@dataclass(frozen=True)
class Revoked:
    """One revoked command key (by its certificate's serial and its key id: a match of
    either is refused)."""

    serial: int
    kid: str
    reason: str
    revoked_at: int
    #: the certificate's own expiry: after it the entry may leave the list
    not_after: int

    def to_json(self) -> dict[str, JSON]:
        return {"kid": self.kid, "not_after": self.not_after, "reason": self.reason,
                "revoked_at": self.revoked_at, "serial": self.serial}

    @classmethod
    def of(cls, cert: CommandKeyCert, reason: str, revoked_at: int) -> Revoked:
        return cls(cert.serial, cert.kid, reason, revoked_at, cert.not_after)


@dataclass(frozen=True)
class RevocationList:
    number: int
    issued_at: int
    root_alg: str
    root_kid: str
    revoked: tuple[Revoked, ...]
    sig: bytes
    signed: bytes
    data: bytes

    def revokes(self, cert: CommandKeyCert) -> Revoked | None:
        for entry in self.revoked:
            if entry.serial == cert.serial or entry.kid == cert.kid:
                return entry
        return None

    def to_json(self) -> dict[str, JSON]:
        obj: dict[str, JSON] = json.loads(self.data)
        return obj


def make_revocations(root: Signer, *, number: int, issued_at: int,
                     revoked: Iterable[Revoked]) -> bytes:
    """The canonical bytes of revocation list *number* signed by *root*."""
    entries = sorted(revoked, key=lambda e: (e.serial, e.kid))
    if len(entries) > MAX_REVOKED:
        raise CommandKeyError("full", f"{len(entries)} revoked keys, more than "
                                      f"{MAX_REVOKED}: drop the expired ones")
    if number < 1:
        raise CommandKeyError("malformed", "a revocation list's number is 1 or more")
    for entry in entries:
        if entry.reason not in REASONS:
            raise CommandKeyError("malformed", f"reason {entry.reason!r}: one of "
                                               f"{', '.join(REASONS)}")
    claims: dict[str, JSON] = {
        "format": REVOCATIONS_FORMAT, "issued_at": issued_at, "number": number,
        "revoked": [e.to_json() for e in entries], "root_alg": root.alg,
        "root_kid": key_id(root.alg, root.public_raw)}
    return canonical({**claims, "sig": b64u(root.sign(canonical(claims)))})


def parse_revocations(data: bytes) -> RevocationList:
    """The revocation list in *data*, shape-checked; :class:`CommandKeyError` for
    anything else."""
    what = "revocation list"
    obj = _load(data, what)
    _shape(obj, _LIST_FIELDS, what)
    if obj["format"] != REVOCATIONS_FORMAT:
        raise CommandKeyError("malformed", f"{what}: format {obj['format']!r}, expected "
                                           f"{REVOCATIONS_FORMAT!r}")
    signed = _canonical_or_refuse(obj, bytes(data), what)
    if obj["root_alg"] not in SIGNATURE_ALGS or obj["number"] < 1:
        raise CommandKeyError("malformed", f"{what}: root_alg unknown or number < 1")
    if len(obj["revoked"]) > MAX_REVOKED:
        raise CommandKeyError("malformed", f"{what}: more than {MAX_REVOKED} entries")
    entries = []
    for index, item in enumerate(obj["revoked"]):
        where = f"{what}: revoked[{index}]"
        if not isinstance(item, dict):
            raise CommandKeyError("malformed", f"{where} is not an object")
        _shape(item, _ENTRY_FIELDS, where)
        if item["reason"] not in REASONS:
            raise CommandKeyError("malformed", f"{where}: reason {item['reason']!r} unknown")
        entries.append(Revoked(item["serial"], item["kid"], item["reason"],
                               item["revoked_at"], item["not_after"]))
    return RevocationList(obj["number"], obj["issued_at"], obj["root_alg"], obj["root_kid"],
                          tuple(entries), _b64(obj["sig"], f"{what}: sig"), signed,
                          bytes(data))


# --- the keyring --------------------------------------------------------------------------

@dataclass(frozen=True)
class CommandKey:
    """A key that may verify a command: its certificate and its verifier."""

    cert: CommandKeyCert
    verifier: Verifier

    @property
    def kid(self) -> str:
        return self.cert.kid

    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True)
class Refusal:
    """Why no key may verify a command: ``reason`` one of ``unknown_key``, ``revoked``,
    ``expired``, ``not_yet_valid``, ``wrong_region``."""

    reason: str
    detail: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Added:
    """What :meth:`CommandKeyring.add_certificate` did: *new* is False when the same
    certificate was held already; *evicted* the serials dropped to make room."""

    cert: CommandKeyCert
    new: bool
    evicted: tuple[int, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A certificate of a keys file that was not taken (its index, the refusal)."""

    index: int
    error: CommandKeyError


class CommandKeyring:
    """The root's public key, the certificates it signed and its newest revocation list.

    *region*: the region of this gateway; certificates of another region (not ``*``) are
    refused. None takes every region (the platform; a gateway that has no region yet):
    :meth:`key_for` still checks the region of each command."""

    def __init__(self, root: CommandRoot, *, region: str | None = None,
                 max_certificates: int = MAX_CERTIFICATES) -> None:
        if max_certificates < 1:
            raise ValueError("max_certificates >= 1")
        self.root = root
        self.region = None if region is None else check_region(region, allow_any=False)
        self.max_certificates = max_certificates
        self._root_verifier = root.verifier()
        self._certs: dict[int, CommandKeyCert] = {}  # by serial
        self._verifiers: dict[int, Verifier] = {}
        self.revocations: RevocationList | None = None

    @property
    def certificates(self) -> list[CommandKeyCert]:
        """The certificates held, by serial."""
        return [self._certs[s] for s in sorted(self._certs)]

    def _check_root(self, alg: str, kid: str, sig: bytes, signed: bytes, what: str) -> None:
        if kid != self.root.kid or alg != self.root.alg:
            raise CommandKeyError("wrong_root", f"{what} is signed by {kid} ({alg}), not by "
                                                f"the command root {self.root.kid}")
        if not self._root_verifier.verify(sig, signed):
            raise CommandKeyError("bad_signature", f"{what}: the root's signature does not "
                                                   "verify (altered, or forged)")

    def add_certificate(self, data: bytes, now_ms: int) -> Added:
        """Take the certificate in *data* once it verifies against the root and is for
        this keyring's region, unexpired at *now_ms* and not revoked. CommandKeyError
        otherwise; ``full`` when :attr:`max_certificates` are held and none is expired
        or revoked (else the one that expired first is evicted)."""
        return self._add(data, now_ms, refuse_revoked=True)

    def _add(self, data: bytes, now_ms: int | None, *, refuse_revoked: bool) -> Added:
        """:meth:`add_certificate`; *now_ms* None and not *refuse_revoked* when loading
        what was taken before."""
        cert = parse_certificate(data)
        what = f"certificate {cert.serial} (key {cert.kid})"
        self._check_root(cert.root_alg, cert.root_kid, cert.sig, cert.signed, what)
        if self.region is not None and not cert.covers(self.region):
            raise CommandKeyError("wrong_region", f"{what} is for region {cert.region!r}, "
                                                  f"this gateway is in {self.region!r}")
        if now_ms is not None and now_ms >= cert.not_after:
            raise CommandKeyError("expired", f"{what} expired at {cert.not_after}")
        revoked = self.revocations.revokes(cert) if self.revocations else None
        if revoked is not None and refuse_revoked:
            raise CommandKeyError("revoked", f"{what} is revoked ({revoked.reason}) by "
                                             f"revocation list {self.revocations_number}")
        held = self._certs.get(cert.serial)
        if held is not None:
            if held.data == cert.data:
                return Added(held, new=False)
            raise CommandKeyError("serial_conflict", f"{what}: another certificate with "
                                                     "this serial is held")
        evicted: tuple[int, ...] = ()
        if len(self._certs) >= self.max_certificates:
            victim = self._evictable(now_ms)
            if victim is None:
                raise CommandKeyError("full", f"{what}: {len(self._certs)} certificates "
                                              "held, none expired or revoked: revoke one "
                                              "first")
            del self._certs[victim]
            self._verifiers.pop(victim, None)
            evicted = (victim,)
        self._certs[cert.serial] = cert
        return Added(cert, new=True, evicted=evicted)

    def _evictable(self, now_ms: int | None) -> int | None:
        """The serial to drop for a new certificate: revoked or expired, the one that
        expired first."""
        dead = [c for c in self._certs.values()
                if (self.revocations is not None and self.revocations.revokes(c))
                or (now_ms is not None and now_ms >= c.not_after)]
        if not dead:
            return None
        return min(dead, key=lambda c: (c.not_after, c.serial)).serial

    @property
    def revocations_number(self) -> int:
        """The number of the revocation list held (0: none)."""
        return self.revocations.number if self.revocations else 0

    def add_revocations(self, data: bytes) -> bool:
        """Take the revocation list in *data* once it verifies against the root and is
        newer than the one held (True); the same list again is a no-op (False); an older
        one, or another list with the same number, is refused (``rollback``)."""
        rl = parse_revocations(data)
        what = f"revocation list {rl.number}"
        self._check_root(rl.root_alg, rl.root_kid, rl.sig, rl.signed, what)
        held = self.revocations
        if held is not None:
            if rl.number == held.number and rl.data == held.data:
                return False
            if rl.number <= held.number:
                raise CommandKeyError("rollback", f"{what} is not newer than the list held "
                                                  f"({held.number}): a revocation is undone "
                                                  "only by a newer list")
        self.revocations = rl
        return True

    def key_for(self, kid: str, region: str, at_ms: int) -> CommandKey | Refusal:
        """The key that may verify a command signed by *kid* for *region* at *at_ms*, or
        why none may: revoked, then wrong_region, then expired / not_yet_valid."""
        certs = [c for c in self._certs.values() if c.kid == kid]
        if not certs:
            return Refusal("unknown_key", f"no certificate of command key {kid!r} is held")
        for cert in certs:
            revoked = self.revocations.revokes(cert) if self.revocations else None
            if revoked is not None:
                return Refusal("revoked", f"command key {kid} is revoked ({revoked.reason}, "
                                          f"list {self.revocations_number})")
        here = [c for c in certs if c.covers(region)]
        if not here:
            return Refusal("wrong_region", f"command key {kid} is for region(s) "
                                           f"{sorted({c.region for c in certs})}, not "
                                           f"{region!r}")
        for cert in sorted(here, key=lambda c: -c.not_after):
            if cert.not_before <= at_ms < cert.not_after:
                verifier = self._verifiers.get(cert.serial)
                if verifier is None:
                    verifier = self._verifiers[cert.serial] = cert.verifier()
                return CommandKey(cert, verifier)
        if all(at_ms >= c.not_after for c in here):
            return Refusal("expired", f"command key {kid} expired at "
                                      f"{max(c.not_after for c in here)}")
        return Refusal("not_yet_valid", f"command key {kid} is valid from "
                                        f"{min(c.not_before for c in here)}")

    def prune(self, at_ms: int) -> tuple[int, ...]:
        """Drop the certificates expired at *at_ms*; their serials."""
        gone = tuple(s for s, c in sorted(self._certs.items()) if at_ms >= c.not_after)
        for serial in gone:
            del self._certs[serial]
            self._verifiers.pop(serial, None)
        return gone

    def status(self, cert: CommandKeyCert, at_ms: int) -> str:
        """``valid``, ``revoked``, ``expired`` or ``not_yet_valid`` (region aside)."""
        if self.revocations is not None and self.revocations.revokes(cert):
            return "revoked"
        if at_ms >= cert.not_after:
            return "expired"
        if at_ms < cert.not_before:
            return "not_yet_valid"
        return "valid"

    # --- files ---------------------------------------------------------------------------

    def keys_json(self) -> dict[str, JSON]:
        return {"certificates": [c.to_json() for c in self.certificates],
                "format": KEYS_FORMAT,
                "revocations": self.revocations.to_json() if self.revocations else None}

    def files(self) -> dict[str, bytes]:
        """The two files, by name (the caller writes them atomically)."""
        keys = json.dumps(self.keys_json(), indent=1, sort_keys=True, ensure_ascii=False)
        return {ROOT_FILE: self.root.to_bytes(), KEYS_FILE: keys.encode() + b"\n"}

    @classmethod
    def from_files(cls, root_data: bytes, keys_data: bytes | None, *,
                   region: str | None = None, max_certificates: int = MAX_CERTIFICATES,
                   ) -> tuple[CommandKeyring, list[Skipped]]:
        """The keyring of the two files, and the certificates not taken (each with why).

        A revocation list that does not verify refuses the whole keys file (taking the
        certificates without it could accept a revoked key); a certificate that does not
        verify is skipped. Expiry and revocation are not checked here: what was taken
        before stays, and :meth:`key_for` says why it may not verify a command."""
        ring = cls(CommandRoot.from_bytes(root_data), region=region,
                   max_certificates=max_certificates)
        if keys_data is None:
            return ring, []
        obj = _load(keys_data, KEYS_FILE)
        if set(obj) != {"certificates", "format", "revocations"} or \
                obj["format"] != KEYS_FORMAT or not isinstance(obj["certificates"], list):
            raise CommandKeyError("malformed", f"{KEYS_FILE}: not a {KEYS_FORMAT} file "
                                               "(format, certificates, revocations)")
        certs, revocations = obj["certificates"], obj["revocations"]
        if revocations is not None:
            ring.add_revocations(_reencode(revocations, f"{KEYS_FILE}: revocations"))
        skipped = []
        for index, item in enumerate(certs):
            try:
                ring._add(_reencode(item, f"{KEYS_FILE}: certificates[{index}]"), None,
                          refuse_revoked=False)
            except CommandKeyError as exc:
                skipped.append(Skipped(index, exc))
        return ring, skipped

    def merge(self, other: CommandKeyring, now_ms: int) -> list[str]:
        """Take *other*'s newer revocation list and its new certificates for this
        keyring's region (same root only); what changed, in words. A rollback of the list
        or a refused certificate raises."""
        if other.root != self.root:
            raise CommandKeyError("wrong_root", f"the new material's root is "
                                                f"{other.root.kid}, the installed root is "
                                                f"{self.root.kid}: a new root needs a new "
                                                "enrolment")
        changes = []
        if other.revocations is not None and self.add_revocations(other.revocations.data):
            changes.append(f"revocation list {other.revocations.number}")
        for cert in other.certificates:
            if self.status(cert, now_ms) in ("revoked", "expired") or \
                    (self.region is not None and not cert.covers(self.region)):
                continue
            added = self.add_certificate(cert.data, now_ms)
            if added.new:
                changes.append(f"certificate {cert.serial} (key {cert.kid}, region "
                               f"{cert.region})")
            changes.extend(f"evicted certificate {s}" for s in added.evicted)
        return changes

    def copy(self) -> CommandKeyring:
        ring = CommandKeyring(self.root, region=self.region,
                              max_certificates=self.max_certificates)
        ring._certs = dict(self._certs)
        ring.revocations = self.revocations
        return ring


def _reencode(value: object, what: str) -> bytes:
    """A document embedded in a keys file, as its canonical bytes (the signature covers
    its content; the file's own layout is free)."""
    if not isinstance(value, dict):
        raise CommandKeyError("malformed", f"{what} is not an object")
    try:
        return canonical(value)
    except (ValueError, TypeError) as exc:
        raise CommandKeyError("malformed", f"{what}: {exc}") from None

