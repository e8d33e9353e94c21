"""Certificates that renew themselves (docs/enrolment.md, "Renewal"): the gateway's side.

The gateway's TLS client certificate is renewed over the enrolment channel before it
expires. The pieces, from the daemon's task (``app/renewal.py``) and ``provision renew``:

* **when** (:class:`Schedule`, sans-IO: fed with the certificate, the UTC time with whether
  it is trusted, and the monotonic time): a renewal is due once the certificate has less
  than :attr:`RenewalPolicy.lead_ms` of its life left: :data:`DEFAULT_RENEW_BEFORE_DAYS`
  days, or the last :data:`DEFAULT_LIFE_SHARE` of its life for a short one (``[enrolment]``
  of gateway.toml). A failed attempt is tried again after a backoff that doubles from
  :data:`RETRY_MIN_S` up to :data:`RETRY_MAX_S`, jittered (a province's gateways do not ask
  in step). Only trusted time (NTP, GNSS: core/clock.py) decides anything: a Raspberry Pi
  without its RTC, before NTP answers, neither renews nor concludes that renewal can wait;
  it waits for trusted time. The same schedule says when to warn (:data:`WARNINGS`): at 30
  days left (``cert.expiring``, status class) and at 7 (``cert.expiring_soon``, alarm
  class: a week from a gateway that delivers nothing, alarms included), once per threshold
  and certificate, when renewal has not succeeded by then: it failed at least once (the
  platform refused, no answer, no uplink), or it is off. A certificate renewing as it
  should never warns, however short its life.
* **the request** (:func:`new_request`): a new TLS key (P-256, in RAM), its CSR, a
  request of type ``renew`` naming the current certificate's serial, signed by the current
  TLS key and by the identity key (:mod:`core.enrolment`). The new key replaces the old
  one only with the answer's certificate, in one installation (:func:`install`,
  :func:`provisioning.identity.install_files`: staged files, an intent, renames): a power
  cut at any instant leaves the old pair or the new pair, never a key without its
  certificate. A key lost with the power costs one certificate the platform issued for
  nothing (the old pair still works; the next request makes a new key).
* **the answer** (:func:`check`): the checks of enrolment (:func:`provisioning.enrol.check_answer`)
  for the new key, the CA the gateway already trusts (a renewal never changes CA), the
  request id, and the command material merged into the keyring held
  (:func:`provisioning.enrol.command_key_changes`).
* **the channel**: the daemon asks over its uplink's own connection (its client id is its
  certificate's CN: a second connection would take the uplink's session); ``provision
  renew`` asks the running daemon (:func:`ask_daemon`: a request file in the data
  directory, the daemon's progress in :data:`STATE_FILE`), or, when no daemon runs,
  connects itself with the current certificate (:func:`renew_direct`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID

from core import durable
from core.enrolment import (
    MAX_ANSWER_BYTES,
    RENEW,
    EnrolmentError,
    kid_extension,
    make_request,
    new_request_id,
    parse_answer,
)
from core.errors import UserError
from core.mqtt import BrokerConfig, make_client
from provisioning import enrol
from provisioning.actions import file_sha256, record
from provisioning.enrol import Checked, EnrolFailed, Progress
from provisioning.identity import CA_CERT, TLS_CERT, TLS_KEY, Identity
from provisioning.operator import Operator

__all__ = ["DEFAULT_LIFE_SHARE", "DEFAULT_RENEW_BEFORE_DAYS", "RETRY_MAX_S", "RETRY_MIN_S",
           "STATE_FILE", "TRIGGER_FILE", "WARNINGS", "CertInfo", "Pending", "Renew",
           "RenewalPolicy", "Schedule", "Trigger", "Wait", "Warn", "ask_daemon", "check",
           "install", "new_request", "read_state", "renew_direct", "take_trigger",
           "wait_for_daemon", "write_state"]

DAY_MS = 86_400_000
#: Renew from this many days before expiry ...
DEFAULT_RENEW_BEFORE_DAYS = 30.0
#: ... or, for a certificate too short for that, over the last share of its life.
DEFAULT_LIFE_SHARE = 1 / 3
#: A failed attempt is retried after RETRY_MIN_S, doubling up to RETRY_MAX_S, seconds,
#: times a factor drawn in RETRY_JITTER (never past RETRY_MAX_S).
RETRY_MIN_S = 60.0
RETRY_MAX_S = 6 * 3600.0
RETRY_JITTER = (0.5, 1.5)
#: How long an attempt waits for the platform's answer, seconds.
ANSWER_TIMEOUT_S = 120.0
#: The warnings: (days left, record kind), in the order they come.
WARNINGS = ((30, "cert.expiring"), (7, "cert.expiring_soon"))
#: The store's ledger entries saying a warning was committed (one per threshold and
#: certificate: ``cert.warned:<fingerprint>:<days>``), so it is never repeated.
WARNED_PREFIX = "cert.warned:"
#: In the data directory: ``provision renew``'s request to the running daemon, and the
#: daemon's renewal state (both mode 0600, replaced atomically).
TRIGGER_FILE = "renew.request"
STATE_FILE = "renewal.json"
#: The largest request or state file read, bytes.
MAX_FILE_BYTES = 16 * 1024
#: How often ``provision renew`` looks at the daemon's state, seconds.
POLL_S = 0.2


# --- when ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenewalPolicy:
    """``[enrolment]`` of gateway.toml: whether and when the certificate renews itself."""

    enabled: bool = True
    before_days: float = DEFAULT_RENEW_BEFORE_DAYS
    life_share: float = DEFAULT_LIFE_SHARE
    retry_min_s: float = RETRY_MIN_S
    retry_max_s: float = RETRY_MAX_S
    timeout_s: float = ANSWER_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.before_days > 0 or not 0 < self.life_share <= 1:
            raise ValueError("before_days > 0 and 0 < life_share <= 1")
        if not 0 < self.retry_min_s <= self.retry_max_s or not self.timeout_s > 0:
            raise ValueError("0 < retry_min_s <= retry_max_s and timeout_s > 0")

    def lead_ms(self, cert: CertInfo) -> int:
        """How long before its expiry *cert* is renewed."""
        life = max(0, cert.not_after_ms - cert.not_before_ms)
        return int(min(self.before_days * DAY_MS, life * self.life_share))

    def renew_from_ms(self, cert: CertInfo) -> int:
        return cert.not_after_ms - self.lead_ms(cert)


@dataclass(frozen=True)
class CertInfo:
    """What renewal needs of a certificate."""

    serial: str  # hex, as the platform's table and a renewal name it
    fingerprint: str  # SHA-256 of the DER, hex
    not_before_ms: int
    not_after_ms: int

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertInfo:
        return cls(format(cert.serial_number, "x"), cert.fingerprint(hashes.SHA256()).hex(),
                   _ms(cert.not_valid_before_utc), _ms(cert.not_valid_after_utc))

    @classmethod
    def from_pem(cls, data: bytes) -> CertInfo | None:
        """The first certificate of *data* (PEM), None when there is none."""
        try:
            return cls.of(x509.load_pem_x509_certificate(data))
        except ValueError:
            return None

    def to_json(self) -> dict[str, Any]:
        return {"serial": self.serial, "fingerprint": self.fingerprint,
                "not_before": self.not_before_ms, "not_after": self.not_after_ms}


@dataclass(frozen=True)
class Warn:
    """Seal the warning *kind*: *days* is the threshold crossed; *ledger_key* is committed
    with it (never warned again for this certificate)."""

    kind: str
    days: int
    ledger_key: str
    days_left: float


@dataclass(frozen=True)
class Renew:
    """Attempt a renewal now."""


@dataclass(frozen=True)
class Wait:
    """Nothing to do now: *why* (``untrusted_time``, ``not_due``, ``retry``, ``off``) and
    until when, when known (UTC ms for ``not_due``, monotonic ns for ``retry``)."""

    why: str
    until: int | None = None


Action = Warn | Renew | Wait


def warned_key(cert: CertInfo, days: int) -> str:
    return f"{WARNED_PREFIX}{cert.fingerprint}:{days}"


class Schedule:
    """When to renew and when to warn (sans-IO): :meth:`decide` at each look, then
    :meth:`failed` or :meth:`succeeded` after an attempt. The state is for one certificate:
    another one (a renewal done, an enrolment) starts it afresh."""

    def __init__(self, policy: RenewalPolicy, *, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not a secret)
        self.fingerprint: str | None = None
        self.failures = 0
        self.retry_at_ns: int | None = None

    def _follow(self, cert: CertInfo) -> None:
        if cert.fingerprint != self.fingerprint:
            self.fingerprint, self.failures, self.retry_at_ns = cert.fingerprint, 0, None

    def decide(self, cert: CertInfo, utc_ms: int, trusted: bool, mono_ns: int, *,
               warned: Callable[[str], bool]) -> list[Action]:
        """What to do about *cert* at *utc_ms* (*trusted*: from NTP or GNSS) and *mono_ns*;
        *warned* says whether a warning's ledger key is committed already."""
        self._follow(cert)
        if not trusted:
            return [Wait("untrusted_time")]
        renew_from = self.policy.renew_from_ms(cert)
        due = self.policy.enabled and utc_ms >= renew_from
        out: list[Action] = []
        left = cert.not_after_ms - utc_ms
        # warn when renewal has not succeeded in time: it failed, or it is off
        if self.failures or not self.policy.enabled:
            for days, kind in WARNINGS:
                key = warned_key(cert, days)
                if left < days * DAY_MS and not warned(key):
                    out.append(Warn(kind, days, key, max(0, left) / DAY_MS))
        if not self.policy.enabled:
            out.append(Wait("off"))
        elif not due:
            out.append(Wait("not_due", renew_from))
        elif self.retry_at_ns is not None and mono_ns < self.retry_at_ns:
            out.append(Wait("retry", self.retry_at_ns))
        else:
            out.append(Renew())
        return out

    def failed(self, cert: CertInfo, mono_ns: int) -> float:
        """An attempt for *cert* failed: the next one in how many seconds (backoff)."""
        self._follow(cert)
        self.failures += 1
        base = min(self.policy.retry_max_s,
                   self.policy.retry_min_s * float(2 ** min(self.failures - 1, 32)))
        delay = min(self.policy.retry_max_s, base * self._rng.uniform(*RETRY_JITTER))
        self.retry_at_ns = mono_ns + int(delay * 1e9)
        return delay

    def succeeded(self) -> None:
        self.fingerprint, self.failures, self.retry_at_ns = None, 0, None


