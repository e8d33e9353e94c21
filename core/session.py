"""Certificates inside records: session keys and identity rotations (docs/records.md).

The gateway's **identity key** (in a TPM, or a file on hardware without one) signs only
certificates; records are signed by a **session key** made in RAM at each start and
never written anywhere. A ``key.session`` record carries the session key's certificate,
signed by the identity key; a ``key.rotate`` record carries the next identity key's
certificate, signed by the current identity key. The platform trusts a session key only
through the identity key it registered for that gateway, and only for that gateway, that
boot, from that seq on, up to that monotonic time, until the next ``key.session``.

A certificate is ``{"cert": claims, "cert_sig": b64u(signature)}``; the signature is over
the canonical bytes of *claims* by the identity key named in them. ``claims["type"]``
(``session`` or ``identity``) keeps one kind of certificate from passing for the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.record import JSON, b64u, canonical, unb64u
from core.suites import SIGNATURE_ALGS, Signer, Verifier, key_id

SESSION_KIND = "key.session"
ROTATE_KIND = "key.rotate"
#: A session key signs for at most this long (monotonic time); the gateway renews it
#: well before (app.assembly.SESSION_RENEW_S).
SESSION_LIFETIME_MS = 8 * 24 * 3600 * 1000
KEY_CLASSES = ("tpm", "file")


class CertificateError(ValueError):
    """A certificate that is malformed or not signed by the key it names; ``reason`` is
    a short word for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Who signed a certificate: an identity key, its algorithm and its class."""

    kid: str
    alg: str
    key_class: str

    def to_json(self) -> dict[str, JSON]:
        return {"kid": self.kid, "alg": self.alg, "class": self.key_class}


@dataclass(frozen=True, slots=True)
class SessionCert:
    gateway_id: str
    alg: str
    public_raw: bytes
    kid: str
    boot: int
    from_seq: int
    until_mono: int
    identity: KeyRef


@dataclass(frozen=True, slots=True)
class IdentityCert:
    gateway_id: str
    alg: str
    public_raw: bytes
    kid: str
    key_class: str
    from_seq: int
    by: KeyRef


def _signed(claims: dict[str, JSON], signer: Signer) -> dict[str, JSON]:
    return {"cert": claims, "cert_sig": b64u(signer.sign(canonical(claims)))}


def session_body(*, gateway_id: str, session: Signer, boot: int, from_seq: int,
                 until_mono: int, identity: Signer, identity_class: str) -> dict[str, JSON]:
    """The body of a ``key.session`` record: *session* certified by *identity*."""
    claims: dict[str, JSON] = {
        "type": "session", "gw": gateway_id, "alg": session.alg,
        "key": b64u(session.public_raw), "kid": key_id(session.alg, session.public_raw),
        "boot": boot, "from_seq": from_seq, "until_mono": until_mono,
        "identity": KeyRef(key_id(identity.alg, identity.public_raw), identity.alg,
                           identity_class).to_json(),
    }
    return _signed(claims, identity)


def rotation_body(*, gateway_id: str, new: Signer, new_class: str, from_seq: int,
                  current: Signer, current_class: str) -> dict[str, JSON]:
    """The body of a ``key.rotate`` record: the next identity key certified by the current."""
    claims: dict[str, JSON] = {
        "type": "identity", "gw": gateway_id, "alg": new.alg,
        "key": b64u(new.public_raw), "kid": key_id(new.alg, new.public_raw),
        "class": new_class, "from_seq": from_seq,
        "by": KeyRef(key_id(current.alg, current.public_raw), current.alg,
                     current_class).to_json(),
    }
    return _signed(claims, current)


def _field(claims: Mapping[str, JSON], name: str, kind: type) -> JSON:
    value = claims.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CertificateError("malformed", f"certificate field {name!r} missing or not "
                               f"{kind.__name__}")
    return value


def _keyref(value: JSON) -> KeyRef:
    if not isinstance(value, dict):
        raise CertificateError("malformed", "the signer of a certificate is not an object")
    ref = KeyRef(str(_field(value, "kid", str)), str(_field(value, "alg", str)),
                 str(_field(value, "class", str)))
    if ref.alg not in SIGNATURE_ALGS or ref.key_class not in KEY_CLASSES:
        raise CertificateError("malformed", f"signer algorithm {ref.alg!r} or class "
                               f"{ref.key_class!r} unknown")
    return ref


def _public(claims: Mapping[str, JSON]) -> tuple[str, bytes, str]:
    alg = str(_field(claims, "alg", str))
    if alg not in SIGNATURE_ALGS:
        raise CertificateError("malformed", f"certified algorithm {alg!r} unknown")
    key_text = str(_field(claims, "key", str))
    try:
        raw = unb64u(key_text)
    except ValueError as exc:
        raise CertificateError("malformed", f"certificate field 'key': {exc}") from None
    try:
        Verifier(alg, raw)
    except ValueError:
        raise CertificateError("malformed", f"the certified key is no {alg} key") from None
    kid = str(_field(claims, "kid", str))
    if kid != key_id(alg, raw):
        raise CertificateError("malformed", "the certified key id does not match its key")
    return alg, raw, kid


def read_certificate(body: JSON, expected_type: str) -> tuple[dict[str, JSON], bytes]:
    """The claims and the signature of a certificate body, shape-checked only."""
    if not isinstance(body, dict) or not isinstance(body.get("cert"), dict):
        raise CertificateError("malformed", "no certificate in the body")
    claims: dict[str, JSON] = body["cert"]
    if claims.get("type") != expected_type:
        raise CertificateError("malformed", f"certificate type {claims.get('type')!r}, "
                               f"expected {expected_type!r}")
    sig_text = str(_field(body, "cert_sig", str))
    try:
        sig = unb64u(sig_text)
    except ValueError as exc:
        raise CertificateError("malformed", f"certificate signature: {exc}") from None
    return claims, sig


def parse_session(body: JSON) -> tuple[SessionCert, bytes, bytes]:
    """(certificate, signature, signed bytes) of a ``key.session`` body; not yet verified."""
    claims, sig = read_certificate(body, "session")
    alg, raw, kid = _public(claims)
    cert = SessionCert(str(_field(claims, "gw", str)), alg, raw, kid,
                       int(_field(claims, "boot", int)),
                       int(_field(claims, "from_seq", int)),
                       int(_field(claims, "until_mono", int)),
                       _keyref(claims.get("identity")))
    return cert, sig, canonical(claims)


def parse_identity(body: JSON) -> tuple[IdentityCert, bytes, bytes]:
    """(certificate, signature, signed bytes) of a ``key.rotate`` body; not yet verified."""
    claims, sig = read_certificate(body, "identity")
    alg, raw, kid = _public(claims)
    key_class = str(_field(claims, "class", str))
    if key_class not in KEY_CLASSES:
        raise CertificateError("malformed", f"key class {key_class!r} unknown")
    cert = IdentityCert(str(_field(claims, "gw", str)), alg, raw, kid, key_class,
                        int(_field(claims, "from_seq", int)),
                        _keyref(claims.get("by")))
    return cert, sig, canonical(claims)
