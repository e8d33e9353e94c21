"""A small X.509 authority for the demo, the tests and lab installs.

Production gateways get their client certificate from the platform's CA (the
installer's enrolment step); this module makes a throwaway CA, a broker server
certificate for loopback, and client certificates whose common name is the
gateway id (the broker maps it to the MQTT user name for its ACL).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.identity import atomic_write


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_authority(cn: str = "SmartCorr test CA", days: int = 3650) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def issue(
    ca: Authority, cn: str, *, server: bool = False, days: int = 397
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
            critical=False,
        )
    return key, builder.sign(ca.key, hashes.SHA256())


def write_pem(directory: Path, name: str, key: ec.EllipticCurvePrivateKey,
              cert: x509.Certificate) -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = CertFiles(directory / f"{name}.crt", directory / f"{name}.key")
    atomic_write(files.cert, cert.public_bytes(Encoding.PEM), 0o644)
    atomic_write(files.key, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return files


def write_ca(directory: Path, ca: Authority, name: str = "ca") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.crt"
    atomic_write(path, ca.cert.public_bytes(Encoding.PEM), 0o644)
    return path


def issue_to(directory: Path, ca: Authority, cn: str, *, server: bool = False) -> CertFiles:
    key, cert = issue(ca, cn, server=server)
    return write_pem(directory, cn, key, cert)


# -- certificates that are wrong on purpose (the uplink's certificate check, its tests) -----
def issue_custom(
    ca: Authority, cn: str | None, *, not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None, key: ec.EllipticCurvePrivateKey | None = None,
    names: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A client certificate as :func:`issue` makes one, but with the validity, the CN (None:
    no CN at all) and the key given; with *names*, a server certificate for those DNS names
    and addresses only (e.g. a broker certificate that is not for the host dialled)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]) if cn is None else _name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=397))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n)
                                                                     for n in names]),
                                        critical=False)
    return key, builder.sign(ca.key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_not_a_ca(cn: str = "SmartCorr not a CA") -> Authority:
    """A self-signed certificate without CA:TRUE: a "CA file" that cannot authenticate
    anyone (someone installed an end-entity certificate as ca_file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)