# --- the request and the answer ----------------------------------------------------------

@dataclass
class Pending:
    """A renewal request and its new TLS key (in RAM until its certificate is installed)."""

    data: bytes
    request_id: str
    key: ec.EllipticCurvePrivateKey
    current: CertInfo
    details: dict[str, Any] = field(default_factory=dict)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def current_certificate(identity: Identity) -> tuple[x509.Certificate,
                                                      ec.EllipticCurvePrivateKey]:
    """The installed certificate and its key; EnrolFailed when they are missing or do not
    belong together (a renewal needs both: the current key signs it)."""
    d = identity.directory
    try:
        cert = x509.load_pem_x509_certificate((d / TLS_CERT).read_bytes())
        key = load_pem_private_key((d / TLS_KEY).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise EnrolFailed("no_certificate", f"{d}: no usable certificate and key to renew "
                          f"({exc}): enrol the gateway ('provision enrol')") from None
    public = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            not isinstance(public, ec.EllipticCurvePublicKey) or \
            key.public_key().public_numbers() != public.public_numbers():
        raise EnrolFailed("wrong_key", f"{d / TLS_KEY} is not the key of {d / TLS_CERT}: "
                          "enrol the gateway again ('provision enrol')")
    return cert, key


def csr_for(key: ec.EllipticCurvePrivateKey, gateway_id: str, kid: str) -> bytes:
    """The CSR (PEM) of *key*: CN the gateway id, the identity key id in its extension."""
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)]))
            .add_extension(kid_extension(kid), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(Encoding.PEM))


