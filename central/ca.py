"""The platform's certificate authority for gateways (docs/enrolment.md).

``ingest ca init --ca-dir DIR`` makes the CA: ``ca.key`` (ECDSA P-256, PKCS#8 PEM, mode
0600, in a directory of mode 0700) and ``ca.crt`` (self-signed, a CA that may sign
certificates and CRLs), and an empty CRL, ``crl.pem``, for the broker.

``ingest ca sign`` answers a gateway's enrolment request (:mod:`core.enrolment`):
it checks the request (the identity's signature, the CSR: its self-signature, its CN a
valid gateway id equal to the request's, an ECDSA P-256 key, the identity key id in its
extension), registers the identity key in the registry (:meth:`central.ingest.Ingest.enrol`,
the certificate's fingerprint with it), issues the certificate (CN = gateway id, client
authentication only, the identity key id in the same extension), keeps it in the
``certificates`` table, and writes the answer: the certificate, the CA, the platform's
command material (the ``command-*.pub``/``command-*.json`` files of ``--command-keys DIR``,
opaque here), signed by the CA's key. The same request answered again gives the same
certificate (a lost answer can be fetched again); an answer is never made twice for two
different requests with one claim.

The online path (:mod:`central.enrolment`) takes only requests carrying a valid **claim
token** (``ingest ca claim``): 32 random bytes shown once, stored as their SHA-256, usable
once, until it expires (``--ttl``, at most :data:`MAX_CLAIM_TTL_S`), optionally for one
gateway id only. At most :data:`MAX_OPEN_CLAIMS` are open at once (beyond, ``claim`` is
refused), and spent or expired ones are kept :data:`CLAIM_RETAIN_MS` (to say "used" rather
than "unknown"), at most :data:`MAX_CLAIM_ROWS` rows in all (the oldest spent go first).

**Renewal** (:func:`renew_request`, answered by :mod:`central.enrolment` on the gateway's
own enrolment topic): a request of type ``renew`` signed by the gateway's *registered*
identity key (the newest of the registry's ``identities``; nothing of the request's
registration is trusted) and by the key of its current certificate (one of this CA's, of
this gateway, unexpired, not revoked), from a gateway whose status is ``active``. The new
certificate is kept in the table, becomes the gateway's ``tls_fingerprint``, and every
other certificate of the gateway still valid but the one it renews from is revoked
(``superseded``: an answer that was lost), so a gateway holds at most two valid
certificates. Renewals of one gateway come at least *renew_only_after* apart
(``too_soon``): a gateway in a loop cannot mint certificates.

``ingest ca revoke --gw ID --reason R`` sets the gateway's status ``revoked`` (its later
records are quarantined ``revoked``) and revokes its certificates; ``ingest ca crl --out
F`` writes the CRL (PEM) the broker loads (mosquitto's ``crlfile``), listing every revoked
certificate not yet expired. ``ingest ca list`` shows the certificates issued.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import hashlib
import ipaddress
import json
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from central.db import CA_SCHEMA_VERSION, Database, DatabaseError, Transaction, open_db
from central.ingest import EnrolError, Ingest
from central.record import Registration
from core import durable
from core.enrolment import (
    ANSWER_FILE,
    COMMAND_FILE_RE,
    MAX_FILES,
    MAX_REQUEST_BYTES,
    RENEW,
    REQUEST_FILE,
    EnrolmentError,
    EnrolRequest,
    check_claim_token,
    claim_hash,
    claim_id,
    kid_extension,
    kid_of,
    make_answer,
    new_claim_token,
    parse_request,
)
from core.enrolment import GATEWAY_ID_RE as _GATEWAY_ID_RE
from core.errors import UserError
from core.record import JSON

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CRL_FILE = "crl.pem"
DAY_MS = 86_400_000
DEFAULT_CA_DAYS = 3650
#: A gateway certificate's default and longest validity, days (renewal: docs/enrolment.md).
DEFAULT_CERT_DAYS = 397
MAX_CERT_DAYS = 825
#: How long a CRL is valid: the broker refuses every client once it has expired (OpenSSL),
#: so ``ingest ca crl`` must run again before (daily, by a timer).
DEFAULT_CRL_DAYS = 30
MAX_CRL_DAYS = 90
#: Claim tokens: default and longest life, seconds; how many may be open at once; how
#: long a spent one is remembered, ms; the table's bound in rows.
DEFAULT_CLAIM_TTL_S = 15 * 60
MAX_CLAIM_TTL_S = 7 * 24 * 3600
MAX_OPEN_CLAIMS = 1000
CLAIM_RETAIN_MS = 30 * DAY_MS
MAX_CLAIM_ROWS = 20_000
#: The command material read from ``--command-keys DIR``: per file, in bytes.
MAX_COMMAND_FILE_BYTES = 512 * 1024
#: Why a certificate is revoked (``ingest ca revoke --reason``): RFC 5280's reason codes.
REASONS: dict[str, x509.ReasonFlags] = {
    "key_compromise": x509.ReasonFlags.key_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "unspecified": x509.ReasonFlags.unspecified,
}
#: Clock skew allowed for a certificate's start (a gateway's clock a little behind).
BACKDATE = dt.timedelta(minutes=5)
#: Renewals of one gateway come at least this far apart by default, ms (``too_soon``), and
#: at most this bound may be asked (``ingest enrol-service --renew-only-after``).
DEFAULT_RENEW_ONLY_AFTER_MS = 3600_000
MAX_RENEW_ONLY_AFTER_MS = 30 * DAY_MS


class CaError(UserError):
    """A CA operation that cannot be done as asked; the message says why and how to fix it."""


def now_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, hex (``openssl x509 -fingerprint -sha256``
    without the colons)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


# --- the CA ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Authority:
    """The CA's key and certificate (:func:`load_ca`)."""

    directory: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(Encoding.PEM).decode("ascii")

    def sign(self, data: bytes) -> bytes:
        """The CA's signature (ECDSA with SHA-256, DER) over *data*: an answer's."""
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def init_ca(directory: Path, name: str, *, days: int = DEFAULT_CA_DAYS,
            crl_days: int = DEFAULT_CRL_DAYS) -> Authority:
    """A new CA in *directory* (never over an existing one)."""
    if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
        raise CaError(f"{directory} already holds a CA ({CA_KEY}, {CA_CERT}): never replaced; "
                      "give another --ca-dir")
    if not 1 <= days <= 36600:
        raise CaError(f"--days {days}: give 1-36600")
    if not name.strip() or len(name) > 64:
        raise CaError("--name: give the CA's name (1-64 characters), e.g. 'Province CA'")
    try:
        durable.make_dirs(directory, 0o700)
    except OSError as exc:
        raise CaError(f"{directory}: cannot create the CA directory ({exc})") from None
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    durable.atomic_write(directory / CA_KEY, key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), 0o600)
    durable.atomic_write(directory / CA_CERT, cert.public_bytes(Encoding.PEM), 0o644)
    authority = Authority(directory, key, cert)
    durable.atomic_write(directory / CRL_FILE, make_crl(authority, [], days=crl_days), 0o644)
    return authority


