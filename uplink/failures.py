"""What the uplink says about itself: its failures classified, told once, then at most
once a minute (sans-IO: fed with facts and the monotonic time, it returns what to say and
what to record).

A technician reading ``journalctl -u smartcorr-gateway`` (WARNING and above by default)
must see at once why records do not leave, and what to do, without ten lines a
second: each problem is said the first time it is seen, then at most once every
:data:`REPEAT_NS` while it persists, with how many times it came back meanwhile; a
problem that goes and comes back within that minute is counted, not said again. The
connection coming back is one line, with how long it was down and the backlog.

Problems are of a closed set (:class:`Problem`, :class:`uplink.certs.CertProblem`), so
what is remembered per problem is bounded by that set, whatever the broker does.

The certificate check (uplink/certs.py) is fed in as findings: any error makes the
uplink refuse to connect (:meth:`UplinkWatch.certificates`), with one ``uplink.refused``
record per distinct problem of a refusal (not per check); the records wait in the store
with everything else. Connection failures are classified from what paho reports: the
exception of a failed connect (DNS, TCP, the TLS handshake), the socket error before
the CONNACK (the broker refusing our certificate shows there under TLS 1.3), and the
CONNACK's reason code.
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

from core.record import JSON
from uplink.certs import CertProblem, CertReport, Finding, Severity

__all__ = ["LABELS", "REFUSED_KIND", "REPEAT_NS", "WARNING_REPEAT_NS", "Failure", "Problem",
           "Record", "Say", "UplinkWatch", "connack_failure", "connect_failure", "duration",
           "label", "socket_failure"]

#: The record kind of a refusal to connect (a certificate problem): status class.
REFUSED_KIND = "uplink.refused"
#: A problem that persists is said again at most this often, ns (one minute).
REPEAT_NS = 60 * 1_000_000_000
#: A certificate warning (expiry near) is said again at most this often, ns (a day).
WARNING_REPEAT_NS = 24 * 3600 * 1_000_000_000
_NS_PER_S = 1_000_000_000

# OpenSSL verify codes (X509_V_ERR_*) of the broker's certificate
_CERT_NOT_YET_VALID = 9
_CERT_HAS_EXPIRED = 10
_HOSTNAME_MISMATCH = 62
_IP_ADDRESS_MISMATCH = 64
# MQTT v5 CONNACK reason codes
_AUTH_CODES = frozenset({0x85, 0x86, 0x87, 0x8A, 0x8C})  # client id, user/password, ACL,
# banned, authentication method
_BUSY_CODES = frozenset({0x88, 0x89, 0x97, 0x9C, 0x9D, 0x9F})  # unavailable, busy, quota,
# use another server, server moved, connection rate


class Problem(enum.StrEnum):
    """Why the uplink is not connected (besides a certificate problem)."""

    DNS = "dns"  # the broker's host name does not resolve
    TCP_REFUSED = "tcp_refused"  # nothing listens there
    TIMEOUT = "timeout"  # no answer
    UNREACHABLE = "unreachable"  # no route
    NETWORK = "network"  # another socket error
    BROKER_UNTRUSTED = "broker_untrusted"  # its certificate is not signed by our ca_file
    BROKER_NAME = "broker_name"  # its certificate is not for the host we dial
    BROKER_CERT_TIME = "broker_cert_time"  # its certificate expired or not yet valid
    CERT_REFUSED = "cert_refused"  # the broker refused our certificate (a TLS alert)
    TLS = "tls"  # another TLS failure
    CLOSED = "closed"  # closed before the CONNACK
    NOT_AUTHORIZED = "not_authorized"  # CONNACK: bad user, not authorised, banned
    BROKER_BUSY = "broker_busy"  # CONNACK: unavailable, busy, quota
    CONNACK = "connack"  # CONNACK: another refusal
    LOST = "lost"  # the connection went down
    PUBLISH_REFUSED = "publish_refused"  # a PUBACK refused records (the ACL)
    NO_SUBSCRIBERS = "no_subscribers"  # a PUBACK said nobody subscribes: kept, sent again
    RECONNECTED = "reconnected"  # not a problem: the line saying it is over (gated too)


#: The cause in a few words, for ``systemctl status`` (STATUS=), ``gateway.py status`` and
#: the health record: "uplink down since 14:02 (TLS: unknown CA), 1,234 queued".
LABELS: dict[str, str] = {
    Problem.DNS: "DNS", Problem.TCP_REFUSED: "refused", Problem.TIMEOUT: "timeout",
    Problem.UNREACHABLE: "unreachable", Problem.NETWORK: "network",
    Problem.BROKER_UNTRUSTED: "TLS: unknown CA", Problem.BROKER_NAME: "TLS: name mismatch",
    Problem.BROKER_CERT_TIME: "TLS: expired", Problem.CERT_REFUSED: "TLS: certificate refused",
    Problem.TLS: "TLS", Problem.CLOSED: "closed by the broker",
    Problem.NOT_AUTHORIZED: "authentication refused", Problem.BROKER_BUSY: "broker busy",
    Problem.CONNACK: "refused by the broker", Problem.LOST: "connection lost",
    Problem.PUBLISH_REFUSED: "ACL refusal",
    Problem.NO_SUBSCRIBERS: "no subscriber at the platform",
    # the gateway refusing its own TLS files (uplink/certs.py)
    CertProblem.CN_MISMATCH: "certificate: for another gateway",
    CertProblem.KEY_MISMATCH: "certificate: key mismatch",
    CertProblem.EXPIRED: "certificate: expired",
    CertProblem.NOT_YET_VALID: "certificate: not yet valid",
    CertProblem.CERT_UNREADABLE: "certificate: unreadable",
    CertProblem.CERT_NOT_PEM: "certificate: not PEM",
    CertProblem.KEY_UNREADABLE: "key: unreadable", CertProblem.KEY_NOT_PEM: "key: not PEM",
    CertProblem.KEY_ENCRYPTED: "key: has a passphrase",
    CertProblem.CA_UNREADABLE: "CA file: unreadable", CertProblem.CA_NOT_PEM: "CA file: not PEM",
    CertProblem.CA_NOT_CA: "CA file: not a CA", CertProblem.CA_EXPIRED: "CA file: expired",
    CertProblem.CA_NOT_YET_VALID: "CA file: not yet valid",
    CertProblem.TLS_UNUSABLE: "TLS files unusable",
}


def label(reasons: str) -> str:
    """The words for a state's reason codes (``broker_untrusted`` -> ``TLS: unknown CA``;
    a refusal's codes are space-separated); an unknown code is shown as it is."""
    return ", ".join(LABELS.get(code, code) for code in reasons.split())


