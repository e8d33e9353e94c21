"""The daemon's certificate renewal (docs/enrolment.md, "Renewal"): one thread, started by
the assembly when the uplink uses TLS.

Every :data:`TICK_S` it reads the uplink's TLS files and checks them with the uplink's own
check (:func:`uplink.certs.check_certificates`: validity, key, CN), asks the schedule
(:class:`provisioning.renewal.Schedule`: trusted time only) what to do, and does it:

* a **warning** (``cert.expiring``, ``cert.expiring_soon``) is sealed with a ledger entry
  in the same transaction (:data:`provisioning.renewal.WARNED_PREFIX`): never twice for one
  threshold of one certificate, across restarts. The entries of other certificates are
  forgotten when the certificate changes (the ledger stays bounded);
* an **attempt**: ``cert.renewal_requested``; the request over the uplink's own connection
  (:meth:`uplink.forwarder.Forwarder.side_exchange`: the broker binds the client id to the
  certificate, a second connection would take the uplink's session); the answer checked
  (:func:`provisioning.renewal.check`); ``cert.renewed`` committed, then the new key,
  certificate and CA installed at once (:func:`provisioning.renewal.install`). The uplink
  sees its files change and reconnects with them, resuming its session: records are
  delivered at least once, the platform de-duplicates them by seq. Any failure is
  ``cert.renewal_failed`` with its reason, and the next attempt comes after the schedule's
  backoff. A request that got no answer (timeout, uplink down, ``busy``) is sent again as it
  was: a lost answer is answered again with the same certificate.

``provision renew`` asks for an attempt now (:func:`provisioning.renewal.ask_daemon`, taken
here at the next tick, trusted time or not) and follows it in the state file this task
keeps (:data:`provisioning.renewal.STATE_FILE`).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from buffer.writer import StoreWriter
from core.clock import Clock
from core.enrolment import MAX_ANSWER_BYTES
from core.mqtt import BrokerConfig
from core.record import JSON, Reading, Source
from core.topics import enrol_answer_topic, enrol_request_topic
from provisioning import renewal
from provisioning.enrol import EnrolFailed
from provisioning.identity import TLS_CERT, TLS_KEY, Identity
from provisioning.renewal import (
    WARNED_PREFIX,
    CertInfo,
    Pending,
    Renew,
    RenewalPolicy,
    Schedule,
    Trigger,
    Wait,
    Warn,
)
from uplink.certs import CertReport, check_certificates, read_tls_files

log = logging.getLogger(__name__)

#: How often the task looks at the certificate and for ``provision renew``'s request, s.
TICK_S = 1.0
#: Answers waiting to be read at most (a late answer to an earlier request, a flood).
MAX_ANSWERS_WAITING = 4
#: How often an attempt looks whether the uplink is connected, seconds.
UPLINK_POLL_S = 0.1
#: How long ``cert.renewed`` may take to commit before the installation, seconds.
COMMIT_TIMEOUT_S = 30.0
#: Failures after which the same request is sent again rather than a new one.
RESEND_REASONS = frozenset({"timeout", "not_connected", "busy"})
#: Ledger entries of warnings looked at, at most, when the certificate changes.
MAX_WARNED_SCAN = 64
_NS_PER_S = 1_000_000_000
_DAY_MS = 86_400_000


class Channel(Protocol):
    """The uplink's side channel (:class:`uplink.forwarder.Forwarder`)."""

    def side_exchange(self, answer_topic: str, request_topic: str, payload: bytes,
                      on_answer: Callable[[bytes], None]) -> bool: ...

    def check_files_now(self) -> None: ...


@dataclass
class RenewalStats:
    attempts: int = 0
    renewed: int = 0
    failed: int = 0
    warnings: int = 0


def files_are_the_identity(broker: BrokerConfig, identity: Identity) -> str | None:
    """Why the uplink's files cannot be renewed here (None: they can): renewal installs
    the identity directory's ``tls.crt`` and ``tls.key``, which [broker] must name."""
    if not broker.tls:
        return "the uplink does not use TLS ([broker] tls = false)"
    want = {"cert_file": identity.directory / TLS_CERT, "key_file": identity.directory / TLS_KEY}
    for key, path in want.items():
        value = getattr(broker, key)
        if value is None or Path(value).resolve() != path.resolve():
            return (f"[broker] {key} is {value!r}, not {path}: renewal installs the identity "
                    f"directory's {TLS_CERT} and {TLS_KEY}; name them there "
                    "('provision enrol' prints the lines)")
    return None