def load_ca(directory: Path) -> Authority:
    """The CA in *directory*: its key private to its owner, matching its certificate."""
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if not key_path.exists() or not cert_path.exists():
        raise CaError(f"{directory} holds no CA ({CA_KEY} and {CA_CERT}): make one with "
                      f"'ingest ca init --ca-dir {directory} --name NAME'")
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise CaError(f"{key_path} is readable by others (mode {mode:o}): chmod 600 {key_path}")
    try:
        key = load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CaError(f"{directory}: the CA's files cannot be read ({exc})") from None
    public = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            not isinstance(public, ec.EllipticCurvePublicKey) or \
            key.public_key().public_numbers() != public.public_numbers():
        raise CaError(f"{key_path} is not the key of {cert_path}: restore the CA directory "
                      "from its backup")
    return Authority(directory, key, cert)


def client_uri(cn: str, *, gateway: bool) -> str:
    """A client certificate's URI name: ``urn:smartcorr:gw:<id>`` for a gateway,
    ``urn:smartcorr:platform:<cn>`` for the platform's own."""
    return f"urn:smartcorr:{'gw' if gateway else 'platform'}:{cn}"


def issue(authority: Authority, public_key: ec.EllipticCurvePublicKey, cn: str, *,
          days: int, kid: str | None = None, server: bool = False,
          sans: Sequence[str] = (), validity: dt.timedelta | None = None) -> x509.Certificate:
    """A certificate for *public_key*: a client's (a gateway's, with its identity *kid*; a
    platform service's; named by :func:`client_uri` too) or, with *server*, a broker's
    (*sans*: DNS names or IP addresses). Valid *days*, or *validity* when given (a
    short-lived certificate: tests of renewal, at most :data:`MAX_CERT_DAYS` either way)."""
    if not 1 <= days <= MAX_CERT_DAYS:
        raise CaError(f"--days {days}: give 1-{MAX_CERT_DAYS}")
    if validity is not None and not dt.timedelta(0) < validity <= \
            dt.timedelta(days=MAX_CERT_DAYS):
        raise CaError(f"validity {validity}: give more than 0 and at most {MAX_CERT_DAYS} days")
    now = dt.datetime.now(dt.UTC)
    life = validity if validity is not None else dt.timedelta(days=days)
    not_after = min(now + life, authority.cert.not_valid_after_utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn)).issuer_name(authority.cert.subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   authority.key.public_key()), critical=False))
    if kid is not None:
        builder = builder.add_extension(kid_extension(kid), critical=False)
    if not server:  # a client's name as a URI too (RFC 5280 path validation wants a SAN)
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(client_uri(cn, gateway=kid is not None))]),
            critical=False)
    if sans:
        names: list[x509.GeneralName] = []
        for san in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(authority.key, hashes.SHA256())


# --- checking a request ------------------------------------------------------------------------

def check_csr(pem: str, gateway_id: str, kid: str) -> x509.CertificateSigningRequest:
    """The CSR of an enrolment request, or :class:`EnrolmentError` ``bad_csr`` saying why."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise EnrolmentError("bad_csr", f"the CSR is not a PEM certificate request ({exc})"
                             ) from None
    if not csr.is_signature_valid:
        raise EnrolmentError("bad_csr", "the CSR's signature by its own key does not verify")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or len(csr.subject) != 1:
        raise EnrolmentError("bad_csr", "the CSR's subject must be one common name (CN), "
                             "the gateway id")
    cn = cns[0].value
    if not isinstance(cn, str) or not _GATEWAY_ID_RE.fullmatch(cn):
        raise EnrolmentError("bad_csr", f"the CSR's CN {str(cn)[:80]!r} is not a valid "
                             "gateway id (3-63 of a-z, 0-9, '-')")
    if cn != gateway_id:
        raise EnrolmentError("bad_csr", f"the CSR's CN {cn!r} is not the request's gateway "
                             f"id {gateway_id!r}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise EnrolmentError("bad_csr", "the CSR's key is not ECDSA P-256 (the TLS key "
                             "'provision init' makes)")
    named = kid_of(csr.extensions)
    if named != kid:
        raise EnrolmentError("bad_csr", f"the CSR names identity key {named!r}, the request "
                             f"is signed by {kid!r}: the TLS key and the identity key are "
                             "not of one gateway")
    return csr


def command_files(directory: Path | None) -> dict[str, bytes]:
    """The command material to hand to gateways: the ``command-*.pub`` and
    ``command-*.json`` files of *directory* (opaque here). A directory that holds a private
    key (``*.key``, or a file with one inside) is refused: it is the offline root's own,
    not the export (``ingest command-key export``)."""
    if directory is None:
        return {}
    if not directory.is_dir():
        raise CaError(f"--command-keys {directory}: no such directory (give the directory "
                      "'ingest command-key export' wrote)")
    files: dict[str, bytes] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        data = path.read_bytes()[:MAX_COMMAND_FILE_BYTES + 1]
        if path.suffix == ".key" or b"PRIVATE KEY" in data or b'"private"' in data:
            raise CaError(f"--command-keys {directory} holds a private key ({path.name}): "
                          "give the export directory ('ingest command-key export'), never "
                          "the root's")
        if not COMMAND_FILE_RE.fullmatch(path.name):
            continue
        if len(data) > MAX_COMMAND_FILE_BYTES:
            raise CaError(f"{path}: more than {MAX_COMMAND_FILE_BYTES} bytes")
        files[path.name] = data
    if len(files) > MAX_FILES:
        raise CaError(f"--command-keys {directory}: {len(files)} command files (at most "
                      f"{MAX_FILES})")
    return files


# --- answering a request -------------------------------------------------------------------------

@dataclass(frozen=True)
class Issued:
    """An answered request: the answer's bytes and what it says."""

    answer: bytes
    request: EnrolRequest
    serial: str
    fingerprint: str
    not_after_ms: int
    #: False when this request was answered before (the same certificate again)
    new: bool
    #: True when the registry did not know the gateway before
    enrolled: bool
    files: tuple[str, ...]

    def to_json(self) -> dict[str, JSON]:
        return {"gw": self.request.gateway_id, "request_id": self.request.request_id,
                "kid": self.request.kid, "serial": self.serial,
                "fingerprint": self.fingerprint, "not_after": self.not_after_ms,
                "new_certificate": self.new, "new_gateway": self.enrolled,
                "files": list(self.files)}


