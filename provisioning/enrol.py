"""Enrolment, the gateway's side (docs/enrolment.md): from an identity to a certificate the
platform's broker accepts, and the platform's command keys.

``provision init`` made the TLS key and its CSR (:func:`provisioning.identity.tls_request`).
``provision enrol`` then takes one of two paths, each step a record (the action journal,
:mod:`provisioning.actions`; kinds ``enrol.requested``, ``enrol.completed``,
``enrol.failed``, sealed by the daemon):

* **offline** (a USB stick): :func:`write_request` writes ``request.json`` (the CSR and
  the identity's registration, signed by the identity key: :mod:`core.enrolment`); the
  platform's operator answers it (``ingest ca sign DIR``) with ``answer.json``;
  :func:`check_answer` then :func:`install` take it.
* **online by claim**: :func:`claim` sends the same request carrying a one-time claim
  token over MQTT (:func:`exchange`: the bootstrap listener, user
  :data:`core.topics.BOOTSTRAP_USER`, client id = the request id), waits for the answer,
  checks and installs it. The request is kept (``enrol.request.json``, mode 0600) until
  it is answered: after a timeout, the same command with the same token sends the very
  same request again, and the platform answers it again instead of calling the token
  used.

An answer is installed only when the certificate is for our TLS key, our gateway id and
our identity key; it chains to the CA the answer carries (path validation as TLS does it,
client authentication), the CA is a CA, the CA signed the answer (so the command material
comes from it), and, when the installer gives one, the CA's fingerprint is the one the
platform published. The command material is merged into the gateway's command keyring
(:func:`provisioning.command_keys.install_files`): checked against the root held, a
revocation list older than the one held refused (``command_keys``), never written over the
installed files as it arrives (a re-enrolment carrying an older export would bring a
revoked command key back). The certificate and the CA are installed together
(:func:`provisioning.identity.install_files`), the keyring's changes then.

Renewal (:mod:`provisioning.renewal`) checks and installs its answers here too: for a new
TLS key (:func:`check_answer` with *tls_public*), installed with its certificate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import queue
import ssl
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from core import durable
from core.command_keys import CommandKeyError, CommandKeyring
from core.enrolment import (
    ANSWER_FILE,
    MAX_ANSWER_BYTES,
    REQUEST_FILE,
    EnrolmentError,
    check_claim_token,
    claim_id,
    kid_of,
    make_request,
    parse_answer,
    parse_request,
)
from core.enrolment import new_request_id as _new_request_id
from core.errors import UserError
from core.topics import BOOTSTRAP_USER, enrol_answer_topic, enrol_request_topic
from provisioning import command_keys
from provisioning.actions import file_sha256, record
from provisioning.identity import (
    CA_CERT,
    PUBLIC_MODE,
    TLS_CERT,
    TLS_KEY,
    Identity,
    install_files,
    tls_request,
)
from provisioning.operator import Operator

#: The claim request waiting for its answer (it holds the token until used: mode 0600).
PENDING = "enrol.request.json"
DEFAULT_TIMEOUT_S = 120.0
MAX_TIMEOUT_S = 3600.0
#: How often a progress line says the gateway is still waiting, seconds.
PROGRESS_EVERY_S = 5.0
#: The largest claim token or password file read, bytes.
MAX_SECRET_BYTES = 1024
KEEPALIVE_S = 30
#: MQTT v5 PUBACK reason: the broker took the request, but nobody subscribes to it.
NO_MATCHING_SUBSCRIBERS = 0x10

Progress = Callable[[str], None]


class EnrolFailed(Exception):  # noqa: N818 (a failure of a check, not a usage error: exit 1)
    """Enrolment did not complete: refused by the platform, an answer that does not check,
    no answer in time. ``reason`` is a word, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _tls_public(identity: Identity) -> ec.EllipticCurvePublicKey:
    path = identity.directory / TLS_KEY
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({exc}): 'provision enrol' makes one when "
                        "it is missing; move a damaged one away") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"{path} is not an EC key: move it away and run 'provision enrol' "
                        "again")
    return key.public_key()