def new_request(identity: Identity, *, now_ms: int | None = None) -> Pending:
    """A renewal request with a new TLS key (module docstring); nothing is written."""
    cert, current_key = current_certificate(identity)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = csr_for(key, identity.gateway_id, identity.kid)
    request_id = new_request_id()
    current = CertInfo.of(cert)
    data = make_request(identity.key, request_id=request_id, gateway_id=identity.gateway_id,
                        registration=identity.registration(), csr_pem=csr.decode("ascii"),
                        claim=None, created_ms=_now_ms() if now_ms is None else now_ms,
                        kind=RENEW, current=current.serial,
                        tls_sign=lambda b: current_key.sign(b, ec.ECDSA(hashes.SHA256())))
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    details = {"request_id": request_id, "kid": identity.kid, "current": current.serial,
               "tls_key_sha256": _sha256(spki), "csr_sha256": _sha256(csr),
               "request_sha256": _sha256(data)}
    return Pending(data, request_id, key, current, details)


def answers(identity: Identity, pending: Pending, request_id: str | None) -> bool:
    """Whether an answer naming *request_id* is for *pending*: its own id, or the gateway's
    (a refusal of a request the service could not read, or ``busy``: only this gateway
    writes on its topic)."""
    return request_id in (pending.request_id, identity.gateway_id)


def request_id_of(data: bytes) -> str | None:
    """The request id an answer names (None: unreadable)."""
    try:
        return parse_answer(data).request_id
    except EnrolmentError:
        return None


