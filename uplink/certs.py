"""The uplink's TLS files checked before they are used (sans-IO but for :func:`read_tls_files`).

Given the bytes of the configured CA file, client certificate and key, the gateway id,
and the time now with whether it is trusted (NTP or GNSS, core/clock.py), the check
returns :class:`Finding` s, each saying what is wrong and what to do:

- **errors** (the uplink refuses to connect; ``provision check`` fails): a file that
  cannot be read or holds no PEM certificate / key, a key protected by a passphrase,
  a key that does not match the certificate, a certificate whose common name (CN) is
  not the gateway id (the broker names the gateway by its CN: every record would be
  refused by its ACL), an expired certificate, a CA file holding no CA certificate
  (basicConstraints), an expired CA, and a certificate not yet valid **by trusted time**;
- **deferred**: a certificate not yet valid by a clock that is not synchronised (a
  Raspberry Pi has no RTC: after a power cut it runs behind until NTP or GNSS answers).
  The uplink goes on; the check says so once and is made again, and becomes an error
  only if trusted time confirms it;
- **warnings**: the certificate expires within :data:`EXPIRY_WARNING_DAYS`; it was not
  issued by a CA of the CA file (the CA file authenticates the broker: a province may
  use another CA for its broker's certificate, so this alone does not stop the uplink;
  if the broker does not trust the issuer, the connection failure says so).

An expired certificate is an error whatever the clock: a clock without an RTC runs
behind, never ahead, so a certificate it finds expired has expired.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID

__all__ = ["EXPIRY_WARNING_DAYS", "MAX_PEM_BYTES", "CertProblem", "CertReport", "Finding",
           "Severity", "TlsFiles", "check_certificates", "read_tls_files", "unusable"]

#: A certificate expiring within this many days is a warning.
EXPIRY_WARNING_DAYS = 30
#: Larger files are not read (a certificate chain is a few KiB).
MAX_PEM_BYTES = 1 << 20
#: How many certificates of the certificate file are followed up to the CA file's CA.
MAX_CHAIN = 8
_MS_PER_DAY = 86_400_000


class Severity(enum.StrEnum):
    ERROR = "error"  # the uplink refuses to connect
    DEFERRED = "deferred"  # an error only if trusted time confirms it
    WARNING = "warning"  # said, and the uplink goes on


class CertProblem(enum.StrEnum):
    """The reason codes (in the ``uplink.refused`` record, and in ``--json`` reports)."""

    CA_UNREADABLE = "ca_unreadable"
    CA_NOT_PEM = "ca_not_pem"
    CA_NOT_CA = "ca_not_ca"
    CA_EXPIRED = "ca_expired"
    CA_NOT_YET_VALID = "ca_not_yet_valid"
    CERT_UNREADABLE = "cert_unreadable"
    CERT_NOT_PEM = "cert_not_pem"
    KEY_UNREADABLE = "key_unreadable"
    KEY_NOT_PEM = "key_not_pem"
    KEY_ENCRYPTED = "key_encrypted"
    KEY_MISMATCH = "key_mismatch"
    CN_MISMATCH = "cn_mismatch"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRES_SOON = "expires_soon"
    NOT_ISSUED_BY_CA = "not_issued_by_ca"
    #: OpenSSL would not load files the check found usable (seen when they are used)
    TLS_UNUSABLE = "tls_unusable"



@dataclass(frozen=True, slots=True)
class Finding:
    code: CertProblem
    severity: Severity
    #: What is wrong, naming the file.
    what: str
    #: What to do about it.
    todo: str

    @property
    def line(self) -> str:
        """One line for people: what is wrong, then what to do."""
        return f"{self.what}: {self.todo}"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The three files as read: their bytes, or why they could not be read."""

    ca_path: str
    cert_path: str
    key_path: str
    ca: bytes | str  # str: the reason the file could not be read
    cert: bytes | str
    key: bytes | str

    @property
    def digest(self) -> str:
        """Changes when any of the files changes (a renewed certificate)."""
        h = hashlib.sha256()
        for part in (self.ca, self.cert, self.key):
            data = part if isinstance(part, bytes) else b"!" + part.encode()
            h.update(len(data).to_bytes(8, "big") + data)
        return h.hexdigest()


