"""The platform's trust rules, once (docs/records.md, "What the platform checks").

Sans-IO: given what the platform already trusts for a gateway (its identities, a session
certificate), each function decides about one record and raises
:class:`central.record.RecordError` with the reason, or :class:`HoldError` when the
record's key may be certified by a record still on its way. The in-memory verifier
(:mod:`central.verifier`) and the persistent ingest (:mod:`central.ingest`) keep their
state their own way and call these for every decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from central.record import RecordError, VerifiedRecord
from core.head import Head
from core.record import JSON
from core.session import (
    CertificateError,
    IdentityCert,
    SessionCert,
    parse_identity,
    parse_session,
)
from core.suites import Verifier as PublicKey
from core.suites import digest


class HoldError(Exception):
    """The record's key is not (yet) certified: hold it until a certificate arrives."""


@dataclass(frozen=True)
class TrustedIdentity:
    """An identity key of a gateway: the registered one (``from_seq`` 0) or one a
    ``key.rotate`` certified; it certifies sessions from ``from_seq`` to the next one's."""

    from_seq: int
    kid: str
    key: PublicKey
    key_class: str


def identity_at(identities: Sequence[TrustedIdentity], kid: str,
                seq: int) -> TrustedIdentity | None:
    """The identity *kid* if it was the gateway's at *seq* (*identities* by from_seq)."""
    for i, ident in enumerate(identities):
        until = identities[i + 1].from_seq if i + 1 < len(identities) else None
        if ident.kid == kid and ident.from_seq <= seq and (until is None or seq < until):
            return ident
    return None


def session_certificate(rec: dict[str, JSON], seq: int,
                        identities: Sequence[TrustedIdentity]
                        ) -> tuple[SessionCert, TrustedIdentity]:
    """A ``key.session`` record's certificate, checked: its claims are the record's (gw,
    boot, from_seq = seq, kid, alg) and it is signed by the identity that was the
    gateway's at that seq. The caller then verifies the record with the certified key."""
    try:
        cert, sig, signed = parse_session(rec["body"])
    except CertificateError as exc:
        raise RecordError("malformed", f"key.session: {exc}") from None
    gw = rec["gw"]
    if (cert.gateway_id, cert.boot, cert.from_seq, cert.kid, cert.alg) != \
            (gw, rec["boot"], seq, rec["kid"], rec["alg"]):
        raise RecordError("forged_certificate", f"key.session at seq {seq} of {gw}: "
                          "its certificate is for another gateway, boot, seq or key")
    ident = identity_at(identities, cert.identity.kid, seq)
    if ident is None:
        if any(i.kid == cert.identity.kid for i in identities):
            raise RecordError("forged_certificate", f"key.session at seq {seq}: identity "
                              f"{cert.identity.kid} was not the gateway's at that seq")
        raise HoldError  # perhaps certified by a rotation still on its way
    if not ident.key.verify(sig, signed):
        raise RecordError("forged_certificate", f"key.session at seq {seq} of {gw} is "
                          f"not signed by identity {ident.kid}")
    return cert, ident


def check_validity(rec: dict[str, JSON], seq: int, *, boot: int, from_seq: int,
                   until_mono: int, superseded_at: int | None) -> None:
    """A record signed by a session key is inside what its certificate says: that boot,
    seq from ``from_seq`` until the next ``key.session`` (*superseded_at*), mono up to
    ``until_mono``."""
    gw = rec["gw"]
    if rec["boot"] != boot or seq < from_seq or \
            int(rec["mono"]) > until_mono:
        raise RecordError("out_of_validity", f"seq {seq} of {gw}: its session key is "
                          f"certified for boot {boot}, seq >= {from_seq}, "
                          f"mono <= {until_mono}")
    if superseded_at is not None and superseded_at <= seq:
        raise RecordError("out_of_validity", f"seq {seq} of {gw}: signed by a session "
                          f"key superseded at seq {superseded_at}")


def check_head(head: Head, key: PublicKey, boot: int, before: bytes | None = None) -> bool:
    """A head statement is signed by the session key it names (*key*, certified for its
    gateway and for *boot*); ``bad_signature`` otherwise. With *before* (the bytes of its
    message before it), True if the head covers them (``covers``: then its signature
    signs every line of them), False if it has no ``covers``; ``bad_signature`` if it
    covers other bytes (a line of the message changed, removed, added or moved)."""
    if boot != head.boot or key.alg != head.alg or not key.verify(head.sig, head.signed):
        raise RecordError("bad_signature", f"head of {head.gateway_id} not signed by its "
                          f"session key {head.kid} of boot {head.boot}")
    if before is None or head.covers is None:
        return False
    if digest(head.alg, before) != head.covers:
        raise RecordError("bad_signature", f"head of {head.gateway_id} covers other bytes "
                          "than those of its message: a line was changed, removed, added "
                          "or moved")
    return True


def rotation_certificate(rec: VerifiedRecord,
                         identities: Sequence[TrustedIdentity]) -> IdentityCert:
    """The next identity a verified ``key.rotate`` certifies, checked: for this gateway,
    from this seq, signed by the identity that was the gateway's at that seq. Raises
    :class:`RecordError` (``malformed`` or ``forged_certificate``): the record stays
    evidence, its key is not trusted."""
    try:
        cert, sig, signed = parse_identity(rec.record["body"])
    except CertificateError as exc:
        raise RecordError("malformed", f"key.rotate at seq {rec.seq}: {exc}") from None
    current = identity_at(identities, cert.by.kid, rec.seq)
    if cert.gateway_id != rec.gateway_id or cert.from_seq != rec.seq or current is None \
            or not current.key.verify(sig, signed):
        raise RecordError("forged_certificate", f"key.rotate at seq {rec.seq} of "
                          f"{rec.gateway_id} is not certified by the gateway's identity")
    return cert