def sign_request(db: Database, authority: Authority, data: bytes, *, require_claim: bool,
                 command_keys: Path | None = None, days: int = DEFAULT_CERT_DAYS,
                 now: int | None = None, validity: dt.timedelta | None = None) -> Issued:
    """Answer the request *data* (see the module's docstring); :class:`EnrolmentError`
    with the reason it is refused. With *require_claim* (the online path) the request must
    carry a valid claim token, which it uses up (before the registry is touched: a token
    two requests race for goes to one). A renewal is :func:`renew_request`'s."""
    now = now_ms() if now is None else now
    files = command_files(command_keys)
    request = parse_request(data)
    if request.kind == RENEW:
        raise EnrolmentError("unsupported", "a renewal is answered by the enrolment service "
                             "over the gateways' listener ('ingest enrol-service'), not here")
    csr = check_csr(request.csr_pem, request.gateway_id, request.kid)
    try:
        registration = Registration.from_json(request.registration)
    except ValueError as exc:
        raise EnrolmentError("malformed", f"the request's registration: {exc}") from None
    with db.transaction() as tx:
        tx.lock_gateway(request.gateway_id)
        row = tx.one("SELECT pem FROM certificates WHERE request_sha256 = ? "
                     "AND revoked_at IS NULL ORDER BY issued_at DESC LIMIT 1",
                     (request.sha256,))
        spent = row is None and require_claim and _use_claim(tx, request, now)
    if row is not None:  # answered before: the same certificate (a lost answer, again)
        cert = x509.load_pem_x509_certificate(str(row[0]).encode("ascii"))
        return _issued(authority, request, cert, files, new=False, enrolled=False)
    cert = issue(authority, csr.public_key(), request.gateway_id,  # type: ignore[arg-type]
                 days=days, kid=request.kid, validity=validity)
    try:
        enrolled = Ingest(db, now_ms=lambda: now).enrol(registration,
                                                        tls_fingerprint=fingerprint(cert))
    except EnrolError as exc:
        if spent:  # a refusal spends no token: give back the one this call used
            with db.transaction() as tx:
                tx.execute("UPDATE claims SET used_at = NULL, used_by = NULL, "
                           "request_sha256 = NULL WHERE request_sha256 = ?", (request.sha256,))
        raise EnrolmentError("registry", str(exc)) from None
    with db.transaction() as tx:
        _store(tx, cert, request.gateway_id, request.kid, request_sha256=request.sha256,
               now=now)
    return _issued(authority, request, cert, files, new=True, enrolled=enrolled)


def renew_request(db: Database, authority: Authority, data: bytes, *,
                  command_keys: Path | None = None, days: int = DEFAULT_CERT_DAYS,
                  renew_only_after_ms: int = DEFAULT_RENEW_ONLY_AFTER_MS,
                  now: int | None = None, validity: dt.timedelta | None = None) -> Issued:
    """Answer the renewal *data* (the module's docstring); :class:`EnrolmentError` with the
    reason it is refused: ``not_enrolled``, ``revoked``, ``decommissioned``, ``registry``
    (not the registered identity key), ``certificate`` (the current one unknown, another
    gateway's or expired), ``bad_tls_signature``, ``too_soon``. The same request answered
    again gives the same certificate."""
    if not 0 <= renew_only_after_ms <= MAX_RENEW_ONLY_AFTER_MS:
        raise CaError(f"--renew-only-after: at most {MAX_RENEW_ONLY_AFTER_MS // DAY_MS} days")
    now = now_ms() if now is None else now
    files = command_files(command_keys)
    request = parse_request(data)
    if request.kind != RENEW or request.current is None:
        raise EnrolmentError("malformed", "not a renewal request (type 'renew')")
    gw = request.gateway_id
    csr = check_csr(request.csr_pem, gw, request.kid)
    with db.transaction() as tx:
        tx.lock_gateway(gw)
        _check_renewer(tx, request)
        row = tx.one("SELECT pem FROM certificates WHERE request_sha256 = ? AND gw = ? "
                     "AND revoked_at IS NULL", (request.sha256, gw))
        if row is not None:  # answered before (the answer was lost): the same again
            cert = x509.load_pem_x509_certificate(str(row[0]).encode("ascii"))
            return _issued(authority, request, cert, files, new=False, enrolled=False)
        _check_current(tx, request, now)
        newest = tx.one("SELECT MAX(issued_at) FROM certificates WHERE gw = ?", (gw,))
        if newest is not None and newest[0] is not None and \
                now - int(newest[0]) < renew_only_after_ms:
            again = int(newest[0]) + renew_only_after_ms
            raise EnrolmentError("too_soon", f"gateway {gw} was issued a certificate at "
                                 f"{_iso(int(newest[0]))}: renewals come at least "
                                 f"{renew_only_after_ms // 1000} s apart; try again after "
                                 f"{_iso(again)}")
        cert = issue(authority, csr.public_key(), gw,  # type: ignore[arg-type]
                     days=days, kid=request.kid, validity=validity)
        _store(tx, cert, gw, request.kid, request_sha256=request.sha256, now=now)
        new_serial = format(cert.serial_number, "x")
        tx.execute("UPDATE certificates SET revoked_at = ?, revoke_reason = 'superseded' "
                   "WHERE gw = ? AND revoked_at IS NULL AND not_after > ? AND serial <> ? "
                   "AND serial <> ?", (now, gw, now, request.current, new_serial))
        tx.execute("UPDATE gateways SET tls_fingerprint = ? WHERE gw = ?",
                   (fingerprint(cert), gw))
    return _issued(authority, request, cert, files, new=True, enrolled=False)