def installed_ca_fingerprint(identity: Identity) -> str | None:
    """The SHA-256 of the CA the gateway trusts now (the last of ``ca.crt``)."""
    try:
        chain = x509.load_pem_x509_certificates((identity.directory / CA_CERT).read_bytes())
    except (OSError, ValueError):
        return None
    return chain[-1].fingerprint(hashes.SHA256()).hex() if chain else None


def check(identity: Identity, pending: Pending, answer: bytes,
          now_ms: int) -> tuple[Checked, list[str]]:
    """The answer to *pending*, checked as an enrolment's (for the new key, from the CA
    held), and what its command material changes; EnrolFailed with the reason otherwise."""
    if len(answer) > MAX_ANSWER_BYTES:
        raise EnrolFailed("bad_answer", f"an answer of {len(answer)} bytes (at most "
                          f"{MAX_ANSWER_BYTES})")
    try:
        parsed = parse_answer(answer)
    except EnrolmentError as exc:
        raise EnrolFailed("bad_answer", f"the answer cannot be read: {exc}") from None
    if parsed.status == "refused" and answers(identity, pending, parsed.request_id):
        raise EnrolFailed(parsed.reason, f"the platform refused the renewal "
                          f"({parsed.reason}): {parsed.detail}")
    if parsed.request_id != pending.request_id:
        raise EnrolFailed("bad_answer", f"the answer is to request {parsed.request_id[:40]}, "
                          f"not to {pending.request_id}")
    checked = enrol.check_answer(identity, answer,
                                 ca_fingerprint=installed_ca_fingerprint(identity),
                                 tls_public=pending.key.public_key())
    return checked, enrol.command_key_changes(identity, checked.files, now_ms)


def summary(pending: Pending, checked: Checked, changes: list[str]) -> dict[str, Any]:
    """What the record of an installed renewal says."""
    return {**checked.summary(), "previous": pending.current.serial,
            "tls_key_sha256": pending.details["tls_key_sha256"], "command_keys": changes}


def install(identity: Identity, pending: Pending, checked: Checked,
            now_ms: int) -> dict[str, Any]:
    """Install the new key with its certificate and the CA (one installation), then the
    command keys; what was installed and replaced."""
    return enrol.install(identity, checked, now_ms=now_ms, tls_key_pem=pending.key_pem())


# --- provision renew: the running daemon, or a connection of its own ------------------------

def direct_exchange(identity: Identity, broker: BrokerConfig, data: bytes, *,
                    timeout_s: float, progress: Progress) -> bytes:
    """Send *data* on the gateway's own enrolment topic over a connection of its own with
    the current certificate (no daemon runs: nothing else uses the client id)."""
    client = make_client(identity.gateway_id, broker)  # the broker binds the id to the CN
    refused = ("refused", f"the broker {broker.host}:{broker.port} refused this gateway's "
               "certificate", "check 'diag keys' and the certificate's validity; a revoked "
               "or expired certificate needs a new enrolment ('provision enrol')")
    return enrol.run_exchange(client, broker.host, broker.port, identity.gateway_id, data,
                              timeout_s=timeout_s, progress=progress,
                              who=f"as {identity.gateway_id} (its current certificate)",
                              refused=refused)


def renew_direct(identity: Identity, broker: BrokerConfig, operator: Operator, *,
                 timeout_s: float, progress: Progress) -> dict[str, Any]:
    """Renew now over a connection of this process (the daemon is not running); each step
    written down in the action journal (``enrol.requested``, ``enrol.completed``,
    ``enrol.failed``, mode ``renew``), sealed by the daemon at its next start."""
    mode = "renew"
    pending = new_request(identity)
    record(identity, "enrol.requested", {"mode": mode, **pending.details}, operator)
    progress(f"request {pending.request_id}: a new TLS key, renewing certificate "
             f"{pending.current.serial}")
    now = _now_ms()
    try:
        answer = direct_exchange(identity, broker, pending.data, timeout_s=timeout_s,
                                 progress=progress)
        progress("answer received; checking it")
        checked, changes = check(identity, pending, answer, now)
    except EnrolFailed as exc:
        enrol.fail(identity, operator, mode, exc, request_id=pending.request_id)
        raise
    names = {TLS_KEY, TLS_CERT, CA_CERT, *checked.files}
    record(identity, "enrol.completed", {
        "mode": mode, **summary(pending, checked, changes),
        "replaced": {n: file_sha256(identity.directory / n) for n in sorted(names)}}, operator)
    try:
        done = install(identity, pending, checked, now)
    except OSError as exc:
        failed = EnrolFailed("install_failed", f"{identity.directory}: the renewal could not "
                             f"be installed ({exc}); free the disk and run it again")
        enrol.fail(identity, operator, mode, failed, request_id=pending.request_id)
        raise failed from None
    return {"status": "renewed", "via": "direct", **summary(pending, checked, changes),
            "installed": sorted(done["installed"]), "warnings": checked.warnings}


