"""Forward committed records over MQTT (TLS, client certificate) at QoS 1.

Threads: paho's own network loop, and the forwarder thread, which reads the
store, publishes batches and turns PUBACKs into deletions (sent to the store
writer: one writer owns the store). paho's callbacks only put facts on one
queue and set a wake-up event: they touch no state of ours and take no lock of
ours, because paho calls ``on_publish`` while holding its own message lock.
:attr:`Forwarder.stats` is written on the forwarder thread alone.

The delivery logic (window, cursors, PUBACK bookkeeping, reset on reconnect)
is the sans-IO :class:`uplink.delivery.Delivery`; this module is its glue. So
is the watch for another client taking our client id
(:class:`uplink.takeover.TakeoverWatch`): the uplink resumes its MQTT session on
every reconnect, and a takeover it sees becomes an ``uplink.takeover`` alarm
record, submitted to the store writer from this thread.

Before it connects, and every :data:`CERT_CHECK_S` after, the forwarder thread checks
the TLS files (uplink/certs.py): with an error it does not connect (or disconnects) and
says why (uplink/failures.py: an ERROR line at once, then at most once a minute, and an
``uplink.refused`` record per distinct problem); recording goes on, the records wait in
the store. Files that changed are judged once they stayed still for :data:`CERT_SETTLE_S`
(a certificate and its key are placed one after the other); if they check clean (a
renewed certificate) they are taken at once: a new paho client is made with them and
connects, resuming the MQTT session. Connection
failures (DNS, TCP, TLS, CONNACK) are classified and said the same way, and the
connection coming back is one line. :attr:`UplinkStats.state` says where the uplink
stands (``connected``, ``refused: <reasons>``, ``retrying: <reason>``); *on_state* hears
each change (systemd's STATUS=).
"""

from __future__ import annotations

import json
import logging
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from buffer.store import StoreReader
from buffer.writer import StoreWriter
from core.clock import NS_PER_MS, kernel_clock_synced
from core.deflate import deflate_message
from core.kinds import Priority
from core.mqtt import (
    RECONNECT_MAX_S,
    RECONNECT_MIN_S,
    BrokerConfig,
    MqttSetupError,
    make_client,
)
from core.record import JSON, Reading, Source
from core.topics import records_topic, status_topic
from uplink.certs import check_certificates, read_tls_files, unusable
from uplink.delivery import (
    MAX_DELETIONS_WAITING,
    WINDOW,
    Delete,
    Delivery,
    Ignored,
    ReadFrom,
    Refused,
)
from uplink.failures import (
    REFUSED_KIND,
    Action,
    Failure,
    Record,
    Say,
    UplinkWatch,
    connack_failure,
    connect_failure,
    socket_failure,
)
from uplink.linger import FLUSH, HOLDABLE, LIVE, RELEASE_REASONS, URGENT, Linger
from uplink.takeover import Takeover, TakeoverWatch

__all__ = ["BATCH_BYTES", "BATCH_RECORDS", "MAX_DELETIONS_WAITING", "WINDOW", "AckHook",
           "Forwarder", "UplinkStats"]

log = logging.getLogger(__name__)

BATCH_RECORDS = 200
BATCH_BYTES = 128 * 1024
#: Held records (uplink/linger.py) go out once they reach this many bytes, whatever their
#: age: half a batch, so a read of up to :data:`BATCH_BYTES` always shows the bound reached.
HOLD_BYTES = BATCH_BYTES // 2
#: A read that skips a class names this cursor for it: above every seq (SQLite's INTEGER).
_SKIP = 2**63 - 1
#: The forwarder thread looks at its queue at least this often, seconds.
POLL_S = 1.0
#: How often :meth:`Forwarder.wait_idle` nudges the thread, seconds.
IDLE_CHECK_S = 0.1
#: How long :meth:`Forwarder.stop` waits for the forwarder thread, seconds.
STOP_JOIN_S = 10.0
#: The next reconnect waits RECONNECT_MIN_S times a factor drawn in this range.
RECONNECT_JITTER = (0.5, 2.0)
#: How long the broker keeps our session after we drop, seconds: a reconnect within it
#: resumes the session, and finding none is a sign of a takeover (uplink/takeover.py). The
#: session holds our command subscription and the commands queued for us (docs/commands.md:
#: a gateway offline for weeks gets them when back); every connect resumes it, the first
#: of a process too. 30 days (a broker may cap it: docs/broker.md).
SESSION_EXPIRY_S = 30 * 86_400
#: The messages the broker may send us unacknowledged (MQTT v5 Receive Maximum): bounds
#: the commands waiting in memory (app/commands.py acknowledges each once answered).
RECEIVE_MAXIMUM = 16
#: After a message from the platform (a command: an installer authorising a tag, an officer
#: asking where a tag is), nothing is held for this long, seconds: someone is watching
#: this gateway, and its positions go out as they come (uplink/linger.py).
LIVE_AFTER_COMMAND_S = 600.0
#: The record kind of a detected takeover of our client id (an alarm).
TAKEOVER_KIND = "uplink.takeover"