class RenewalTask:
    """The renewal thread: :meth:`start`, :meth:`stop`."""

    def __init__(self, identity: Identity, broker: BrokerConfig, policy: RenewalPolicy, *,
                 writer: StoreWriter, channel: Channel, clock: Clock, source: Source,
                 data_dir: Path) -> None:
        self.identity = identity
        self.broker = broker
        self.writer = writer
        self.channel = channel
        self.clock = clock
        self.source = source
        self.data_dir = data_dir
        #: why renewal cannot work here (None: it can); warnings go on regardless
        self.unable = files_are_the_identity(broker, identity)
        if self.unable is not None and policy.enabled:
            log.warning("automatic certificate renewal is off: %s", self.unable)
            policy = RenewalPolicy(False, policy.before_days, policy.life_share,
                                   policy.retry_min_s, policy.retry_max_s, policy.timeout_s)
        self.policy = policy
        self.schedule = Schedule(policy)
        self.stats = RenewalStats()
        self._tick_s = TICK_S  # read here: tests scale it down
        self._stop = threading.Event()
        self._answers: queue.Queue[bytes] = queue.Queue(maxsize=MAX_ANSWERS_WAITING)
        self._pending: Pending | None = None  # waiting for its answer: sent again
        self._trying: Pending | None = None  # the attempt's
        self._warned: set[str] = set()  # submitted, perhaps not committed yet
        self._seen: str | None = None  # the fingerprint whose stale warnings were forgotten
        self._state: dict[str, Any] = {}
        self._manual: dict[str, Any] | None = None  # the last manual attempt's state
        self._thread = threading.Thread(target=self._run, name="renewal", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(self.policy.timeout_s + 5)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self._step()
            except Exception:  # one failing look must not end renewal: said, next tick
                log.exception("certificate renewal: this look failed; trying at the next")

    def _step(self) -> None:
        trigger = renewal.take_trigger(self.data_dir)
        files = read_tls_files(self.broker.ca_file, self.broker.cert_file,
                               self.broker.key_file)
        utc_ms, trusted = self.clock.utc_now()
        cert = CertInfo.from_pem(files.cert) if isinstance(files.cert, bytes) else None
        if cert is None:
            if trigger is not None:
                self._outcome(trigger, "failed", "no_certificate", f"no certificate in "
                              f"{self.broker.cert_file}: enrol the gateway ('provision enrol')")
            return
        if cert.fingerprint != self._seen:
            self._seen = cert.fingerprint
            self._forget_others(cert)
        report = check_certificates(files, self.identity.gateway_id, now_ms=utc_ms,
                                    trusted=trusted)
        if trigger is not None:
            self._attempt(cert, report, utc_ms, trigger)
            return
        for action in self.schedule.decide(cert, utc_ms, trusted, self.clock.now_ns(),
                                           warned=self._is_warned):
            match action:
                case Warn():
                    self._warn(action, cert)
                case Renew():
                    self._attempt(cert, report, utc_ms, None)
                case Wait(why, until):
                    self._wait(why, until, cert)

    # -- warnings ---------------------------------------------------------------------------
    def _is_warned(self, key: str) -> bool:
        return key in self._warned or self.writer.ledger_value(key) is not None

    def _warn(self, warn: Warn, cert: CertInfo) -> None:
        self._warned.add(warn.ledger_key)
        self.stats.warnings += 1
        failed = self._state.get("reason") if self._state.get("state") == "failed" else None
        body: dict[str, JSON] = {
            "threshold_days": warn.days, "days_left": int(warn.days_left),
            "serial": cert.serial, "fingerprint": cert.fingerprint,
            "not_after": cert.not_after_ms,
            "renewal": "failing" if self.schedule.failures else "off",
            "last_failure": failed, "failures": self.schedule.failures}
        log.warning("the uplink's certificate %s expires in %.1f days and is not renewed "
                    "(%s): %s", cert.serial, warn.days_left, body["renewal"],
                    self.unable or "see the cert.renewal_failed records; 'provision renew' "
                    "tries now")
        self.writer.submit(Reading(warn.kind, self.source, body, self.clock.now_ns(),
                                   ledger=((warn.ledger_key, 1),)))

    def _forget_others(self, cert: CertInfo) -> None:
        """Forget the warnings of other certificates (the ledger stays bounded)."""
        mine = f"{WARNED_PREFIX}{cert.fingerprint}:"
        stale = tuple(key for key, _ in self.writer.ledger_items(WARNED_PREFIX, MAX_WARNED_SCAN)
                      if not key.startswith(mine))
        self._warned = {key for key in self._warned if key.startswith(mine)}
        if stale:
            self.writer.forget(stale)

    # -- attempts ---------------------------------------------------------------------------
    def _attempt(self, cert: CertInfo, report: CertReport, utc_ms: int,
                 trigger: Trigger | None) -> None:
        self.stats.attempts += 1
        self._trying = None
        try:
            said = self._renew(cert, report, utc_ms, trigger)
        except EnrolFailed as exc:
            self._failed(cert, self._trying, exc, trigger)
            return
        self._pending = None
        self.schedule.succeeded()
        self.stats.renewed += 1
        log.warning("certificate renewed: %s until %s (was %s); the uplink reconnects with it",
                    said["serial"], said["not_after"], cert.serial)
        self._outcome(trigger, "renewed", None, f"certificate {said['serial']} until "
                      f"{said['not_after']} installed; the uplink reconnects with it",
                      serial=said["serial"], not_after=said["not_after"],
                      fingerprint=said["fingerprint"], request_id=said["request_id"])

    def _renew(self, cert: CertInfo, report: CertReport, utc_ms: int,
               trigger: Trigger | None) -> dict[str, Any]:
        """One attempt, to the installation; what ``cert.renewed`` said, or EnrolFailed."""
        if report.refuse:  # the uplink cannot connect with these files: nor can we
            first = report.errors[0]
            raise EnrolFailed(str(first.code), f"{first.line}; a certificate the broker "
                              "refuses cannot be renewed over it: enrol again "
                              "('provision enrol')")
        pending = self._trying = self._request(cert)
        self._record("cert.renewal_requested", {
            **pending.details, "trigger": "manual" if trigger else "auto",
            "operator": None if trigger is None else dict(trigger.operator),
            "not_after": cert.not_after_ms,
            "days_left": max(0, cert.not_after_ms - utc_ms) // _DAY_MS,
            "attempt": self.schedule.failures + 1})
        self._set_state("requesting", trigger, f"request {pending.request_id} sent over "
                        "the uplink", request_id=pending.request_id)
        answer = self._exchange(pending)
        self._set_state("checking", trigger, "answer received; checking it",
                        request_id=pending.request_id)
        checked, changes = renewal.check(self.identity, pending, answer, utc_ms)
        said = renewal.summary(pending, checked, changes)
        if not self._commit("cert.renewed", {**said, "trigger": "manual" if trigger
                                             else "auto"}):
            raise EnrolFailed("not_recorded", "the cert.renewed record could not be "
                              f"committed within {COMMIT_TIMEOUT_S:g} s (is the store's "
                              "disk full?): nothing installed; tried again later")
        try:
            renewal.install(self.identity, pending, checked, utc_ms)
        except OSError as exc:
            raise EnrolFailed("install_failed", f"{self.identity.directory}: the "
                              f"renewal could not be installed ({exc})") from None
        self.channel.check_files_now()  # the uplink reconnects with them within seconds
        return said

    def _request(self, cert: CertInfo) -> Pending:
        """The request waiting for its answer (sent again), or a new one."""
        pending = self._pending
        if pending is None or pending.current.fingerprint != cert.fingerprint:
            pending = renewal.new_request(self.identity)
            self._pending = pending
            self._drain_answers()
        return pending

    def _failed(self, cert: CertInfo, pending: Pending | None, exc: EnrolFailed,
                trigger: Trigger | None) -> None:
        if exc.reason not in RESEND_REASONS:
            self._pending = None  # refused or wrong: a new key and request next time
        delay = self.schedule.failed(cert, self.clock.now_ns())
        self.stats.failed += 1
        log.warning("certificate renewal failed (%s): %s; next attempt in %.0f s",
                    exc.reason, exc, delay)
        self._record("cert.renewal_failed", {
            "request_id": None if pending is None else pending.request_id,
            "current": cert.serial, "reason": exc.reason, "detail": str(exc)[:500],
            "attempt": self.schedule.failures, "retry_in_s": math.ceil(delay),
            "trigger": "manual" if trigger else "auto"})
        self._outcome(trigger, "failed", exc.reason, str(exc)[:500],
                      retry_in_s=math.ceil(delay),
                      request_id=None if pending is None else pending.request_id)

    def _exchange(self, pending: Pending) -> bytes:
        """Send *pending* over the uplink once it is connected (waiting for it as long as
        for the answer), then wait for its answer."""
        gw = self.identity.gateway_id
        deadline = time.monotonic() + self.policy.timeout_s
        while not self.channel.side_exchange(enrol_answer_topic(gw), enrol_request_topic(gw),
                                             pending.data, self._on_answer):
            if self._stop.wait(UPLINK_POLL_S) or time.monotonic() >= deadline:
                raise EnrolFailed("not_connected", "the uplink is not connected to the "
                                  "broker: the renewal goes over it (records wait in the "
                                  "store too)")
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.is_set():
                raise EnrolFailed("stopped", "the gateway is stopping")
            try:
                data = self._answers.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if renewal.answers(self.identity, pending, renewal.request_id_of(data)):
                return data  # another request's answer (a late one) is dropped
        raise EnrolFailed("timeout", f"no answer within {self.policy.timeout_s:g} s: is the "
                          "platform's enrolment service running? The same request is sent "
                          "again at the next attempt")

    def _on_answer(self, data: bytes) -> None:
        """paho's thread: keep the answer for the task (bounded; the rest dropped)."""
        if len(data) <= MAX_ANSWER_BYTES:
            try:
                self._answers.put_nowait(data)
            except queue.Full:
                log.warning("certificate renewal: an answer dropped (%d waiting)",
                            MAX_ANSWERS_WAITING)

    def _drain_answers(self) -> None:
        while True:
            try:
                self._answers.get_nowait()
            except queue.Empty:
                return

    # -- records and state --------------------------------------------------------------------
    def _record(self, kind: str, body: dict[str, Any]) -> None:
        self.writer.submit(Reading(kind, self.source, body, self.clock.now_ns()))

    def _commit(self, kind: str, body: dict[str, Any]) -> bool:
        """Submit a record and wait until it is committed (False: not in time)."""
        done = threading.Event()
        self.writer.submit(Reading(kind, self.source, body, self.clock.now_ns()),
                           on_committed=lambda _rec: done.set())
        return done.wait(COMMIT_TIMEOUT_S)

    def _wait(self, why: str, until: int | None, cert: CertInfo) -> None:
        if why == "untrusted_time" and not self.policy.enabled:
            why = "off"  # nothing waits for the time: renewal is off (the reason says why)
        if why == "untrusted_time":
            self._set_state("waiting", None, "the clock is not synchronised (no NTP or GNSS "
                            "time yet): renewal waits for trusted time")
        elif why == "not_due":
            self._set_state("idle", None, f"certificate {cert.serial} renews from {until} "
                            "(UTC ms)", renew_from=until)
        elif why == "off" and self._state.get("state") != "failed":
            self._set_state("off", None, self.unable or "[enrolment] renew = false")

    def _outcome(self, trigger: Trigger | None, state: str, reason: str | None, detail: str,
                 **more: JSON) -> None:
        self._set_state(state, trigger, detail, reason=reason, **more)

    def _set_state(self, state: str, trigger: Trigger | None, detail: str,
                   **more: Any) -> None:
        new = {"state": state, "detail": detail, "trigger": None if trigger is None
               else trigger.trigger_id, **more}
        if {k: v for k, v in self._state.items() if k != "updated_ms"} == new:
            return
        if state == "waiting" and self._state.get("state") != "waiting":
            log.warning("certificate renewal: %s", detail)
        self._state = {**new, "updated_ms": time.time_ns() // 1_000_000}
        if trigger is not None:  # kept until the next one: 'provision renew' follows it
            self._manual = self._state
        try:
            renewal.write_state(self.data_dir, {**self._state, "manual": self._manual})
        except OSError as exc:
            log.warning("certificate renewal: cannot write %s (%s)",
                        self.data_dir / renewal.STATE_FILE, exc)