def read_tls_files(ca_path: str | None, cert_path: str | None,
                   key_path: str | None) -> TlsFiles:
    """Read the three files (at most :data:`MAX_PEM_BYTES` each); a failure is kept as text."""
    return TlsFiles(ca_path or "", cert_path or "", key_path or "",
                    *(_read(p) for p in (ca_path, cert_path, key_path)))


def _read(path: str | None) -> bytes | str:
    if not path:
        return "not configured in [broker]"
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        return exc.strerror or str(exc)
    if len(data) > MAX_PEM_BYTES:
        return f"larger than {MAX_PEM_BYTES} bytes"
    return data


@dataclass(frozen=True, slots=True)
class CertReport:
    findings: tuple[Finding, ...]
    #: The client certificate's SHA-256 fingerprint (hex), when it could be read.
    fingerprint: str | None = None
    #: Its validity, UTC milliseconds, when it could be read.
    not_before_ms: int | None = None
    not_after_ms: int | None = None

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    @property
    def refuse(self) -> bool:
        """Whether the uplink must not connect with these files."""
        return bool(self.errors)


def check_certificates(files: TlsFiles, gateway_id: str, *, now_ms: int,
                       trusted: bool) -> CertReport:
    """Check the files as they would be used by a gateway *gateway_id* at *now_ms* (UTC),
    *trusted* when that time comes from NTP or GNSS."""
    out: list[Finding] = []
    cas = _ca_certificates(files, out, now_ms, trusted)
    chain = _certificates(files, out)
    key = _key(files, out)
    if not chain:
        return CertReport(tuple(out))
    cert = chain[0]
    name = files.cert_path
    if key is not None and _spki(key.public_key()) != _spki(cert.public_key()):
        out.append(Finding(
            CertProblem.KEY_MISMATCH, Severity.ERROR,
            f"the key {files.key_path} does not belong to the certificate {name}",
            "install the key the certificate was issued for, or a certificate issued for "
            "this key (cert_file and key_file in [broker])"))
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [gateway_id]:
        held = f"is for {cns[0]!r} (its CN)" if cns else "has no common name (CN)"
        out.append(Finding(
            CertProblem.CN_MISMATCH, Severity.ERROR,
            f"the certificate {name} {held}, not this gateway {gateway_id!r}: the broker "
            "would take it for another gateway and refuse every record",
            f"install the certificate issued for {gateway_id} (its CN must be the gateway id)"))
    out.extend(_validity(cert, name, now_ms, trusted, ca=False))
    if cas and not _issued_by(chain, cas):
        out.append(Finding(
            CertProblem.NOT_ISSUED_BY_CA, Severity.WARNING,
            f"the certificate {name} was not issued by a CA of {files.ca_path}",
            "the broker refuses it unless it trusts its issuer: install the certificate "
            "issued by the platform's CA (unless your broker's CA differs on purpose)"))
    return CertReport(tuple(out), cert.fingerprint(hashes.SHA256()).hex(),
                      _ms(cert.not_valid_before_utc), _ms(cert.not_valid_after_utc))