#: How often the TLS files are checked again (refused: whether they were fixed; running:
#: whether they expire, changed, or trusted time now says they are not yet valid), seconds.
CERT_CHECK_S = 15.0
#: MQTT 5 PUBACK reason 0x10: no client subscribes to the topic, so the broker kept
#: nothing — a success to MQTT, not a delivery to us: the records stay queued.
NO_MATCHING_SUBSCRIBERS = 0x10
#: After such a PUBACK, the queue is sent again from its oldest record: first this much
#: later, then twice as long each time up to :data:`NO_SUBSCRIBERS_RETRY_S` (a platform
#: whose consumers reconnect after a broker restart is caught up within seconds).
NO_SUBSCRIBERS_FIRST_RETRY_S = 2.0
NO_SUBSCRIBERS_RETRY_S = 30.0
#: Files that changed since the last check are looked at again this much later before they
#: are judged: a certificate and its key are replaced one after the other, seconds.
CERT_SETTLE_S = 2.0
#: paho's error lines that say why a connection closed (the broker's TLS alert is there).
_SOCKET_ERRORS = ("failed to receive on socket", "failed to send on socket",
                  "timeout on socket")

#: Called on the forwarder's thread with each PUBACKed batch (class, seqs increasing).
AckHook = Callable[[Priority, list[int]], None]
#: UTC now in milliseconds, and whether that time is trusted (NTP or GNSS).
UtcNow = Callable[[], tuple[int, bool]]
#: Called on the forwarder's thread with the uplink's new state (UplinkStats.state).
StateHook = Callable[[str], None]
#: Called on paho's thread with a message of a topic :meth:`Forwarder.listen` named and the
#: function that acknowledges it (PUBACK): call it once the message is answered, from any
#: thread; it does nothing if the connection it came on is gone (the broker sends the
#: message again on the next one). The handler must not block.
MessageHandler = Callable[[bytes, Callable[[], None]], None]
#: The number of records queued in the store (called on the forwarder's thread).
Backlog = Callable[[], int]


def system_time() -> tuple[int, bool]:
    """The system clock, trusted when the kernel says NTP synchronised it."""
    return time.time_ns() // NS_PER_MS, kernel_clock_synced()


# -- facts from paho's thread ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Connected:
    session_present: bool
    #: How long the broker keeps the session: ours, unless its CONNACK said otherwise.
    session_expiry_s: int


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    reason: str
    code: int = 0  # the CONNACK's reason code


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """A connect attempt raised (DNS, TCP, TLS handshake); *failure* says which, when the
    exception was known."""

    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class SocketError:
    """paho's error line about the socket (e.g. the broker's TLS alert)."""

    text: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str
    #: The reason code of the broker's DISCONNECT; None when the connection just closed.
    code: int | None = None


@dataclass(frozen=True, slots=True)
class Published:
    """The PUBACK of message *mid*; *refused* when its reason code is a failure."""

    mid: int
    refused: bool
    reason: str


@dataclass(frozen=True, slots=True)
class PlatformSpoke:
    """A message of a topic :meth:`Forwarder.listen` named arrived (a platform's command)."""


UplinkEvent = (Connected | ConnectRefused | ConnectFailed | SocketError | Disconnected
               | Published | PlatformSpoke)