def _check_renewer(tx: Transaction, request: EnrolRequest) -> None:
    """The gateway is enrolled and active, and the request is signed by its registered
    identity key (the newest the registry holds)."""
    gw = request.gateway_id
    row = tx.one("SELECT status, revoke_reason FROM gateways WHERE gw = ?", (gw,))
    if row is None:
        raise EnrolmentError("not_enrolled", f"gateway {gw} is not enrolled here: enrol it "
                             "('provision enrol'), a renewal only extends an enrolment")
    if row[0] == "revoked":
        raise EnrolmentError("revoked", f"gateway {gw} is revoked ({row[1]}): it gets no "
                             "certificate again; a unit back in service is enrolled under a "
                             "new gateway id")
    if row[0] != "active":
        raise EnrolmentError("decommissioned", f"gateway {gw} is {row[0]}: it gets no "
                             "certificate again; a unit back in service is enrolled under a "
                             "new gateway id")
    ident = tx.one("SELECT kid, pubkey FROM identities WHERE gw = ? ORDER BY from_seq DESC "
                   "LIMIT 1", (gw,))
    if ident is None or str(ident[0]) != request.kid or bytes(ident[1]) != request.public_raw:
        raise EnrolmentError("registry", f"the renewal is signed by identity key "
                             f"{request.kid}, not by the key the registry holds for {gw} "
                             f"({None if ident is None else ident[0]}): after a key rotation "
                             "the platform learns the new key from its key.rotate record; "
                             "try again once that record has arrived")


def _check_current(tx: Transaction, request: EnrolRequest, now: int) -> None:
    """The certificate the renewal names is this gateway's, valid, and its key signed."""
    gw, serial = request.gateway_id, request.current
    row = tx.one("SELECT pem, not_after, revoked_at, revoke_reason FROM certificates WHERE "
                 "serial = ? AND gw = ?", (serial, gw))
    if row is None:
        raise EnrolmentError("certificate", f"certificate {serial} is not one this CA issued "
                             f"to {gw}: enrol again ('provision enrol')")
    if row[2] is not None:
        raise EnrolmentError("revoked", f"certificate {serial} of {gw} was revoked "
                             f"({row[3]}): it renews nothing; enrol again")
    if int(row[1]) <= now:
        raise EnrolmentError("certificate", f"certificate {serial} of {gw} expired at "
                             f"{_iso(int(row[1]))}: enrol again ('provision enrol')")
    cert = x509.load_pem_x509_certificate(str(row[0]).encode("ascii"))
    if not request.tls_signature_valid(cert.public_key()):
        raise EnrolmentError("bad_tls_signature", f"the renewal is not signed by the key of "
                             f"certificate {serial}: only the box that holds it may renew it")


def _issued(authority: Authority, request: EnrolRequest, cert: x509.Certificate,
            files: dict[str, bytes], *, new: bool, enrolled: bool) -> Issued:
    answer = make_answer(request_id=request.request_id, gateway_id=request.gateway_id,
                         certificate_pem=cert.public_bytes(Encoding.PEM).decode("ascii"),
                         chain=[authority.cert_pem], files=files, issued_ms=now_ms(),
                         sign=authority.sign)
    return Issued(answer, request, format(cert.serial_number, "x"), fingerprint(cert),
                  _ms(cert.not_valid_after_utc), new, enrolled, tuple(sorted(files)))


def _store(tx: Transaction, cert: x509.Certificate, gw: str | None, kid: str | None, *,
           request_sha256: str | None, now: int) -> None:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    tx.execute("INSERT INTO certificates (serial, gw, cn, fingerprint, kid, request_sha256, "
               "not_before, not_after, issued_at, pem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (format(cert.serial_number, "x"), gw, str(cn), fingerprint(cert), kid,
                request_sha256, _ms(cert.not_valid_before_utc), _ms(cert.not_valid_after_utc),
                now, cert.public_bytes(Encoding.PEM).decode("ascii")))


def issue_platform(db: Database, authority: Authority, cn: str, public_key:
                   ec.EllipticCurvePublicKey, *, days: int, server: bool = False,
                   sans: Sequence[str] = ()) -> x509.Certificate:
    """A certificate for one of the platform's own: a broker (*server*), the enrolment
    service, a consumer. Kept in the table (``ingest ca list``, revocable by serial)."""
    if not cn or len(cn) > 64 or any(c in cn for c in "/+# ") or \
            not (server or cn.startswith("platform-")):
        raise CaError(f"--cn {cn!r}: a platform client's CN starts with 'platform-' (a "
                      "gateway's certificate comes by enrolment), a broker's is its host "
                      "name (--server); no '/', '+', '#' or space")
    cert = issue(authority, public_key, cn, days=days, server=server, sans=sans)
    with db.transaction() as tx:
        _store(tx, cert, None, None, request_sha256=None, now=now_ms())
    return cert