def _public_sha256(key: ec.EllipticCurvePublicKey) -> str:
    return _sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


# --- the request ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    data: bytes
    request_id: str
    details: dict[str, Any]


def make(identity: Identity, *, claim: str | None, mode: str) -> Request:
    """A new signed request (a fresh CSR of the TLS key, made when missing)."""
    csr = tls_request(identity.directory, identity.gateway_id, identity.kid)
    request_id = _new_request_id()
    data = make_request(identity.key, request_id=request_id, gateway_id=identity.gateway_id,
                        registration=identity.registration(), csr_pem=csr.decode("ascii"),
                        claim=claim, created_ms=_now_ms())
    details: dict[str, Any] = {
        "mode": mode, "request_id": request_id, "kid": identity.kid,
        "tls_key_sha256": _public_sha256(_tls_public(identity)), "csr_sha256": _sha256(csr),
        "request_sha256": _sha256(data)}
    if claim is not None:
        details["claim_id"] = claim_id(claim)
    return Request(data, request_id, details)


def write_request(identity: Identity, out: Path, operator: Operator) -> dict[str, Any]:
    """The offline path, first half: ``out/request.json`` (written down first)."""
    try:
        durable.make_dirs(out, 0o755)
    except OSError as exc:
        raise UserError(f"--request-out {out}: cannot create the directory ({exc})") from None
    request = make(identity, claim=None, mode="offline")
    target = out / REQUEST_FILE
    record(identity, "enrol.requested", {**request.details, "out": str(target.absolute())},
           operator)
    try:
        durable.atomic_write(target, request.data, PUBLIC_MODE)
    except OSError as exc:
        raise UserError(f"{target}: cannot write the request ({exc})") from None
    return {"status": "requested", "request": str(target), **request.details}


# --- the answer -------------------------------------------------------------------------------

@dataclass
class Checked:
    """An answer that passed every check (:func:`check_answer`)."""

    request_id: str
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    files: Mapping[str, bytes]
    warnings: list[str] = field(default_factory=list)

    @property
    def ca_fingerprint(self) -> str:
        return self.chain[-1].fingerprint(hashes.SHA256()).hex()

    def summary(self) -> dict[str, Any]:
        return {"request_id": self.request_id,
                "serial": format(self.certificate.serial_number, "x"),
                "fingerprint": self.certificate.fingerprint(hashes.SHA256()).hex(),
                "not_after": self.certificate.not_valid_after_utc.isoformat(),
                "ca_fingerprint": self.ca_fingerprint,
                "ca": self.chain[-1].subject.rfc4514_string(),
                "command_files": sorted(self.files)}