@dataclass
class UplinkStats:
    """Written on the forwarder thread only; other threads read plain values."""

    connects: int = 0
    disconnects: int = 0
    messages_published: int = 0
    records_published: int = 0
    records_acked: int = 0
    refused: int = 0
    no_subscribers: int = 0  # records a PUBACK said nobody subscribes to (kept, sent again)
    ignored_acks: int = 0
    connect_failures: int = 0
    taken_over: int = 0  # the broker said "session taken over" (0x8E)
    sessions_lost: int = 0  # reconnected in time, and the broker had no session for us
    takeover_records: int = 0  # uplink.takeover records submitted
    failed_attempts: int = 0  # connects that failed: raised, closed, or refused by CONNACK
    cert_checks: int = 0
    refused_records: int = 0  # uplink.refused records submitted
    #: Records of the position and heartbeat classes the linger holds now (in the store,
    #: not read to be sent yet; uplink/linger.py); 0 when nothing is held.
    held: int = 0
    #: Times held records went out, by why (uplink/linger.py RELEASE_REASONS).
    releases: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELEASE_REASONS, 0))
    #: Times the forwarder looked at what it holds (a test's "it looked and still holds").
    hold_checks: int = 0
    messages_deflated: int = 0  # sent compressed (core/deflate.py)
    connected: bool = False
    last_error: str | None = None
    #: ``connected``, ``refused: <reasons>``, ``retrying: <reason>``, ``connecting``...
    state: str = "starting"