# --- claims --------------------------------------------------------------------------------------

def _use_claim(tx: Transaction, request: EnrolRequest, now: int) -> bool:
    """Use up the request's claim token: it must be known, unexpired, for this gateway (or
    any), and unused (or used by this very request, whose answer was lost); otherwise
    :class:`EnrolmentError` naming which. True when this call used it (False: used by
    this request before)."""
    if request.claim is None:
        raise EnrolmentError("claim_missing", "the request carries no claim token: get one "
                             "from the platform's operator ('ingest ca claim') and give it to "
                             "'provision enrol --claim'")
    token = request.claim
    row = tx.one("SELECT gw, expires_at, used_at, used_by, request_sha256 FROM claims "
                 "WHERE hash = ?", (claim_hash(token),))
    name = claim_id(token)
    if row is None:
        raise EnrolmentError("claim_unknown", f"claim token {name} is unknown here: mistyped, "
                             "or made by another platform ('ingest ca claim' makes one)")
    gw, expires_at, used_at, used_by = row[0], int(row[1]), row[2], row[3]
    again = used_at is not None and row[4] == request.sha256
    if used_at is not None and not again:
        raise EnrolmentError("claim_used", f"claim token {name} was used already (by "
                             f"{used_by} at {_utc(int(used_at)).isoformat()}): each token "
                             "enrols one gateway once; ask for a new one")
    if now >= expires_at and not again:
        raise EnrolmentError("claim_expired", f"claim token {name} expired at "
                             f"{_utc(expires_at).isoformat()}: ask for a new one")
    if gw is not None and gw != request.gateway_id:
        raise EnrolmentError("claim_other_gateway", f"claim token {name} is for gateway "
                             f"{gw}, not {request.gateway_id}")
    if again:
        return False
    if not tx.execute("UPDATE claims SET used_at = ?, used_by = ?, request_sha256 = ? "
                      "WHERE hash = ? AND used_at IS NULL",
                      (now, request.gateway_id, request.sha256, claim_hash(token))):
        raise EnrolmentError("claim_used", f"claim token {name} was used by another request "
                             "a moment ago; ask for a new one")
    return True


@dataclass(frozen=True)
class Claim:
    token: str
    claim_id: str
    expires_ms: int
    gateway_id: str | None


def new_claim(db: Database, *, ttl_s: int = DEFAULT_CLAIM_TTL_S, gateway_id: str | None = None,
              by: str | None = None, now: int | None = None) -> Claim:
    """A new claim token (shown once: only its hash is kept)."""
    if not 60 <= ttl_s <= MAX_CLAIM_TTL_S:
        raise CaError(f"--ttl: give 1m to {MAX_CLAIM_TTL_S // 86400}d, got {ttl_s} s")
    if gateway_id is not None and not _GATEWAY_ID_RE.fullmatch(gateway_id):
        raise CaError(f"--gw {gateway_id!r} is not a valid gateway id (3-63 of a-z, 0-9, '-')")
    now = now_ms() if now is None else now
    by = by or getpass.getuser()
    token = new_claim_token()
    with db.transaction() as tx:
        tx.execute("DELETE FROM claims WHERE (used_at IS NOT NULL OR expires_at <= ?) AND "
                   "COALESCE(used_at, expires_at) < ?", (now, now - CLAIM_RETAIN_MS))
        open_row = tx.one("SELECT COUNT(*) FROM claims WHERE used_at IS NULL AND "
                          "expires_at > ?", (now,))
        if open_row is not None and int(open_row[0]) >= MAX_OPEN_CLAIMS:
            raise CaError(f"{open_row[0]} claim tokens are open (at most {MAX_OPEN_CLAIMS}): "
                          "let them expire, or 'ingest ca claim --cancel-open' first")
        total = tx.one("SELECT COUNT(*) FROM claims")
        excess = (int(total[0]) if total else 0) - (MAX_CLAIM_ROWS - 1)
        if excess > 0:  # the oldest spent ones go (open ones are fewer than the bound)
            for (old,) in tx.all("SELECT hash FROM claims WHERE used_at IS NOT NULL OR "
                                 "expires_at <= ? ORDER BY COALESCE(used_at, expires_at) "
                                 "LIMIT ?", (now, excess)):
                tx.execute("DELETE FROM claims WHERE hash = ?", (bytes(old),))
        expires = now + ttl_s * 1000
        tx.execute("INSERT INTO claims (hash, claim_id, gw, created_at, expires_at, created_by) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (claim_hash(token), claim_id(token), gateway_id, now, expires, by))
    return Claim(token, claim_id(token), expires, gateway_id)


def cancel_open_claims(db: Database, *, now: int | None = None) -> int:
    """Expire every open claim token now; how many."""
    now = now_ms() if now is None else now
    with db.transaction() as tx:
        return tx.execute("UPDATE claims SET expires_at = ? WHERE used_at IS NULL AND "
                          "expires_at > ?", (now, now))


def claim_status(db: Database, token: str, *, now: int | None = None) -> str:
    """``open``, ``used``, ``expired`` or ``unknown`` (for tests and the operator)."""
    now = now_ms() if now is None else now
    with db.transaction(write=False) as tx:
        row = tx.one("SELECT expires_at, used_at FROM claims WHERE hash = ?",
                     (claim_hash(check_claim_token(token)),))
    if row is None:
        return "unknown"
    if row[1] is not None:
        return "used"
    return "expired" if now >= int(row[0]) else "open"


# --- revocation ----------------------------------------------------------------------------------

def revoke(db: Database, *, gateway_id: str | None = None, serial: str | None = None,
           reason: str = "unspecified", now: int | None = None) -> list[str]:
    """Revoke a gateway (its status ``revoked``, every certificate of it) or one
    certificate by *serial*; the serials revoked now."""
    if reason not in REASONS:
        raise CaError(f"--reason {reason!r}: give one of {', '.join(REASONS)}")
    now = now_ms() if now is None else now
    with db.transaction() as tx:
        if gateway_id is not None:
            tx.lock_gateway(gateway_id)
            if tx.one("SELECT 1 FROM gateways WHERE gw = ?", (gateway_id,)) is None:
                raise CaError(f"gateway {gateway_id!r} is not enrolled: 'ingest gateways "
                              "--db URL' lists the ids")
            tx.execute("UPDATE gateways SET status = 'revoked', revoked_at = ?, "
                       "revoke_reason = ? WHERE gw = ? AND status = 'active'",
                       (now, reason, gateway_id))
            where, param = "gw = ?", gateway_id
        else:
            if serial is None:
                raise CaError("give --gw ID or --serial HEX")
            where, param = "serial = ?", serial.lower().removeprefix("0x")
            if tx.one("SELECT 1 FROM certificates WHERE serial = ?", (param,)) is None:
                raise CaError(f"no certificate of serial {serial!r}: 'ingest ca list' "
                              "shows them")
        serials = [str(r[0]) for r in tx.all(
            f"SELECT serial FROM certificates WHERE {where} AND revoked_at IS NULL "  # noqa: S608 (fixed texts)
            "ORDER BY serial", (param,))]
        tx.execute(f"UPDATE certificates SET revoked_at = ?, revoke_reason = ? WHERE {where} "  # noqa: S608 (fixed texts)
                   "AND revoked_at IS NULL", (now, reason, param))
    return serials


@dataclass(frozen=True)
class RevokedCert:
    serial: str
    revoked_ms: int
    reason: str


def revoked(db: Database, *, now: int | None = None) -> list[RevokedCert]:
    """Every revoked certificate not yet expired (an expired one needs no CRL entry)."""
    now = now_ms() if now is None else now
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT serial, revoked_at, revoke_reason FROM certificates WHERE "
                      "revoked_at IS NOT NULL AND not_after > ? ORDER BY serial", (now,))
    return [RevokedCert(str(r[0]), int(r[1]), str(r[2])) for r in rows]