@dataclass(frozen=True)
class Trigger:
    """``provision renew``'s request to the daemon: its id, when, who asked."""

    trigger_id: str
    at_ms: int
    operator: dict[str, Any]


def ask_daemon(data_dir: Path, operator: Operator) -> Trigger:
    """Ask the daemon of *data_dir* to renew now (it looks every second)."""
    trigger = Trigger(f"trg-{secrets.token_hex(8)}", _now_ms(), operator.to_json())
    body = {"id": trigger.trigger_id, "at_ms": trigger.at_ms, "operator": trigger.operator}
    path = data_dir / TRIGGER_FILE
    try:
        durable.atomic_write(path, json.dumps(body).encode())  # 0600: it names a person
        if os.geteuid() == 0:  # root asks for the gateway's user: the file must be its own
            owner = data_dir.stat()
            os.chown(path, owner.st_uid, owner.st_gid)
    except OSError as exc:
        raise UserError(f"{data_dir / TRIGGER_FILE}: cannot write the request to the gateway "
                        f"({exc.strerror or exc}): run this as the gateway's user (or root)"
                        ) from None
    return trigger


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
        obj = json.loads(data) if len(data) <= MAX_FILE_BYTES else None
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def take_trigger(data_dir: Path) -> Trigger | None:
    """The daemon's side: the request ``provision renew`` left, removed (None: none, or one
    that cannot be read, removed too)."""
    path = data_dir / TRIGGER_FILE
    if not path.exists():
        return None
    obj = _read_json(path)
    durable.remove(path)
    if obj is None:
        return None
    tid, at_ms, who = obj.get("id"), obj.get("at_ms"), obj.get("operator")
    if not isinstance(tid, str) or not tid.startswith("trg-") or len(tid) > 40 or \
            not isinstance(at_ms, int) or not isinstance(who, dict):
        return None
    operator = {k: str(v)[:80] for k, v in who.items() if isinstance(k, str) and v is not None}
    return Trigger(tid, at_ms, dict(list(operator.items())[:8]))


def write_state(data_dir: Path, state: Mapping[str, Any]) -> None:
    """The daemon's renewal state, for technicians (``state``, ``detail``, ``reason``...),
    with ``manual``: the state of the last attempt ``provision renew`` asked for."""
    durable.atomic_write(data_dir / STATE_FILE, json.dumps(state, sort_keys=True).encode())


def read_state(data_dir: Path) -> dict[str, Any] | None:
    return _read_json(data_dir / STATE_FILE)


#: The states that end a renewal ``provision renew`` waits for.
FINAL_STATES = ("renewed", "failed")


def wait_for_daemon(data_dir: Path, trigger: Trigger, *, timeout_s: float,
                    progress: Progress, sleep: Callable[[float], None] = time.sleep,
                    ) -> dict[str, Any]:
    """Follow the daemon's renewal of *trigger* in its state file: its outcome
    (``state`` renewed), or EnrolFailed (``state`` failed, or no outcome in time)."""
    deadline = time.monotonic() + timeout_s
    said: tuple[Any, ...] | None = None
    while True:
        whole = read_state(data_dir) or {}
        state = whole.get("manual")  # the last attempt asked for: kept until the next one
        if isinstance(state, dict) and state.get("trigger") == trigger.trigger_id:
            now = (state.get("state"), state.get("detail"))
            if now != said:
                said = now
                progress(f"{now[0]}: {now[1]}" if now[1] else str(now[0]))
            if state.get("state") == "renewed":
                return {"status": "renewed", "via": "daemon", **state}
            if state.get("state") == "failed":
                raise EnrolFailed(str(state.get("reason") or "failed"),
                                  str(state.get("detail") or "the renewal failed"))
        if time.monotonic() >= deadline:
            if (data_dir / TRIGGER_FILE).exists():
                raise EnrolFailed("timeout", f"the gateway did not take the request within "
                                  f"{timeout_s:g} s: is its daemon running with this "
                                  "configuration, with [enrolment] renew on? "
                                  "('systemctl status smartcorr-gateway')")
            raise EnrolFailed("timeout", f"no outcome within {timeout_s:g} s (last state: "
                              f"{said[0] if said else 'none'}); the gateway goes on trying: "
                              "its records (cert.renewal_failed) say why")
        sleep(POLL_S)