#: What is said is remembered per problem: a connection problem, or a certificate problem
#: with its severity (a deferred finding that becomes an error is said again at once).
Key = Problem | tuple[CertProblem, Severity]


@dataclass(frozen=True, slots=True)
class Failure:
    """A failure to connect: what it is and what to do."""

    code: Problem
    what: str
    todo: str


@dataclass(frozen=True, slots=True)
class Say:
    """A line for the log."""

    level: int
    text: str


@dataclass(frozen=True, slots=True)
class Record:
    """An ``uplink.refused`` record to seal (its body)."""

    body: dict[str, JSON]


Action = Say | Record


# -- classification ---------------------------------------------------------------------
def connect_failure(exc: BaseException | None, where: str, *, ca_file: str | None,
                    tls: bool) -> Failure:
    """The failure of a connect attempt that raised *exc* (None: not known)."""
    if isinstance(exc, socket.gaierror):
        return Failure(Problem.DNS, f"the broker's host name in {where} does not resolve "
                       f"({exc.strerror or exc})",
                       "check [broker] host and this gateway's DNS (resolv.conf)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verify_failure(exc, where, ca_file)
    if isinstance(exc, ssl.SSLError):
        return _tls_failure(str(exc), where)
    if isinstance(exc, OSError):
        return _socket_error(exc, where, tls)
    detail = f" ({exc})" if exc is not None else ""
    return Failure(Problem.NETWORK, f"cannot connect to {where}{detail}", _CHECK_NETWORK)


_CHECK_NETWORK = "check the network, a firewall, and [broker] host and port"
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN,
                          errno.EHOSTDOWN})


def _socket_error(exc: OSError, where: str, tls: bool) -> Failure:
    if isinstance(exc, ConnectionRefusedError):
        return Failure(Problem.TCP_REFUSED, f"nothing accepts connections at {where} "
                       "(connection refused)",
                       "check that the broker runs and [broker] host and port "
                       f"({'its TLS port, usually 8883' if tls else 'its plain MQTT port'})")
    if isinstance(exc, TimeoutError):
        return Failure(Problem.TIMEOUT, f"no answer from {where} (timed out)", _CHECK_NETWORK)
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return Failure(Problem.CLOSED, f"{where} closed the connection during the "
                       "handshake", _closed_todo(tls))
    if exc.errno in _UNREACHABLE:
        return Failure(Problem.UNREACHABLE, f"{where} is unreachable "
                       f"({exc.strerror or exc})", "check this gateway's network link and "
                       "route")
    return Failure(Problem.NETWORK, f"cannot connect to {where} ({exc})", _CHECK_NETWORK)