def make_crl(authority: Authority, entries: Iterable[RevokedCert], *,
             days: int = DEFAULT_CRL_DAYS, now: int | None = None) -> bytes:
    """The CRL (PEM) listing *entries*, valid *days*; its number is its time in ms (it only
    goes up)."""
    if not 1 <= days <= MAX_CRL_DAYS:
        raise CaError(f"--days {days}: a CRL is valid 1-{MAX_CRL_DAYS} days")
    now = now_ms() if now is None else now
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(authority.cert.subject)
               .last_update(_utc(now) - BACKDATE)
               .next_update(_utc(now) + dt.timedelta(days=days))
               .add_extension(x509.CRLNumber(now), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   authority.key.public_key()), critical=False))
    for entry in entries:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.serial, 16))
            .revocation_date(_utc(entry.revoked_ms))
            .add_extension(x509.CRLReason(REASONS.get(entry.reason,
                                                      x509.ReasonFlags.unspecified)),
                           critical=False)
            .build())
    return builder.sign(authority.key, hashes.SHA256()).public_bytes(Encoding.PEM)


def write_crl(db: Database, authority: Authority, out: Path, *,
              days: int = DEFAULT_CRL_DAYS) -> int:
    """Write the CRL to *out* atomically (the broker never reads half a file); how many
    certificates it lists."""
    entries = revoked(db)
    durable.atomic_write(out, make_crl(authority, entries, days=days), 0o644)
    return len(entries)


def check_crl(data: bytes, authority: Authority) -> x509.CertificateRevocationList:
    """The CRL in *data* if the CA signed it (tests, ``ca crl`` read back)."""
    crl = x509.load_pem_x509_crl(data)
    if not crl.is_signature_valid(authority.key.public_key()):
        raise CaError("the CRL is not signed by this CA")
    return crl


def certificates(db: Database, gateway_id: str | None = None) -> list[dict[str, JSON]]:
    """The certificates issued (of one gateway), newest first."""
    sql = ("SELECT serial, gw, cn, fingerprint, kid, not_before, not_after, issued_at, "
           "revoked_at, revoke_reason FROM certificates")
    params: tuple[str, ...] = ()
    if gateway_id is not None:
        sql, params = sql + " WHERE gw = ?", (gateway_id,)
    with db.transaction(write=False) as tx:
        rows = tx.all(sql + " ORDER BY issued_at DESC, serial", params)
    return [{"serial": r[0], "gw": r[1], "cn": r[2], "fingerprint": r[3], "kid": r[4],
             "not_before": int(r[5]), "not_after": int(r[6]), "issued_at": int(r[7]),
             "revoked_at": None if r[8] is None else int(r[8]), "revoke_reason": r[9]}
            for r in rows]


def request_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def private_umask() -> None:
    """Files this process creates are its owner's alone (the CA's key, the answers)."""
    os.umask(0o077)


# --- the command line (central/cli.py adds these) ------------------------------------------------

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``15m``, ``900s``, ``2h``, ``1d`` or plain seconds, in seconds."""
    value = text.strip().lower()
    unit = _TTL_UNITS.get(value[-1:])
    number = value[:-1] if unit else value
    if not number.isdigit():
        raise CaError(f"--ttl {text!r}: give a duration such as 15m, 2h, 1d or 900 (seconds)")
    return int(number) * (unit or 1)


def _iso(ms: int) -> str:
    return _utc(ms).isoformat(timespec="seconds").replace("+00:00", "Z")


def _print(args: argparse.Namespace, out: dict[str, JSON], text: str) -> None:
    print(json.dumps(out, sort_keys=True) if args.json else text)


def _open(args: argparse.Namespace, *, create: bool) -> Database:
    """The database of ``--db``: created and migrated with *create*; otherwise it must be
    there, and is migrated to hold the CA's tables."""
    try:
        db = open_db(args.db, migrate=create)
        if not create and db.version() < CA_SCHEMA_VERSION:
            db.migrate()
    except DatabaseError as exc:
        raise CaError(str(exc)) from None
    return db


def _ca_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-dir", required=True, type=Path, metavar="DIR",
                        help="the CA's directory (ca.key mode 0600, ca.crt): keep it on the "
                             "platform's signing host only")