def normalise_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (``AB:CD:…`` taken too)."""
    hexa = text.strip().replace(":", "").lower()
    if len(hexa) != 64 or any(c not in "0123456789abcdef" for c in hexa):
        raise UserError(f"--ca-fingerprint {text!r}: give the CA's SHA-256 fingerprint (64 "
                        "hex digits, colons allowed) as the platform published it")
    return hexa


def check_answer(identity: Identity, data: bytes, *, ca_fingerprint: str | None = None,
                 now: dt.datetime | None = None,
                 tls_public: ec.EllipticCurvePublicKey | None = None) -> Checked:
    """The answer in *data*, checked (module docstring); :class:`EnrolFailed` otherwise.
    The certificate must be for *tls_public* (a renewal's new key) or else for the key in
    ``tls.key``."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        answer = parse_answer(data)
    except EnrolmentError as exc:
        raise EnrolFailed("bad_answer", f"the answer cannot be read: {exc}") from None
    if answer.status == "refused":
        raise EnrolFailed(answer.reason, f"the platform refused the enrolment "
                          f"({answer.reason}): {answer.detail}")
    if answer.gateway_id != identity.gateway_id:
        raise EnrolFailed("wrong_gateway", f"the answer is for gateway {answer.gateway_id!r}, "
                          f"this is {identity.gateway_id!r}: not this gateway's answer")
    try:
        cert = x509.load_pem_x509_certificate(answer.certificate_pem.encode("ascii"))
        chain = [x509.load_pem_x509_certificate(pem.encode("ascii")) for pem in answer.chain]
    except ValueError as exc:
        raise EnrolFailed("bad_answer", f"the answer's certificates cannot be read ({exc})"
                          ) from None
    warnings: list[str] = []
    _check_certificate(identity, cert, tls_public or _tls_public(identity))
    root = chain[-1]
    for ca in chain:
        _check_ca(ca)
    if ca_fingerprint is not None and \
            root.fingerprint(hashes.SHA256()).hex() != normalise_fingerprint(ca_fingerprint):
        raise EnrolFailed("ca_mismatch", f"the answer's CA ({root.subject.rfc4514_string()}, "
                          f"SHA-256 {root.fingerprint(hashes.SHA256()).hex()}) is not the one "
                          "the platform published (--ca-fingerprint): do not install it; "
                          "ask the platform's operator")
    if now > cert.not_valid_after_utc:
        raise EnrolFailed("expired", f"the certificate expired at "
                          f"{cert.not_valid_after_utc.isoformat()} (this gateway's clock says "
                          f"{now.isoformat()}): ask for a new answer, or set the clock")
    at = now
    if now < cert.not_valid_before_utc:
        at = cert.not_valid_before_utc + dt.timedelta(seconds=1)
        warnings.append(f"the certificate is valid from {cert.not_valid_before_utc.isoformat()}"
                        f" but this gateway's clock says {now.isoformat()}: its clock is "
                        "behind (NTP or GNSS sets it); TLS will fail until it is right")
    try:
        verifier = (verification.PolicyBuilder().store(verification.Store([root])).time(at)
                    .build_client_verifier())
        verifier.verify(cert, chain[:-1])
    except verification.VerificationError as exc:
        raise EnrolFailed("bad_chain", f"the certificate does not chain to the answer's CA "
                          f"for client authentication ({exc})") from None
    issuer_key = chain[0].public_key()
    if not isinstance(issuer_key, ec.EllipticCurvePublicKey):
        raise EnrolFailed("bad_answer", "the CA's key is not an ECDSA key")
    try:
        issuer_key.verify(answer.sig, answer.signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EnrolFailed("bad_answer_signature", "the answer is not signed by the CA that "
                          "issued the certificate: its command material may not be the "
                          "platform's; do not install it") from None
    return Checked(answer.request_id, cert, chain, dict(answer.files or {}), warnings)


def _check_certificate(identity: Identity, cert: x509.Certificate,
                       tls_public: ec.EllipticCurvePublicKey) -> None:
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [identity.gateway_id]:
        raise EnrolFailed("wrong_gateway", f"the certificate's CN is {cns}, this gateway is "
                          f"{identity.gateway_id!r}")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            public.public_numbers() != tls_public.public_numbers():
        raise EnrolFailed("wrong_key", f"the certificate is not for this gateway's TLS key "
                          f"({identity.directory / TLS_KEY}): answered for another request, "
                          "or the TLS key was made anew since; send a new request")
    named = kid_of(cert.extensions)
    if named != identity.kid:
        raise EnrolFailed("wrong_identity", f"the certificate names identity key {named!r}, "
                          f"this gateway's is {identity.kid}")
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise EnrolFailed("bad_answer", "the certificate is not for TLS client "
                          "authentication (extended key usage clientAuth)")


def _check_ca(ca: x509.Certificate) -> None:
    try:
        basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        basic, usage = None, None
    if basic is None or usage is None or not basic.ca or not usage.key_cert_sign:
        raise EnrolFailed("not_a_ca", f"{ca.subject.rfc4514_string()} in the answer's chain "
                          "is not a certificate authority (basic constraints CA, key usage "
                          "keyCertSign)")


def command_key_changes(identity: Identity, files: Mapping[str, bytes],
                        now_ms: int) -> list[str]:
    """What merging the command material *files* into the gateway's keyring would change,
    in words, without writing anything (:func:`provisioning.command_keys.install_files`
    does the same and writes); :class:`EnrolFailed` ``command_keys`` when it would refuse
    it: another root, a revocation list older than the one held, a document that does not
    verify. No command material: no change."""
    if not files:
        return []
    where = Path("the answer's command material")
    try:
        offered = command_keys.offered_keyring(files, where=where)
        held = command_keys.load_keyring(identity.directory)
        if held is None:
            ring, changes = CommandKeyring(offered.root), [f"command root {offered.root.kid}"]
        else:
            ring, changes = held[0].copy(), []
        changes += ring.merge(offered, now_ms)
    except (command_keys.CommandKeysError, CommandKeyError) as exc:
        raise EnrolFailed("command_keys", f"the answer's command keys are refused ({exc}): "
                          "nothing was installed; a re-enrolment or renewal never brings back "
                          "an older revocation list or another command root; ask the "
                          "platform's operator for its current export ('ingest command-key "
                          "export')") from None
    return changes


def install(identity: Identity, checked: Checked, *, now_ms: int | None = None,
            tls_key_pem: bytes | None = None) -> dict[str, Any]:
    """Install the certificate and the CA (``ca.crt``: the chain, PEM) together (with
    *tls_key_pem*, a renewal's new TLS key, mode 0600, in the same installation), then
    merge the command files into the keyring; the SHA-256 of each file installed and of
    each it replaced (None: new), and what the keyring's merge changed."""
    files = {TLS_CERT: checked.certificate.public_bytes(Encoding.PEM),
             CA_CERT: b"".join(c.public_bytes(Encoding.PEM) for c in checked.chain)}
    if tls_key_pem is not None:
        files[TLS_KEY] = tls_key_pem
    names = [*files, *checked.files]
    before = {name: file_sha256(identity.directory / name) for name in names}
    install_files(identity.directory, files)
    changes: list[str] = []
    if checked.files:
        try:
            changes = command_keys.install_files(identity.directory, checked.files,
                                                 _now_ms() if now_ms is None else now_ms,
                                                 where=Path("the answer's command material"))
        except command_keys.CommandKeysError as exc:  # checked before: changed meanwhile
            raise EnrolFailed("command_keys", f"the certificate is installed, the command "
                              f"keys are refused ({exc})") from None
    installed: dict[str, str | None] = {name: _sha256(data) for name, data in files.items()}
    installed |= {name: file_sha256(identity.directory / name) for name in checked.files}
    return {"installed": {n: installed[n] for n in sorted(installed)}, "replaced": before,
            "command_keys": changes}


def complete(identity: Identity, data: bytes, operator: Operator, *, mode: str,
             ca_fingerprint: str | None = None) -> dict[str, Any]:
    """Check the answer *data* (its command material against the keyring held too), write
    down ``enrol.completed`` (or ``enrol.failed``) and install it."""
    now = _now_ms()
    try:
        checked = check_answer(identity, data, ca_fingerprint=ca_fingerprint)
        changes = command_key_changes(identity, checked.files, now)
    except EnrolFailed as exc:
        fail(identity, operator, mode, exc, request_id=_request_id_of(data))
        raise
    summary = checked.summary()
    names = {TLS_CERT, CA_CERT, *checked.files}
    record(identity, "enrol.completed", {
        "mode": mode, **summary, "command_keys": changes,
        "replaced": {n: file_sha256(identity.directory / n) for n in sorted(names)}}, operator)
    try:
        done = install(identity, checked, now_ms=now)
    except EnrolFailed as exc:
        fail(identity, operator, mode, exc, request_id=checked.request_id)
        raise
    except OSError as exc:  # a full disk, a read-only card: said, written down, retried
        failed = EnrolFailed("install_failed", f"{identity.directory}: the answer could not "
                             f"be installed ({exc}); free the disk and run the same command "
                             "again")
        fail(identity, operator, mode, failed, request_id=checked.request_id)
        raise failed from None
    return {"status": "installed", **summary, "warnings": checked.warnings, **done}


def fail(identity: Identity, operator: Operator, mode: str, exc: EnrolFailed, *,
         request_id: str | None) -> None:
    record(identity, "enrol.failed", {"mode": mode, "request_id": request_id,
                                      "reason": exc.reason, "detail": str(exc)[:500]},
           operator)


def _request_id_of(data: bytes) -> str | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid[:40] if isinstance(rid, str) else None


def read_answer(path: Path) -> bytes:
    """``answer.json`` of the directory *path* (or the file *path*)."""
    target = path / ANSWER_FILE if path.is_dir() else path
    try:
        with target.open("rb") as file:
            return file.read(MAX_ANSWER_BYTES + 1)
    except OSError as exc:
        raise UserError(f"--answer {path}: cannot read {target} ({exc.strerror or exc}): give "
                        "the directory the platform wrote answer.json into") from None


# --- the configuration --------------------------------------------------------------------------

def broker_lines(identity: Identity) -> str:
    """The [broker] keys that use the installed files."""
    d = identity.directory.absolute()
    return (f'ca_file = "{d / CA_CERT}"\ncert_file = "{d / TLS_CERT}"\n'
            f'key_file = "{d / TLS_KEY}"')


def config_mismatches(config: Path, identity: Identity) -> list[str]:
    """The [broker] TLS keys of *config* that do not name the installed files (the key
    names); a configuration that cannot be read is a UserError."""
    try:
        raw = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"--config {config}: cannot be read ({exc})") from None
    broker = raw.get("broker") if isinstance(raw.get("broker"), dict) else {}
    d = identity.directory.absolute()
    want = {"ca_file": d / CA_CERT, "cert_file": d / TLS_CERT, "key_file": d / TLS_KEY}
    out = []
    for key, path in want.items():
        value = broker.get(key) if isinstance(broker, dict) else None
        if not isinstance(value, str) or (config.parent / value).absolute() != path:
            out.append(key)
    return out


# --- the online path ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Bootstrap:
    """How an unenrolled gateway reaches the enrolment service: the broker's bootstrap
    listener, the CA its server certificate chains to, the shared bootstrap user."""

    host: str
    port: int
    ca_file: str
    password: str
    user: str = BOOTSTRAP_USER


def read_secret(name: str, what: str, stdin: Callable[[int], str]) -> str:
    """A secret from the file *name*, or ``-`` for stdin: never from argv (ps shows it)."""
    if name == "-":
        text = stdin(MAX_SECRET_BYTES)
    else:
        try:
            with Path(name).open(encoding="utf-8") as file:
                text = file.read(MAX_SECRET_BYTES)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{what} {name}: cannot read it ({exc})") from None
    text = text.strip()
    if not text:
        raise UserError(f"{what} {name}: empty")
    return text


def exchange(bootstrap: Bootstrap, request_id: str, data: bytes, *, timeout_s: float,
             progress: Progress) -> bytes:
    """Send the request *data* on the enrolment topic of *request_id* (its MQTT client id)
    and wait for the answer: the answer's bytes, or :class:`EnrolFailed` (broker
    unreachable, bootstrap user refused, nobody listening, no answer in time)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=request_id,
                         protocol=mqtt.MQTTv5)
    try:
        client.tls_set(ca_certs=bootstrap.ca_file, cert_reqs=ssl.CERT_REQUIRED,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"--ca {bootstrap.ca_file}: unusable ({exc})") from None
    client.username_pw_set(bootstrap.user, bootstrap.password)
    refused = (f"the broker refused the bootstrap user {bootstrap.user!r}",
               "check the password file and that this is the bootstrap listener's port")
    return run_exchange(client, bootstrap.host, bootstrap.port, request_id, data,
                        timeout_s=timeout_s, progress=progress,
                        who=f"as {bootstrap.user}", refused=("bootstrap_refused", *refused))


def run_exchange(client: mqtt.Client, host: str, port: int, topic_id: str, data: bytes, *,
                 timeout_s: float, progress: Progress, who: str,
                 refused: tuple[str, str, str]) -> bytes:
    """Connect *client* (set up: TLS, credentials) to *host*:*port*, subscribe to the answer
    topic of *topic_id*, publish *data* on its request topic, wait for the answer: its
    bytes, or :class:`EnrolFailed`. *refused* is (reason, what, what to do) when the broker
    refuses the connection."""
    answers: queue.Queue[bytes] = queue.Queue(maxsize=1)
    failure: list[EnrolFailed] = []
    done = threading.Event()
    answer_topic, request_topic = enrol_answer_topic(topic_id), enrol_request_topic(topic_id)

    def stop(exc: EnrolFailed) -> None:
        failure.append(exc)
        done.set()

    def on_connect(cl: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            stop(EnrolFailed(refused[0], f"{refused[1]} ({reason}): {refused[2]}"))
            return
        progress(f"connected; waiting for the platform's answer on {answer_topic}")
        cl.subscribe(answer_topic, qos=1)

    def on_subscribe(cl: mqtt.Client, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        if any(r.is_failure for r in reasons):
            stop(EnrolFailed("acl", f"the broker refused the subscription to {answer_topic} "
                             f"({reasons[0]}): its ACL is not core.topics.broker_acl()"))
            return
        cl.publish(request_topic, data, qos=1)

    def on_publish(_cl: mqtt.Client, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        if reason.value == NO_MATCHING_SUBSCRIBERS:
            stop(EnrolFailed("no_service", "the broker took the request but no enrolment "
                             "service listens ('ingest enrol-service' is not running): ask "
                             "the platform's operator, then run this again"))
        elif reason.is_failure:
            stop(EnrolFailed("acl", f"the broker refused the request on {request_topic} "
                             f"({reason}): its ACL is not core.topics.broker_acl()"))
        else:
            progress(f"request sent on {request_topic} ({len(data)} bytes)")

    def on_message(_cl: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == answer_topic and len(message.payload) <= MAX_ANSWER_BYTES:
            try:
                answers.put_nowait(bytes(message.payload))
            except queue.Full:
                return  # the first answer counts
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message
    progress(f"connecting to {host}:{port} {who}")
    try:
        client.connect(host, port, KEEPALIVE_S)
    except ssl.SSLCertVerificationError as exc:
        raise EnrolFailed("tls", f"the broker {host}:{port} is not trusted "
                          f"({exc.verify_message}): the CA file must be the CA of its server "
                          "certificate") from None
    except (OSError, ssl.SSLError) as exc:
        raise EnrolFailed("unreachable", f"cannot reach the enrolment broker {host}:{port} "
                          f"({exc}): check the broker's address and the network") from None
    client.loop_start()
    deadline = time.monotonic() + timeout_s
    try:
        while not done.wait(min(PROGRESS_EVERY_S, max(0.0, deadline - time.monotonic()))):
            left = deadline - time.monotonic()
            if left <= 0:
                raise EnrolFailed("timeout", f"no answer within {timeout_s:g} s: is 'ingest "
                                  "enrol-service' running? Run the same command again: the "
                                  "same request is sent again")
            progress(f"still waiting for the answer ({left:.0f} s left)")
        if failure:
            raise failure[0]
        return answers.get_nowait()
    finally:
        client.disconnect()
        client.loop_stop()


def claim(identity: Identity, token: str, bootstrap: Bootstrap, operator: Operator, *,
          timeout_s: float = DEFAULT_TIMEOUT_S, ca_fingerprint: str | None = None,
          progress: Progress) -> dict[str, Any]:
    """The online path: request (or the pending one, same token), exchange, check, install."""
    token = check_claim_token(token)
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise UserError(f"--timeout {timeout_s:g}: give a number of seconds, at most "
                        f"{MAX_TIMEOUT_S:g}")
    if ca_fingerprint is not None:
        normalise_fingerprint(ca_fingerprint)  # a typo refused before anything is sent
    pending = identity.directory / PENDING
    request = _pending(identity, pending, token)
    if request is None:
        request = make(identity, claim=token, mode="claim")
        record(identity, "enrol.requested", request.details, operator)
        durable.atomic_write(pending, request.data)  # holds the token: 0600
    else:
        progress(f"sending again the request {request.request_id} made with this token")
    try:
        data = exchange(bootstrap, request.request_id, request.data, timeout_s=timeout_s,
                        progress=progress)
    except EnrolFailed as exc:
        fail(identity, operator, "claim", exc, request_id=request.request_id)
        if exc.reason != "timeout":
            durable.remove(pending)
        raise
    progress("answer received; checking it")
    try:
        out = complete(identity, data, operator, mode="claim", ca_fingerprint=ca_fingerprint)
    finally:
        if _definitive(data):
            durable.remove(pending)
    return {**out, "claim_id": claim_id(token)}


def _definitive(data: bytes) -> bool:
    """An answer after which the pending request is of no more use (any but ``busy``)."""
    try:
        return parse_answer(data).reason != "busy"
    except EnrolmentError:
        return True


def _pending(identity: Identity, path: Path, token: str) -> Request | None:
    """The pending request, when it was made with *token* for the current keys."""
    try:
        data = path.read_bytes()
        request = parse_request(data)
    except (OSError, EnrolmentError):
        return None
    if request.claim != token or request.kid != identity.kid:
        return None
    csr = x509.load_pem_x509_csr(request.csr_pem.encode("ascii"))
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or \
            key.public_numbers() != _tls_public(identity).public_numbers():
        return None
    return Request(data, request.request_id, {"request_id": request.request_id})


# --- the command line's helpers (gateway.py provision enrol) ------------------------------------

def bootstrap_of(broker: str | None, ca_file: str | None, user: str,
                 password_file: str | None, stdin: Callable[[int], str]) -> Bootstrap:
    """The bootstrap connection from the options; a UserError naming what is missing."""
    if not broker or not ca_file or not password_file:
        raise UserError("--claim needs --broker HOST:PORT (the enrolment listener), --ca FILE "
                        "(its server certificate's CA) and --bootstrap-password-file FILE "
                        "(from the installer's kit)")
    host, sep, port = broker.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"--broker {broker!r}: expected HOST:PORT")
    if not Path(ca_file).is_file():
        raise UserError(f"--ca {ca_file}: no such file")
    password = read_secret(password_file, "--bootstrap-password-file", stdin)
    return Bootstrap(host.strip("[]"), int(port), ca_file, password, user)


def with_config(identity: Identity, out: dict[str, Any], config: Path | None) -> dict[str, Any]:
    """*out* with what the configuration needs: the [broker] lines, and which keys of
    *config* (if given) do not name the installed files yet."""
    if out.get("status") != "installed":
        return out
    lines = broker_lines(identity)
    missing = config_mismatches(config, identity) if config is not None else None
    return {**out, "broker_lines": lines, "config": None if config is None else str(config),
            "config_to_change": missing}


def render(out: dict[str, Any]) -> str:
    """The human text of a ``provision enrol`` result."""
    if out.get("status") == "requested":
        return (f"request {out['request_id']} written to {out['request']}: carry it to the "
                "platform's operator ('ingest ca sign DIR' writes answer.json beside it), then "
                "'provision enrol --answer DIR'")
    lines = [f"enrolled: certificate {out['serial']} until {out['not_after']}, CA "
             f"{out['ca']} (SHA-256 {out['ca_fingerprint']}); installed "
             f"{', '.join(out['installed'])}"]
    lines += [f"WARNING: {w}" for w in out.get("warnings", [])]
    if out.get("config_to_change") == []:
        lines.append(f"{out['config']} already uses them; restart the gateway")
    else:
        where = f"in [broker] of {out['config']}" if out.get("config") else \
            "in [broker] of gateway.toml"
        lines.append(f"put these {where} (with host and port), then restart the gateway:\n"
                     f"{out['broker_lines']}")
    return "\n".join(lines)