def _closed_todo(tls: bool) -> str:
    if tls:
        return ("check that the port is the broker's TLS port, and that the broker trusts "
                "this gateway's certificate (the broker's log says why)")
    return "check that the port takes plain MQTT (tls = false) and the broker's log"


def _verify_failure(exc: ssl.SSLCertVerificationError, where: str,
                    ca_file: str | None) -> Failure:
    code = getattr(exc, "verify_code", None)
    message = getattr(exc, "verify_message", None) or str(exc)
    if code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
        return Failure(Problem.BROKER_NAME, f"the broker's certificate is not for the host "
                       f"dialled in {where} ({message})",
                       "set [broker] host to a name its certificate holds, or have the "
                       "broker's certificate reissued with this name")
    if code in (_CERT_HAS_EXPIRED, _CERT_NOT_YET_VALID):
        return Failure(Problem.BROKER_CERT_TIME, f"the broker's certificate at {where} is "
                       f"refused: {message}", "if this gateway's clock is right, the "
                       "platform must renew the broker's certificate; otherwise fix the "
                       "clock (NTP, GNSS)")
    return Failure(Problem.BROKER_UNTRUSTED, f"the broker at {where} is not trusted: its "
                   f"certificate is not signed by the CA in ca_file {ca_file} ({message})",
                   "install the platform's CA certificate as ca_file, and check [broker] "
                   "host is the platform's broker")


def _tls_failure(text: str, where: str) -> Failure:
    upper = text.upper()
    if "ALERT" in upper:  # the broker's TLS alert: it did not take our certificate
        return Failure(Problem.CERT_REFUSED, f"the broker at {where} refused this gateway's "
                       f"certificate ({_short(text)})",
                       "install the certificate the platform's CA issued for this gateway "
                       "(cert_file, key_file); if it is recent, ask the platform whether it "
                       "was revoked or the broker trusts its CA")
    if "WRONG_VERSION_NUMBER" in upper or "RECORD_LAYER" in upper:
        return Failure(Problem.TLS, f"{where} does not speak TLS ({_short(text)})",
                       "check [broker] port: the broker's TLS port (8883), not its plain "
                       "MQTT port")
    return Failure(Problem.TLS, f"the TLS handshake with {where} failed ({_short(text)})",
                   "check ca_file, cert_file and key_file, and the broker's log")


_PAHO_PREFIXES = ("failed to receive on socket: ", "failed to send on socket: ",
                  "timeout on socket: ")


def _short(text: str) -> str:
    """An OpenSSL message without paho's prefix, OpenSSL's code and its source position:
    ``sslv3 alert bad certificate``."""
    for prefix in _PAHO_PREFIXES:
        text = text.removeprefix(prefix)
    if text.startswith("[SSL: ") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(" (_ssl.c:", maxsplit=1)[0].strip()


def socket_failure(text: str | None, where: str, *, tls: bool) -> Failure:
    """The connection closed before the CONNACK; *text* is paho's last socket error."""
    if text and tls and ("SSL" in text or "alert" in text):
        return _tls_failure(text, where)
    detail = f" ({_short(text)})" if text else ""
    return Failure(Problem.CLOSED, f"{where} closed the connection before accepting it"
                   f"{detail}", _closed_todo(tls))


def connack_failure(code: int, reason: str, where: str, client_id: str) -> Failure:
    """The broker's CONNACK refused the connection with *code*."""
    if code in _AUTH_CODES:
        return Failure(Problem.NOT_AUTHORIZED, f"the broker at {where} refused the "
                       f"connection: {reason} (CONNACK 0x{code:02X})",
                       f"the platform must allow this gateway ({client_id}, its certificate's "
                       "CN) on the broker: user, ACL, ban list")
    if code in _BUSY_CODES:
        return Failure(Problem.BROKER_BUSY, f"the broker at {where} cannot take the "
                       f"connection now: {reason} (CONNACK 0x{code:02X})",
                       "nothing to do here if it passes; otherwise the platform's broker "
                       "needs attention")
    return Failure(Problem.CONNACK, f"the broker at {where} refused the connection: "
                   f"{reason} (CONNACK 0x{code:02X})", "check the broker's log")