def add_commands(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                 db_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """``ca init|sign|claim|revoke|crl|list|issue``."""
    ca = sub.add_parser("ca", help="the platform's CA for gateways: enrolment answers, claim "
                                   "tokens, revocation and the CRL (docs/enrolment.md)")
    csub = ca.add_subparsers(dest="action", required=True)
    init = csub.add_parser("init", help="make the CA (ca.key 0600, ca.crt) and an empty CRL")
    _ca_dir_arg(init)
    init.add_argument("--name", required=True, help="the CA's name (its certificate's CN), "
                                                     "e.g. 'Quebec SmartCorr CA'")
    init.add_argument("--days", type=int, default=DEFAULT_CA_DAYS,
                      help=f"the CA's validity, days (default {DEFAULT_CA_DAYS})")
    init.add_argument("--json", action="store_true", help="print one JSON object")

    sign = csub.add_parser("sign", help="answer a gateway's request from a USB stick: "
                                        "check it, register its identity, issue its "
                                        "certificate, write answer.json")
    sign.add_argument("dir", nargs="?", type=Path, metavar="DIR",
                      help="the directory holding request.json; answer.json goes beside it")
    sign.add_argument("--request", type=Path, metavar="F",
                      help="the request file (instead of DIR)")
    sign.add_argument("--out", type=Path, metavar="DIR",
                      help="where answer.json goes (with --request; default: beside it)")
    _ca_dir_arg(sign)
    db_arg(sign)
    sign.add_argument("--command-keys", type=Path, metavar="DIR",
                      help="the command material to hand out ('ingest command-key export' "
                           "directory): its command-*.pub and command-*.json files")
    sign.add_argument("--days", type=int, default=DEFAULT_CERT_DAYS,
                      help=f"the certificate's validity, days (default {DEFAULT_CERT_DAYS}, "
                           f"at most {MAX_CERT_DAYS})")
    sign.add_argument("--json", action="store_true", help="print one JSON object")

    claim = csub.add_parser("claim", help="a one-time claim token for the online path "
                                          "(shown once; stored hashed)")
    db_arg(claim)
    claim.add_argument("--ttl", default="15m",
                       help="how long it may be used: 15m (default), 2h, 1d (at most 7d)")
    claim.add_argument("--gw", metavar="ID", help="only for this gateway id")
    claim.add_argument("--by", metavar="NAME", help="who asks (default: the OS user)")
    claim.add_argument("--out", type=Path, metavar="FILE",
                       help="write the token to FILE (mode 0600, never replaced) instead of "
                            "printing it")
    claim.add_argument("--cancel-open", action="store_true",
                       help="instead: expire every open token now")
    claim.add_argument("--json", action="store_true", help="print one JSON object")

    rev = csub.add_parser("revoke", help="revoke a gateway (status revoked, its later records "
                                         "quarantined) and its certificates, or one "
                                         "certificate; then write the CRL ('ca crl')")
    db_arg(rev)
    what = rev.add_mutually_exclusive_group(required=True)
    what.add_argument("--gw", metavar="ID", help="the gateway")
    what.add_argument("--serial", metavar="HEX", help="one certificate ('ca list' shows them)")
    rev.add_argument("--reason", required=True, choices=sorted(REASONS),
                     help="why (RFC 5280's reason, in the CRL)")
    rev.add_argument("--json", action="store_true", help="print one JSON object")

    crl = csub.add_parser("crl", help="write the CRL (PEM) for the broker (mosquitto "
                                      "crlfile): run it after each revocation and daily")
    _ca_dir_arg(crl)
    db_arg(crl)
    crl.add_argument("--out", required=True, type=Path, metavar="F",
                     help="the CRL file (replaced atomically)")
    crl.add_argument("--days", type=int, default=DEFAULT_CRL_DAYS,
                     help=f"its validity (default {DEFAULT_CRL_DAYS}, at most {MAX_CRL_DAYS}): "
                          "the broker refuses every client once it expires")
    crl.add_argument("--json", action="store_true", help="print one JSON object")

    lst = csub.add_parser("list", help="the certificates issued, newest first")
    db_arg(lst)
    lst.add_argument("--gw", metavar="ID", help="only this gateway's")
    lst.add_argument("--json", action="store_true", help="one JSON object a line")

    iss = csub.add_parser("issue", help="a certificate for the platform's own: the broker "
                                        "(--server), the enrolment service, a consumer")
    _ca_dir_arg(iss)
    db_arg(iss)
    iss.add_argument("--cn", required=True, help="platform-enrolment, platform-verifier, or "
                                                 "the broker's host name with --server")
    iss.add_argument("--server", action="store_true", help="a broker's server certificate")
    iss.add_argument("--san", action="append", default=[], metavar="NAME",
                     help="a DNS name or IP address of the broker (repeat)")
    iss.add_argument("--out", required=True, type=Path, metavar="DIR",
                     help="where CN.crt and CN.key (mode 0600) go (never replaced)")
    iss.add_argument("--days", type=int, default=DEFAULT_CERT_DAYS,
                     help=f"validity, days (default {DEFAULT_CERT_DAYS})")
    iss.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_ca(args: argparse.Namespace) -> int:
    private_umask()
    action: Callable[[argparse.Namespace], int] = {
        "init": _init, "sign": _sign, "claim": _claim, "revoke": _revoke, "crl": _crl,
        "list": _list, "issue": _issue}[args.action]
    return action(args)


def _init(args: argparse.Namespace) -> int:
    authority = init_ca(args.ca_dir, args.name, days=args.days)
    out: dict[str, JSON] = {"ca_dir": str(args.ca_dir), "ca": str(args.ca_dir / CA_CERT),
                            "crl": str(args.ca_dir / CRL_FILE),
                            "fingerprint": authority.fingerprint,
                            "not_after": _iso(_ms(authority.cert.not_valid_after_utc))}
    _print(args, out, f"CA {args.name!r} made in {args.ca_dir}; its SHA-256 fingerprint "
                      f"{authority.fingerprint} (publish it: installers check answers with "
                      f"--ca-fingerprint); the broker's cafile is {out['ca']}, its crlfile "
                      f"{out['crl']}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    if (args.dir is None) == (args.request is None):
        raise CaError("give the request's directory (ca sign DIR) or --request F [--out DIR]")
    path = args.request or args.dir / REQUEST_FILE
    out_dir = args.out or (args.dir if args.dir is not None else path.parent)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_REQUEST_BYTES + 1)
    except OSError as exc:
        raise CaError(f"{path}: cannot read the request ({exc.strerror or exc}): give the "
                      "directory 'provision enrol --request-out' wrote") from None
    authority = load_ca(args.ca_dir)
    with _open(args, create=True) as db:
        try:
            issued = sign_request(db, authority, data, require_claim=False,
                                  command_keys=args.command_keys, days=args.days)
        except EnrolmentError as exc:
            raise CaError(f"{path}: refused ({exc.reason}): {exc}") from None
    target = out_dir / ANSWER_FILE
    try:
        durable.make_dirs(out_dir, 0o755)
        durable.atomic_write(target, issued.answer, 0o644)
    except OSError as exc:
        raise CaError(f"{target}: cannot write the answer ({exc})") from None
    out = {**issued.to_json(), "answer": str(target), "ca_fingerprint": authority.fingerprint}
    _print(args, out, f"gateway {issued.request.gateway_id} (identity {issued.request.kid}) "
                      f"{'enrolled' if issued.enrolled else 'already enrolled'}; certificate "
                      f"{issued.serial} until {_iso(issued.not_after_ms)}"
                      f"{'' if issued.new else ' (issued before for this request)'}; "
                      + (f"{len(issued.files)} command files"
                         if issued.files or args.command_keys is not None else
                         "NO command keys (--command-keys DIR not given): the gateway will "
                         "accept no platform command; sign again with --command-keys "
                         "(docs/command-keys.md)")
                      + f"; answer written to {target}")
    return 0


def _claim(args: argparse.Namespace) -> int:
    with _open(args, create=True) as db:
        if args.cancel_open:
            n = cancel_open_claims(db)
            _print(args, {"cancelled": n}, f"{n} open claim tokens expired now")
            return 0
        if args.out is not None and args.out.exists():
            raise CaError(f"--out {args.out} exists: never replaced (give a new file)")
        claim = new_claim(db, ttl_s=parse_ttl(args.ttl), gateway_id=args.gw, by=args.by)
    out: dict[str, JSON] = {"claim_id": claim.claim_id, "expires": _iso(claim.expires_ms),
                            "gw": claim.gateway_id}
    if args.out is not None:
        durable.atomic_write(args.out, claim.token.encode() + b"\n", 0o600)
        out["out"] = str(args.out)
        _print(args, out, f"claim token {claim.claim_id} written to {args.out} (mode 0600); "
                          f"valid once until {out['expires']}")
        return 0
    out["token"] = claim.token
    _print(args, out, f"{claim.token}\n(claim {claim.claim_id}: valid once, until "
                      f"{out['expires']}{', for ' + claim.gateway_id if claim.gateway_id else ''};"
                      " give it to the installer: 'provision enrol --claim -' reads it)")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _open(args, create=False) as db:
        serials = revoke(db, gateway_id=args.gw, serial=args.serial, reason=args.reason)
    out: dict[str, JSON] = {"gw": args.gw, "serial": args.serial, "revoked": list(serials),
                            "reason": args.reason}
    _print(args, out, f"{'gateway ' + args.gw + ' revoked' if args.gw else 'certificate'}; "
                      f"certificates revoked now: {', '.join(serials) or 'none'}; write the "
                      "CRL for the broker: ingest ca crl --ca-dir DIR --db URL --out FILE")
    return 0


def _crl(args: argparse.Namespace) -> int:
    authority = load_ca(args.ca_dir)
    with _open(args, create=False) as db:
        n = write_crl(db, authority, args.out, days=args.days)
    out: dict[str, JSON] = {"out": str(args.out), "revoked": n,
                            "next_update": _iso(now_ms() + args.days * DAY_MS)}
    _print(args, out, f"CRL written to {args.out}: {n} revoked certificates; valid until "
                      f"{out['next_update']} (write it again before; then reload the broker)")
    return 0


def _list(args: argparse.Namespace) -> int:
    with _open(args, create=False) as db:
        rows = certificates(db, args.gw)
    if not rows and not args.json:
        print("no certificate issued")
    for row in rows:
        if args.json:
            print(json.dumps(row, sort_keys=True))
            continue
        revoked_at = row["revoked_at"]
        state = (f"revoked {_iso(int(revoked_at))} ({row['revoke_reason']})"
                 if isinstance(revoked_at, int) else "valid")
        print(f"{row['serial']}  {row['cn']}  until {_iso(int(str(row['not_after'])))}  {state}")
    return 0


def _issue(args: argparse.Namespace) -> int:
    authority = load_ca(args.ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    crt, key_path = args.out / f"{args.cn}.crt", args.out / f"{args.cn}.key"
    for path in (crt, key_path):
        if path.exists():
            raise CaError(f"{path} exists: never replaced (give another --out)")
    with _open(args, create=True) as db:
        cert = issue_platform(db, authority, args.cn, key.public_key(), days=args.days,
                              server=args.server, sans=args.san)
    durable.make_dirs(args.out, 0o700)
    durable.atomic_write(key_path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                                     NoEncryption()), 0o600)
    durable.atomic_write(crt, cert.public_bytes(Encoding.PEM), 0o644)
    out: dict[str, JSON] = {"cn": args.cn, "cert": str(crt), "key": str(key_path),
                            "serial": format(cert.serial_number, "x"),
                            "fingerprint": fingerprint(cert)}
    _print(args, out, f"certificate {out['serial']} for {args.cn}: {crt}, key {key_path} "
                      "(mode 0600)")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"ca": _cmd_ca}