def _ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def _day(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _pem_certificates(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []


def _ca_certificates(files: TlsFiles, out: list[Finding], now_ms: int,
                     trusted: bool) -> list[x509.Certificate]:
    path = files.ca_path
    if isinstance(files.ca, str):
        out.append(Finding(CertProblem.CA_UNREADABLE, Severity.ERROR,
                           f"the CA file {path} cannot be read ({files.ca})",
                           "install the platform's CA certificate there, readable by the "
                           "gateway's user (ca_file in [broker])"))
        return []
    found = _pem_certificates(files.ca)
    if not found:
        out.append(Finding(CertProblem.CA_NOT_PEM, Severity.ERROR,
                           f"the CA file {path} holds no PEM certificate",
                           "install the platform's CA certificate there (PEM: "
                           "-----BEGIN CERTIFICATE-----)"))
        return []
    cas = [c for c in found if _is_ca(c)]
    if not cas:
        out.append(Finding(CertProblem.CA_NOT_CA, Severity.ERROR,
                           f"the CA file {path} holds no CA certificate (basicConstraints "
                           "CA:TRUE): it cannot authenticate the broker",
                           "install the platform's CA certificate as ca_file (not the "
                           "gateway's or the broker's own certificate)"))
        return []
    for ca in cas:
        out.extend(_validity(ca, path, now_ms, trusted, ca=True))
    return cas


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _certificates(files: TlsFiles, out: list[Finding]) -> list[x509.Certificate]:
    path = files.cert_path
    if isinstance(files.cert, str):
        out.append(Finding(CertProblem.CERT_UNREADABLE, Severity.ERROR,
                           f"the certificate {path} cannot be read ({files.cert})",
                           "install this gateway's client certificate there, readable by "
                           "the gateway's user (cert_file in [broker])"))
        return []
    chain = _pem_certificates(files.cert)
    if not chain:
        out.append(Finding(CertProblem.CERT_NOT_PEM, Severity.ERROR,
                           f"the certificate {path} holds no PEM certificate",
                           "install this gateway's client certificate there (PEM: "
                           "-----BEGIN CERTIFICATE-----)"))
    return chain


def _key(files: TlsFiles, out: list[Finding]) -> PrivateKeyTypes | None:
    path = files.key_path
    if isinstance(files.key, str):
        out.append(Finding(CertProblem.KEY_UNREADABLE, Severity.ERROR,
                           f"the key {path} cannot be read ({files.key})",
                           "install the certificate's private key there, mode 600, owned by "
                           "the gateway's user (key_file in [broker])"))
        return None
    try:
        return load_pem_private_key(files.key, password=None)
    except TypeError:  # encrypted: the daemon cannot type a passphrase
        out.append(Finding(CertProblem.KEY_ENCRYPTED, Severity.ERROR,
                           f"the key {path} is protected by a passphrase",
                           f"store it without one, mode 600 ('openssl pkey -in {path} -out "
                           "NEW' asks for the passphrase once)"))
    except (ValueError, UnsupportedAlgorithm):
        out.append(Finding(CertProblem.KEY_NOT_PEM, Severity.ERROR,
                           f"the key {path} holds no usable PEM private key",
                           "install the certificate's private key there (PEM: -----BEGIN "
                           "PRIVATE KEY-----)"))
    return None


def _validity(cert: x509.Certificate, path: str, now_ms: int, trusted: bool, *,
              ca: bool) -> list[Finding]:
    what = f"the CA certificate in {path}" if ca else f"the certificate {path}"
    renew = ("install the platform's current CA certificate" if ca else
             "install a renewed certificate for this gateway (the uplink takes it within "
             "a minute, no restart needed)")
    before, after = _ms(cert.not_valid_before_utc), _ms(cert.not_valid_after_utc)
    if now_ms > after:
        return [Finding(CertProblem.CA_EXPIRED if ca else CertProblem.EXPIRED, Severity.ERROR,
                        f"{what} expired on {_day(after)}", renew)]
    if now_ms < before:
        code = CertProblem.CA_NOT_YET_VALID if ca else CertProblem.NOT_YET_VALID
        if trusted:
            return [Finding(code, Severity.ERROR,
                            f"{what} is not valid before {_day(before)} (by trusted time)",
                            "install a certificate valid now, or check the issuing CA's "
                            "clock")]
        return [Finding(code, Severity.DEFERRED,
                        f"{what} is not valid before {_day(before)} by this clock, which is "
                        "not synchronised yet (no NTP or GNSS time)",
                        "nothing to do if the clock is behind: checked again once the time "
                        "is trusted; meanwhile the uplink goes on")]
    if not ca and after - now_ms < EXPIRY_WARNING_DAYS * _MS_PER_DAY:
        days = (after - now_ms) // _MS_PER_DAY
        return [Finding(CertProblem.EXPIRES_SOON, Severity.WARNING,
                        f"{what} expires on {_day(after)} (in {days} days)", renew)]
    return []


def _issued_by(chain: list[x509.Certificate], cas: list[x509.Certificate]) -> bool:
    """Whether the leaf chains up to one of *cas* through the certificate file's others."""
    current = chain[0]
    for _ in range(MAX_CHAIN):
        if any(_signed(current, ca) for ca in cas):
            return True
        parent = next((c for c in chain[1:] if c is not current and _signed(current, c)),
                      None)
        if parent is None:
            return False
        current = parent
    return False


def _signed(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def unusable(detail: str) -> CertReport:
    """The report of TLS files that passed the check but that OpenSSL did not load."""
    return CertReport((Finding(CertProblem.TLS_UNUSABLE, Severity.ERROR,
                               f"the TLS files cannot be loaded ({detail})",
                               "check ca_file, cert_file and key_file in [broker] (PEM, "
                               "the key without a passphrase)"),))