def duration(ns: int) -> str:
    """*ns* for people: ``45 s``, ``3 min 5 s``, ``2 h 10 min``, ``3 d 4 h``."""
    s = max(0, ns // _NS_PER_S)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


# -- telling ----------------------------------------------------------------------------
@dataclass(slots=True)
class _Told:
    """One problem: when it was last said, how often it came back since."""

    said_ns: int
    since: int = 0  # occurrences not said
    total: int = 1
    over: bool = False  # the uplink connected (or the certificate was fixed) since


@dataclass(slots=True)
class _Outage:
    since_ns: int
    attempts: int = 0
    #: the broker's refusal of this gateway seen in this outage (a TLS alert against its
    #: certificate, a CONNACK refusing it): a later close without a word is that again
    refusal: Failure | None = None


#: What a broker says when it refuses this gateway. The same refusal can reach the gateway
#: as a close without a word (Problem.CLOSED): under TLS 1.3 the broker checks the client's
#: certificate after the client has finished its handshake, then sends its alert and
#: closes, and a client that reads the close first sees only an EOF ("EOF occurred in
#: violation of protocol"); a broker refusing a CONNACK may close as it sends it. Within an
#: outage that has seen the refusal, such a close is counted as it and does not replace
#: the diagnosis (nor is said as a new problem, nor flips the status).
_REFUSALS = frozenset({Problem.CERT_REFUSED, Problem.NOT_AUTHORIZED})


@dataclass
class _State:
    name: str = "starting"  # starting, connecting, connected, refused, retrying
    reason: str | None = None
    recorded: set[CertProblem] = field(default_factory=set)


class UplinkWatch:
    """The uplink's state and what to say about it; one per uplink, fed on one thread."""

    def __init__(self, where: str, *, repeat_ns: int = REPEAT_NS,
                 warning_repeat_ns: int = WARNING_REPEAT_NS) -> None:
        self.where = where
        self._repeat_ns = repeat_ns
        self._warning_repeat_ns = warning_repeat_ns
        self._told: dict[Key, _Told] = {}  # bounded: Key is a closed set
        self._state = _State()
        self._outage: _Outage | None = None
        self._connected_once = False

    # -- what it knows --------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``connected``, ``refused: <reasons>``, ``retrying: <reason>``, ``connecting``,
        ``starting``."""
        st = self._state
        return st.name if st.reason is None else f"{st.name}: {st.reason}"

    @property
    def refused(self) -> bool:
        return self._state.name == "refused"

    # -- facts ----------------------------------------------------------------------------
    def certificates(self, report: CertReport, now_ns: int) -> list[Action]:
        """The certificate check's result. Errors make a refusal (the caller does not
        connect); a clean check after a refusal says the problem is fixed."""
        out: list[Action] = []
        errors = report.errors
        st = self._state
        if errors:
            self._begin_outage(now_ns).attempts += 1
            st.name, st.reason = "refused", " ".join(f.code for f in errors)
            for finding in errors:
                out += self._tell((finding.code, finding.severity), now_ns, logging.ERROR,
                                  f"uplink refuses to connect: {finding.line} (records "
                                  "are kept in the store meanwhile)",
                                  again="uplink still refuses to connect", line=finding.line)
                if finding.code not in st.recorded:
                    st.recorded.add(finding.code)
                    out.append(Record(_refused_body(finding, report, errors)))
        elif st.name == "refused":
            st.name, st.reason = "connecting", None
            st.recorded.clear()
            self._end(certificates=True)
            out.append(Say(logging.WARNING, "uplink: the certificate problem is fixed; "
                           f"connecting to {self.where}"))
        for finding in report.findings:
            if finding.severity is not Severity.ERROR:
                label = ("uplink certificate (deferred)" if finding.severity is
                         Severity.DEFERRED else "uplink certificate")
                out += self._tell((finding.code, finding.severity), now_ns, logging.WARNING,
                                  f"{label}: {finding.line}", again=label,
                                  line=finding.line, repeat_ns=self._warning_repeat_ns)
        return out

    def connecting(self) -> None:
        """A new connection is being made (after a clean certificate check, or plaintext)."""
        self._state.name, self._state.reason = "connecting", None

    def failed(self, failure: Failure, now_ns: int) -> list[Action]:
        """A connect attempt failed."""
        outage = self._begin_outage(now_ns)
        outage.attempts += 1
        if failure.code in _REFUSALS:
            outage.refusal = failure
        elif failure.code is Problem.CLOSED and outage.refusal is not None:
            failure = outage.refusal  # the refusal again, its alert lost in a race
        self._state.name, self._state.reason = "retrying", failure.code
        line = f"{failure.what}: {failure.todo}"
        return self._tell(failure.code, now_ns, logging.ERROR,
                          f"uplink cannot connect: {line}; retrying (records are kept in "
                          "the store meanwhile)", again="uplink still cannot connect",
                          line=line)

    def lost(self, reason: str, now_ns: int) -> list[Action]:
        """The connection went down."""
        self._begin_outage(now_ns)
        self._state.name, self._state.reason = "retrying", Problem.LOST
        return self._tell(Problem.LOST, now_ns, logging.WARNING,
                          f"uplink lost the broker {self.where} ({reason}); reconnecting",
                          again="uplink lost the broker again", line=reason)

    def connected(self, now_ns: int, backlog: int | None) -> list[Action]:
        """The broker accepted the connection; *backlog*: records queued in the store."""
        outage, again = self._outage, " again" if self._connected_once else ""
        self._outage = None
        self._connected_once = True
        self._state.name, self._state.reason = "connected", None
        self._end(certificates=False)
        queued = "" if backlog is None else f"; {backlog} records queued go out now"
        if outage is None:
            return [Say(logging.INFO, f"uplink connected to {self.where}{queued}")]
        down = (f"after {duration(now_ns - outage.since_ns)} without it "
                f"({outage.attempts} failed attempts){queued}")
        return self._tell(Problem.RECONNECTED, now_ns, logging.WARNING,
                          f"uplink connected{again} to {self.where} {down}",
                          again=f"uplink connected{again} to {self.where}", line=down)

    def publish_refused(self, rows: int, reason: str, topic: str,
                        now_ns: int) -> list[Action]:
        """A PUBACK refused *rows* records (they stay queued)."""
        return self._tell(Problem.PUBLISH_REFUSED, now_ns, logging.ERROR,
                          f"uplink: the broker refused {rows} records ({reason}): its ACL "
                          f"must let this gateway write {topic} (the certificate's CN is "
                          "the gateway id); they stay queued",
                          again="uplink: the broker still refuses records",
                          line=f"{reason}; check the ACL for {topic}")

    def no_subscribers(self, rows: int, topic: str, retry_s: float,
                       now_ns: int) -> list[Action]:
        """A PUBACK said no client subscribes to *topic* (MQTT 5 reason 0x10): the broker
        kept nothing, so the *rows* records stay queued and go out again."""
        return self._tell(Problem.NO_SUBSCRIBERS, now_ns, logging.WARNING,
                          f"uplink: the broker has no subscriber for {topic} (PUBACK 'No "
                          f"matching subscribers'): the platform's consumers have never "
                          f"subscribed (start 'ingest consume' before the gateways); {rows} "
                          f"records stay queued and go out again (every {retry_s:.0f} s at most)",
                          again="uplink: still no subscriber at the platform; records stay "
                                "queued",
                          line=f"no subscriber for {topic}")

    # -- telling ---------------------------------------------------------------------------
    def _begin_outage(self, now_ns: int) -> _Outage:
        if self._outage is None:
            self._outage = _Outage(now_ns)
        return self._outage

    def _end(self, *, certificates: bool) -> None:
        """The certificate problems, or the connection's, are over: the next one is said at
        once, unless the same was said within the repeat interval (flapping: counted)."""
        for key, told in self._told.items():
            if isinstance(key, tuple) == certificates and key is not Problem.RECONNECTED:
                told.over = True

    def _tell(self, key: Key, now_ns: int, level: int, first: str, *, again: str,
              line: str, repeat_ns: int | None = None) -> list[Action]:
        """Say *first* the first time; then at most once per *repeat_ns* (default
        :data:`REPEAT_NS`), *again* with the count of what was not said."""
        every = repeat_ns or self._repeat_ns
        told = self._told.get(key)
        if told is None or (told.over and now_ns - told.said_ns >= every):
            self._told[key] = _Told(now_ns)
            return [Say(level, first)]
        told.total += 1
        told.over = False
        if now_ns - told.said_ns < every:
            told.since += 1
            return []
        text = (f"{again} ({told.since + 1} times in the last "
                f"{duration(now_ns - told.said_ns)}, {told.total} in all): {line}")
        told.said_ns, told.since = now_ns, 0
        return [Say(level, text)]


def _refused_body(finding: Finding, report: CertReport,
                  errors: Iterable[Finding]) -> dict[str, JSON]:
    """What an ``uplink.refused`` record says: codes and the certificate's fingerprint and
    validity (no key, no personal data)."""
    return {"reason": str(finding.code), "problems": [str(f.code) for f in errors],
            "cert_sha256": report.fingerprint, "not_before": report.not_before_ms,
            "not_after": report.not_after_ms}