class Forwarder:
    def __init__(
        self,
        gateway_id: str,
        broker: BrokerConfig,
        reader: StoreReader,
        writer: StoreWriter,
        *,
        window: int = WINDOW,
        batch_records: int = BATCH_RECORDS,
        on_acked: AckHook | None = None,
        source: Source | None = None,
        now_ns: Callable[[], int] = time.monotonic_ns,
        heads: bool = True,
        utc_now: UtcNow = system_time,
        on_state: StateHook | None = None,
        backlog: Backlog | None = None,
        linger_s: float = 0.0,
        deflate: bool = False,
    ) -> None:
        self.gateway_id = gateway_id
        #: End every message with the signed head statement (core/head.py): how far the
        #: chain is committed, so the platform can tell a dropped tail from a quiet gateway.
        self.heads = heads
        self.broker = broker
        self._reader = reader
        self._writer = writer
        self._batch = batch_records
        self.on_acked = on_acked
        self._topic = records_topic(gateway_id)
        self._status = status_topic(gateway_id)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._recheck = threading.Event()  # check_files_now(): look at the files at once
        self._events: queue.SimpleQueue[UplinkEvent] = queue.SimpleQueue()
        self._delivery = Delivery(window=window)
        self._takeover = TakeoverWatch()
        self._source = source or Source("gateway", gateway_id)
        self._now_ns = now_ns
        self._utc_now = utc_now
        self._on_state = on_state
        self._backlog = backlog
        #: Records of the position and heartbeat classes may wait up to *linger_s* so one
        #: message carries several under one head (uplink/linger.py); 0: none waits.
        self.linger_s = linger_s
        self._linger = Linger(round(linger_s * 1e9), batch_records, HOLD_BYTES)
        #: What the linger is measured with (monotonic ns); a test may replace it.
        self.linger_clock: Callable[[], int] = now_ns
        #: Read everything, held classes too, until a read finds nothing: at the start,
        #: after every rewind (a reconnect) and once held records are released.
        self._sending = True
        self._flush = threading.Event()  # flush(): send what is held at once
        #: Send each message compressed (core/deflate.py) when that makes it smaller: only
        #: for a platform that reads such messages (``[uplink] deflate``).
        self.deflate = deflate
        self._live_until_ns: int | None = None  # nothing held until then (a command came)
        self._live_ns = int(LIVE_AFTER_COMMAND_S * 1e9)  # read here: tests may scale it
        self.stats = UplinkStats()
        self.idle = threading.Event()
        self._commits = 0  # notify() calls (the writer's thread alone adds to it)
        self.client_id = f"gw-{gateway_id}"
        self._where = f"{broker.host}:{broker.port}"
        self._watch = UplinkWatch(self._where)
        self._check_ns = int(CERT_CHECK_S * 1e9)  # read here: tests scale it down
        self._no_subscribers_retry_s = NO_SUBSCRIBERS_RETRY_S  # read here: tests scale it
        self._no_subscribers_delay_s = min(NO_SUBSCRIBERS_FIRST_RETRY_S,
                                           self._no_subscribers_retry_s)
        self._resend_at_ns: int | None = None
        self._settle_ns = int(CERT_SETTLE_S * 1e9)
        self._seen_files: str | None = None  # the digest of the files at the last check
        self._next_check_ns: int | None = None
        # the paho client is made once the TLS files check clean (never before: loading an
        # encrypted key would ask for a passphrase on the terminal), again when they change
        self._client: mqtt.Client | None = None
        self._client_files: str | None = None  # the digest of the files it was made with
        self._loop_started = False
        self._ever_connected = False  # later clients resume the session
        self._connack_refused = False  # the attempt under way was refused by its CONNACK
        self._socket_error: str | None = None  # paho's last socket error line
        self._unloadable: tuple[str, str] | None = None  # (digest, why) OpenSSL refused them
        #: Topics subscribed at each connect (QoS 1), with their handlers (:meth:`listen`).
        self._listening: dict[str, MessageHandler] = {}
        self._connection = 0  # counts CONNACKs (paho's thread): acks of older ones are moot
        if not broker.tls:
            self._client = self._new_client()
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)

    @property
    def client(self) -> mqtt.Client:
        """The paho client in use (none before the TLS files checked clean)."""
        if self._client is None:
            raise RuntimeError(f"the uplink has no MQTT client yet ({self.stats.state})")
        return self._client

    def _new_client(self) -> mqtt.Client:
        client = make_client(self.client_id, self.broker)
        client.will_set(self._status, self._status_payload(online=False), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        client.on_log = self._on_log
        # incoming QoS 1 messages are acknowledged by whoever handles them, once answered
        # (a command: once its outcome is committed); anything else at once
        client.manual_ack_set(True)
        client.on_message = self._on_unexpected
        for topic, handler in self._listening.items():
            client.message_callback_add(topic, self._handler(client, handler))
        return client

    def _acker(self, client: mqtt.Client, mid: int, qos: int) -> Callable[[], None]:
        connection = self._connection

        def ack() -> None:
            if qos > 0 and self._client is client and self._connection == connection:
                client.ack(mid, qos)
        return ack

    def _handler(self, client: mqtt.Client,
                 handler: MessageHandler) -> Callable[[mqtt.Client, Any, Any], None]:
        def on_message(_c: mqtt.Client, _u: Any, message: Any) -> None:
            self._post(PlatformSpoke())  # someone at the platform deals with us: go live
            handler(bytes(message.payload), self._acker(client, message.mid, message.qos))
        return on_message

    def _on_unexpected(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        del userdata
        if message.qos > 0:
            client.ack(message.mid, message.qos)

    def listen(self, topic: str, handler: MessageHandler) -> None:
        """Subscribe to *topic* at QoS 1 at every connect (on the persistent session, so
        what arrives while we are away waits for us), its messages to *handler* with
        manual acknowledgement. Call before :meth:`start`."""
        self._listening[topic] = handler
        if self._client is not None:
            self._client.message_callback_add(topic, self._handler(self._client, handler))

    def _status_payload(self, *, online: bool) -> bytes:
        return json.dumps({"gw": self.gateway_id, "online": online}).encode()

    # -- API -------------------------------------------------------------------
    def start(self) -> None:
        """Start the forwarder thread: it checks the TLS files, then connects."""
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def notify(self) -> None:
        """New records were committed."""
        self._commits += 1
        self.idle.clear()
        self._wake.set()

    def flush(self) -> None:
        """Send what the linger holds now (and whatever comes until the store is read
        out), without waiting for the linger."""
        self._flush.set()
        self.idle.clear()
        self._wake.set()

    def check_files_now(self) -> None:
        """The TLS files were just replaced (a renewal installed them): check them now, not
        at the next periodic check up to :data:`CERT_CHECK_S` later (a change is judged
        once the files stayed still for :data:`CERT_SETTLE_S`)."""
        self._recheck.set()
        self._wake.set()

    def stop(self) -> None:
        """Stop the forwarder thread, say offline, disconnect and join paho's loop."""
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(STOP_JOIN_S)
            if self._thread.is_alive():
                log.error("the uplink thread did not stop within %.0f s", STOP_JOIN_S)
        self._close_client()

    def _close_client(self) -> None:
        """Say offline (if connected), disconnect and join paho's loop; what the old client
        reported meanwhile is applied without being said (we closed it)."""
        client = self._client
        if client is None:
            return
        if self.stats.connected:
            client.publish(self._status, self._status_payload(online=False), 1, retain=True)
        client.disconnect()
        if self._loop_started:
            client.loop_stop()  # joins paho's network thread
            self._loop_started = False
        self._drain_events(quiet=True)
        self._delivery.connection_lost()
        self.stats.connected = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything committed so far is acknowledged by the broker (False at
        once while the uplink refuses to connect)."""
        if self._watch.refused:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.flush()  # held records are committed records: they go too
            if self.idle.wait(IDLE_CHECK_S):
                return True
        return False

    def side_exchange(self, answer_topic: str, request_topic: str, payload: bytes,
                      on_answer: Callable[[bytes], None]) -> bool:
        """Subscribe to *answer_topic* (its messages go to *on_answer*, on paho's thread),
        then publish *payload* on *request_topic*, both at QoS 1 over this uplink's own
        connection: certificate renewal (app/renewal.py). The broker binds the client id to
        the certificate, so a second connection would take this one's session. The request's
        PUBACK is not the delivery's (counted in ``ignored_acks``). False when not connected."""
        client = self._client
        if client is None or not self.stats.connected:
            return False
        def answered(_c: mqtt.Client, _u: Any, message: Any) -> None:
            try:
                on_answer(bytes(message.payload))
            finally:
                self._acker(client, message.mid, message.qos)()

        client.message_callback_add(answer_topic, answered)
        client.subscribe(answer_topic, qos=1)  # before the request, on the same connection
        return client.publish(request_topic, payload, qos=1).rc == mqtt.MQTT_ERR_SUCCESS

    # -- paho callbacks (paho's thread): only queue facts ---------------------------
    def _post(self, event: UplinkEvent) -> None:
        self._events.put(event)
        self._wake.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        del userdata
        if reason.is_failure:
            self._post(ConnectRefused(str(reason), int(reason.value)))
            return
        self._connection += 1
        client.publish(self._status, self._status_payload(online=True), qos=1, retain=True)
        for topic in self._listening:  # kept by a resumed session; made by a new one
            client.subscribe(topic, qos=1)
        expiry = getattr(properties, "SessionExpiryInterval", SESSION_EXPIRY_S)
        self._post(Connected(bool(flags.session_present), int(expiry)))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        del client, userdata
        # paho calls this inside its `except OSError:` around the connect: the exception
        # is the one being handled; classified here (a pure function), kept as text only
        exc = sys.exception()
        self._post(ConnectFailed(None if exc is None else connect_failure(
            exc, self._where, ca_file=self.broker.ca_file, tls=self.broker.tls)))

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        del client, userdata
        if level == mqtt.MQTT_LOG_ERR and text.startswith(_SOCKET_ERRORS):
            self._post(SocketError(text))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        del userdata, properties
        # jitter the next reconnect so a province of gateways does not reconnect in step
        client.reconnect_delay_set(
            max(1, round(RECONNECT_MIN_S * random.uniform(*RECONNECT_JITTER))),  # noqa: S311
            int(RECONNECT_MAX_S),
        )
        code = int(reason.value) if flags.is_disconnect_packet_from_server else None
        said = str(reason)
        if code is None and said == "Unspecified error":  # paho's words for a socket closed
            said = "connection closed: the broker stopped or the network failed"
        self._post(Disconnected(said, code))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        del client, userdata, properties
        kept = bool(reason.is_failure) or getattr(reason, "value", 0) == NO_MATCHING_SUBSCRIBERS
        self._post(Published(mid, kept, str(reason)))

    # -- the forwarder thread ---------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            now = self._now_ns()
            if self._next_check_ns is None or now >= self._next_check_ns \
                    or self._recheck.is_set():
                self._recheck.clear()
                self._next_check_ns = now + self._check_ns
                self._check(now)
                self._publish_state()
            wait_s = min(POLL_S, max(0.0, (self._next_check_ns - self._now_ns()) / 1e9))
            self._wake.wait(wait_s)
            self._wake.clear()
            self._drain_events()
            self._report_takeover()
            self._resend_kept()
            self._fill_window()
            self._publish_state()

    # -- the TLS files and the paho client (the forwarder thread) -----------------------
    def _check(self, now_ns: int) -> None:
        """Check the TLS files; connect when they are clean and no client runs, reconnect
        with them when they changed, disconnect when they are not usable any more."""
        broker = self.broker
        if not broker.tls:
            if not self._loop_started:
                self._watch.connecting()
                self._open(None)
            return
        files = read_tls_files(broker.ca_file, broker.cert_file, broker.key_file)
        if self._seen_files is not None and files.digest != self._seen_files:
            # changed since the last check: perhaps half-way through an install (the
            # certificate placed, not yet its key): judged once they stay still
            self._seen_files = files.digest
            self._next_check_ns = now_ns + min(self._settle_ns, self._check_ns)
            return
        self._seen_files = files.digest
        utc_ms, trusted = self._utc_now()
        report = check_certificates(files, self.gateway_id, now_ms=utc_ms, trusted=trusted)
        self.stats.cert_checks += 1
        if not report.refuse and self._unloadable is not None \
                and self._unloadable[0] == files.digest:
            report = unusable(self._unloadable[1])  # the same files OpenSSL would not load
        if not report.refuse and self._loop_started and files.digest != self._client_files:
            log.warning("uplink: the TLS files changed and check clean; reconnecting to %s "
                        "with them", self._where)
            self._close_client()
        if report.refuse and self._loop_started:
            self._close_client()  # e.g. trusted time shows it is not yet valid
        self._tell(self._watch.certificates(report, now_ns))
        if report.refuse or self._loop_started:
            return
        self._watch.connecting()
        problem = self._open(files.digest)
        if problem is not None:
            self._unloadable = (files.digest, problem)
            self._tell(self._watch.certificates(unusable(problem), now_ns))

    def _open(self, digest: str | None) -> str | None:
        """Make a paho client (with the TLS files as they are now) and start connecting;
        what OpenSSL said if it would not load the files."""
        if self._client is None or self._client_files != digest or self._ever_connected:
            try:
                self._client = self._new_client()
            except MqttSetupError as exc:
                return str(exc.__cause__ or exc)
            self._client_files = digest
        client = self._client
        self._connack_refused, self._socket_error = False, None
        # resume the session, at a process's first connect too: it holds our command
        # subscription and what was queued for us meanwhile (a clean one looks like a
        # takeover); a broker that has none starts one
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive_s,
                             clean_start=False, properties=props)
        client.loop_start()
        self._loop_started = True
        return None

    def _tell(self, actions: Iterable[Action]) -> None:
        for action in actions:
            match action:
                case Say(level, text):
                    log.log(level, "%s", text)
                case Record(body):
                    self._writer.submit(Reading(REFUSED_KIND, self._source, body,
                                                self._now_ns()))
                    self.stats.refused_records += 1

    def _publish_state(self) -> None:
        state = self._watch.state
        if state != self.stats.state:
            self.stats.state = state
            if self._on_state is not None:
                self._on_state(state)

    def _drain_events(self, *, quiet: bool = False) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._apply(event, quiet=quiet)

    def _apply(self, event: UplinkEvent, *, quiet: bool = False) -> None:
        """Apply one fact from paho; *quiet*: from a client we closed (the watch is not
        told: nothing is said, the state is the check's)."""
        stats = self.stats
        now_ns = self._now_ns()
        watch = _Silent() if quiet else self._watch
        said: list[Action] = []
        match event:
            case Published(mid, refused, reason):
                self._acked(self._delivery.puback(mid, refused=refused, reason=reason))
            case Connected(session_present, expiry_s):
                self._delivery.connection_made()
                self._rewound()
                stats.connects += 1
                stats.connected = True
                self._ever_connected = True
                said = watch.connected(now_ns, self._queued())
                if self._takeover.connected(session_present=session_present,
                                            session_expiry_s=expiry_s, now_ns=self._now_ns()):
                    stats.sessions_lost += 1
                    log.warning("the broker had no session for client id %s: it restarted "
                                "without keeping sessions, or another client connected with "
                                "this client id", self.client_id)
            case Disconnected(reason, code):
                stats.last_error = f"disconnected: {reason}"
                if self._takeover.disconnected(code, now_ns):
                    stats.taken_over += 1
                    log.error("another client connected with our client id %s: the broker "
                              "dropped us (session taken over)", self.client_id)
                if self._delivery.connection_lost():
                    stats.disconnects += 1
                    said = watch.lost(reason, now_ns)
                elif not (quiet or self._connack_refused):  # closed before a CONNACK
                    stats.failed_attempts += 1
                    said = watch.failed(socket_failure(
                        self._socket_error, self._where, tls=self.broker.tls), now_ns)
                self._connack_refused, self._socket_error = False, None
                stats.connected = False
            case ConnectRefused(reason, code):
                stats.last_error = f"connect refused: {reason}"
                stats.failed_attempts += 1
                self._connack_refused = True
                said = watch.failed(
                    connack_failure(code, reason, self._where, self.client_id), now_ns)
            case ConnectFailed(failure):
                stats.connect_failures += 1
                stats.failed_attempts += 1
                found = failure or connect_failure(None, self._where,
                                                   ca_file=self.broker.ca_file,
                                                   tls=self.broker.tls)
                stats.last_error = f"cannot connect: {found.what}"
                said = watch.failed(found, now_ns)
            case SocketError(text):
                self._socket_error = text
            case PlatformSpoke():
                self._live_until_ns = self.linger_clock() + self._live_ns
                self._release(LIVE)
        self._tell(said)

    def _queued(self) -> int | None:
        return None if self._backlog is None else self._backlog()

    def _report_takeover(self) -> None:
        """Write down a takeover seen (at most one record a minute: uplink/takeover.py)."""
        now_ns = self._now_ns()
        found = self._takeover.report(now_ns)
        if found is not None:
            self._writer.submit(Reading(TAKEOVER_KIND, self._source,
                                        self._takeover_body(found), now_ns))
            self.stats.takeover_records += 1

    def _takeover_body(self, found: Takeover) -> dict[str, JSON]:
        return {"taken_over": found.taken_over, "sessions_lost": found.sessions_lost,
                "client_id": self.client_id, "broker": f"{self.broker.host}:{self.broker.port}"}

    def _acked(self, outcome: Delete | Refused | Ignored) -> None:
        match outcome:
            case Delete(prio=prio, lo=lo, hi=hi, rows=rows, seqs=seqs):
                self._writer.delete_range(int(prio), lo, hi, rows)
                self.stats.records_acked += rows
                self._no_subscribers_delay_s = min(NO_SUBSCRIBERS_FIRST_RETRY_S,
                                                   self._no_subscribers_retry_s)
                if self.on_acked is not None:
                    self.on_acked(prio, list(seqs))
            case Refused(rows=rows, reason=reason) if reason == "No matching subscribers":
                self.stats.no_subscribers += rows
                self.stats.last_error = "no subscriber at the platform: records kept"
                now = self._now_ns()
                if self._resend_at_ns is None:
                    self._resend_at_ns = now + int(self._no_subscribers_delay_s * 1e9)
                    self._no_subscribers_delay_s = min(self._no_subscribers_delay_s * 2,
                                                       self._no_subscribers_retry_s)
                self._tell(self._watch.no_subscribers(rows, self._topic,
                                                      self._no_subscribers_retry_s, now))
            case Refused(rows=rows, reason=reason):
                self.stats.refused += rows
                self.stats.last_error = f"broker refused records: {reason}"
                self._tell(self._watch.publish_refused(rows, reason, self._topic,
                                                       self._now_ns()))
            case Ignored():
                self.stats.ignored_acks += 1

    def _resend_kept(self) -> None:
        """Records a PUBACK said nobody subscribes to go out again from the oldest, once
        the retry time came (as after a reconnect: in-flight forgotten, cursors rewound;
        the platform de-duplicates by gateway and seq)."""
        if self._resend_at_ns is None or self._now_ns() < self._resend_at_ns:
            return
        self._resend_at_ns = None
        if self._delivery.connected:
            self._delivery.connection_made()
            self._rewound()
            self.idle.clear()

    def _rewound(self) -> None:
        """The delivery's cursors went back to the store's oldest rows: send everything
        (a reconnect's backlog is not held back)."""
        self._sending = True
        self._linger.clear()

    def _release(self, reason: str) -> None:
        """Send what is held (behind the batch about to go, for :data:`URGENT`)."""
        if self._linger.records:
            self.stats.releases[reason] += 1
        self._sending = True

    def _live(self) -> bool:
        """A platform's message came within :data:`LIVE_AFTER_COMMAND_S`: hold nothing."""
        if self._live_until_ns is None:
            return False
        if self.linger_clock() < self._live_until_ns:
            return True
        self._live_until_ns = None
        return False

    def _look_at_held(self, cursors: Mapping[Priority, int]) -> str | None:
        """Count the held records not counted yet; why they must go now, if they must."""
        for prio in sorted(HOLDABLE):
            after = dict.fromkeys(Priority, _SKIP)
            after[prio] = self._linger.cursor(prio, cursors.get(prio, 0))
            batch = self._reader.next_batch(after, self._batch, BATCH_BYTES)
            if batch is not None:
                self._linger.saw(prio, [(seq, len(data)) for seq, data in batch[1]],
                                 self.linger_clock())
        self.stats.held = self._linger.records
        self.stats.hold_checks += 1
        return self._linger.due(self.linger_clock())

    def _fill_window(self) -> None:
        commits = self._commits
        if self._flush.is_set():
            self._flush.clear()
            self._release(FLUSH)
        while not self._stop.is_set():
            step = self._delivery.next_read(self._writer.deletions_waiting)
            if not isinstance(step, ReadFrom):
                return
            holding = self._linger.active and not self._sending and not self._live()
            cursors = step.cursors
            if holding:  # the held classes are not read: only what may not wait
                cursors = {**cursors, **dict.fromkeys(HOLDABLE, _SKIP)}
            batch = self._reader.next_batch(cursors, self._batch, BATCH_BYTES)
            if batch is None:
                if holding:
                    due = self._look_at_held(step.cursors)
                    if due is not None:
                        self._release(due)
                        continue
                else:  # everything was read: what was held went out
                    self._sending = False
                    self._linger.clear()
                    self.stats.held = 0
                if self._delivery.nothing_to_read() and not self._linger.records:
                    self.idle.set()
                    if self._commits != commits:  # a commit raced the read: look again
                        self.idle.clear()
                return
            if holding:  # a record that may not wait: everything held goes behind it
                self._release(URGENT)
            prio, rows = batch
            payload = b"\n".join(data for _, data in rows)
            if self.heads:
                payload += b"\n"
                head = self._writer.head_line(before=payload)
                payload = payload + head if head is not None else payload[:-1]
            if self.deflate:
                packed = deflate_message(payload)
                if len(packed) < len(payload):
                    payload = packed
                    self.stats.messages_deflated += 1
            info = self.client.publish(self._topic, payload, qos=1)  # connected: it exists
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return  # not connected: the connection events will reset us
            self.idle.clear()
            seqs = [seq for seq, _ in rows]
            self._delivery.published(info.mid, prio, seqs)
            self.stats.messages_published += 1
            self.stats.records_published += len(seqs)


class _Silent:
    """Stands in for the watch while a client we closed reports its last facts."""

    def connected(self, _now_ns: int, _backlog: int | None) -> list[Action]:
        return []

    def lost(self, _reason: str, _now_ns: int) -> list[Action]:
        return []

    def failed(self, _failure: Failure, _now_ns: int) -> list[Action]:
        return []
