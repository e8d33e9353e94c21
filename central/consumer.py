"""The platform's ingest consumer: MQTT v5 in, :class:`central.ingest.Ingest` to the database.

Any number of these run as processes on one shared subscription
(``$share/<group>/smartcorr/v1/gw/+/records``), each with its own client id, a persistent
session (``clean_start`` false, a session expiry) and **manual acknowledgement**: a
message's PUBACK is sent only after its records are committed in the database. So a
consumer killed at any instant loses nothing (the broker still holds every message it
did not acknowledge, and sends them again when the consumer's session resumes) and
duplicates nothing (the store is idempotent under (gateway, seq)).

paho's network thread only queues what arrives; one worker thread owns the database
connection, ingests in arrival order and acknowledges. The broker sends at most
:data:`RECEIVE_MAXIMUM` messages unacknowledged, which bounds the queue. If the database
fails, the message stays unacknowledged and is tried again after a pause; the network
thread keeps the connection alive meanwhile.

A broker that cannot be reached is logged at once (what failed, where, what to check) and
then at most once a :data:`UNREACHABLE_LOG_EVERY_S` while paho retries. A client id that
keeps reconnecting (:data:`FLAPPING_CONNECTS` connects within :data:`FLAPPING_WINDOW_S`) is
another client taking the same id, typically consumers sharing one certificate under a
broker that binds the client id to it (docs/broker.md): a WARNING says so.

A consumer with ``session_expiry_s=0`` (the demo's, a test's) starts clean and leaves no
session behind: nothing is queued for it, and no share of a group is kept, after it stops.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from central.db import Database, StorageError, open_db
from central.ingest import SIG_AUDIT, Alarm, Ingest
from core.mqtt import BrokerConfig, make_client
from core.topics import TOPIC_ROOT

log = logging.getLogger(__name__)

#: How long the broker keeps a consumer's session (and its queued messages) while it is
#: away: a week.
SESSION_EXPIRY_S = 7 * 24 * 3600
#: Messages the broker may send before this consumer acknowledges them.
RECEIVE_MAXIMUM = 32
#: Messages one transaction ingests at most (those that have arrived: a consumer with a
#: backlog commits, and flushes the disk, once for many), and their bytes at most.
MAX_BATCH_MESSAGES = RECEIVE_MAXIMUM
MAX_BATCH_BYTES = 4 << 20
#: After a database failure, how long before trying the same message again, seconds.
RETRY_S = 1.0
RETRY_MAX_S = 30.0
#: While the broker cannot be reached, how often that is logged again, seconds.
UNREACHABLE_LOG_EVERY_S = 60.0
#: More connects than this within the window: another client takes this client id.
FLAPPING_CONNECTS = 5
FLAPPING_WINDOW_S = 60.0
#: MQTT v5 DISCONNECT reason "Session taken over".
_SESSION_TAKEN_OVER = 142


def shared_topic(group: str, gateway: str = "+") -> str:
    """The shared subscription of *group* to the records of every gateway (or of one)."""
    return f"$share/{group}/{TOPIC_ROOT}/{gateway}/records"


@dataclass(frozen=True, slots=True)
class _Arrival:
    mid: int
    qos: int
    topic: str
    payload: bytes


class Consumer:
    """One ingest consumer: connect with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, db_url: str, broker: BrokerConfig, *, client_id: str,
                 group: str = "ingest", session_expiry_s: int = SESSION_EXPIRY_S,
                 gateway: str = "+",
                 on_alarm: Callable[[Alarm], None] | None = None,
                 on_subscribed: Callable[[], None] | None = None,
                 sig_audit: float = SIG_AUDIT) -> None:
        self.db_url = db_url
        self.sig_audit = sig_audit
        self.broker = broker
        self.client_id = client_id
        self.topic = shared_topic(group, gateway)
        self.session_expiry_s = session_expiry_s
        self._connect_failures = 0
        self._unreachable_logged_at: float | None = None
        self._connects: collections.deque[float] = collections.deque()
        self._flapping_logged_at: float | None = None
        self._on_alarm = on_alarm
        self._on_subscribed = on_subscribed
        self.subscribed = threading.Event()
        self.failed = threading.Event()  # the worker could not go on (see .error)
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._inbox: queue.Queue[_Arrival | None] = queue.Queue()
        self._db: Database | None = None
        self.ingest: Ingest | None = None
        self.client = make_client(client_id, broker)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name=f"ingest-{client_id}",
                                        daemon=True)

    def start(self) -> None:
        """Open the database (DatabaseError if it cannot be), then connect."""
        self._db = open_db(self.db_url)
        self.ingest = Ingest(self._db, on_alarm=self._on_alarm, sig_audit=self.sig_audit)
        self._worker.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        # no clean start with a lasting session: a restarted consumer resumes it, and with
        # it the messages it had not acknowledged; without one (expiry 0), start clean
        self.client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive_s,
                                  clean_start=self.session_expiry_s == 0, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        """Finish the message in hand, then disconnect (what is unacknowledged stays
        with the broker for this session)."""
        self._stopping.set()
        self._inbox.put(None)
        if self._worker.is_alive():
            self._worker.join()
        self.client.disconnect()
        self.client.loop_stop()
        if self._db is not None:
            self._db.close()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        del userdata, properties
        if reason.is_failure:
            log.error("consumer %s: the broker refused the connection: %s", self.client_id,
                      reason)
            return
        if self._connect_failures:
            log.info("consumer %s reached the broker %s after %d failed attempt(s)",
                     self.client_id, self._where(), self._connect_failures)
        self._connect_failures = 0
        self._unreachable_logged_at = None
        log.info("consumer %s connected (session present: %s)", self.client_id,
                 flags.session_present)
        self._count_connect(time.monotonic())
        client.subscribe(self.topic, qos=1)

    def _where(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        del client, userdata
        self._connect_failures += 1
        now = time.monotonic()
        if self._unreachable_logged_at is not None and \
                now - self._unreachable_logged_at < UNREACHABLE_LOG_EVERY_S:
            return
        self._unreachable_logged_at = now
        tls = ("that --ca, --cert and --key are the ones the broker's CA expects (TLS)"
               if self.broker.tls else "that the broker takes plain MQTT on that port "
               "(--no-tls: no TLS)")
        if self._connect_failures == 1:
            log.error("consumer %s cannot connect to the broker %s (refused, unreachable or "
                      "the TLS handshake failed): check that the broker runs there, the host "
                      "and port, and %s; retrying", self.client_id, self._where(), tls)
        else:
            log.error("consumer %s still cannot connect to the broker %s (%d attempts so "
                      "far): check that it runs, the host and port, and %s; retrying",
                      self.client_id, self._where(), self._connect_failures, tls)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        del client, userdata, flags, properties
        if self._stopping.is_set():
            return
        if getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
            log.warning("consumer %s: another client connected with this client id and took "
                        "the session; each consumer needs its own client id (and, on a broker "
                        "binding client ids to certificates, its own certificate: "
                        "docs/broker.md)", self.client_id)
        else:
            log.warning("consumer %s disconnected from %s (%s); reconnecting",
                        self.client_id, self._where(), reason)

    def _count_connect(self, now: float) -> None:
        """Warn when this client id connects more than :data:`FLAPPING_CONNECTS` times in
        :data:`FLAPPING_WINDOW_S` (at most once a window)."""
        self._connects.append(now)
        while self._connects and now - self._connects[0] > FLAPPING_WINDOW_S:
            self._connects.popleft()
        if len(self._connects) <= FLAPPING_CONNECTS:
            return
        if self._flapping_logged_at is not None and \
                now - self._flapping_logged_at < FLAPPING_WINDOW_S:
            return
        self._flapping_logged_at = now
        log.warning("consumer %s connected %d times in %.0f s: another client is using the "
                    "same client id and each knocks the other off. Each consumer needs its "
                    "own client id; where the broker binds the client id to the certificate "
                    "(use_username_as_clientid), each consumer needs its own certificate "
                    "(docs/broker.md)", self.client_id, len(self._connects),
                    FLAPPING_WINDOW_S)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        del client, userdata, mid, properties
        if all(not r.is_failure for r in reasons):
            if not self.subscribed.is_set():
                self.subscribed.set()
                if self._on_subscribed is not None:
                    self._on_subscribed()
        else:
            log.error("consumer %s: subscription to %s refused: %s (does the broker's ACL "
                      "let this certificate read the records?)", self.client_id, self.topic,
                      reasons)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        del client, userdata
        self._inbox.put(_Arrival(message.mid, message.qos, message.topic,
                                 bytes(message.payload)))

    def _batch(self, first: _Arrival) -> tuple[list[_Arrival], bool]:
        """*first* and what else has arrived, up to :data:`MAX_BATCH_MESSAGES` messages
        and :data:`MAX_BATCH_BYTES`; and whether the stop sentinel came."""
        batch, size = [first], len(first.payload)
        while len(batch) < MAX_BATCH_MESSAGES and size < MAX_BATCH_BYTES:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
            size += len(item.payload)
        return batch, False

    def _work(self) -> None:
        ingest = self.ingest
        assert ingest is not None  # noqa: S101 (set by start before the thread runs)
        stop = False
        while not stop and (first := self._inbox.get()) is not None:
            if self._stopping.is_set():
                return
            batch, stop = self._batch(first)
            delay = RETRY_S
            while True:
                try:
                    ingest.ingest_messages([(item.topic, item.payload) for item in batch])
                    break
                except StorageError as exc:
                    log.error("consumer %s: the database failed (%s); %d message(s) stay "  # noqa: TRY400
                              "unacknowledged, trying again in %.0f s", self.client_id, exc,
                              len(batch), delay)
                    ingest = self._reconnect(ingest)
                except Exception as exc:
                    # a bug, not bad input (that is quarantined): leave the messages with
                    # the broker and stop, so that a supervisor restarts us
                    log.exception("consumer %s: ingest failed on message(s) %s", self.client_id,
                                  [item.mid for item in batch])
                    self.error = exc
                    self.failed.set()
                    return
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, RETRY_MAX_S)
            for item in batch:  # acknowledged only once committed, in their order
                if item.qos > 0:
                    self.client.ack(item.mid, item.qos)

    def _reconnect(self, ingest: Ingest) -> Ingest:
        """A new connection after a failure (a lost PostgreSQL connection does not come
        back by itself); the old one if none can be made now."""
        try:
            db = open_db(self.db_url, migrate=False)
        except Exception as exc:  # noqa: BLE001 (DatabaseError or the driver's: retried)
            log.warning("consumer %s: cannot reconnect to the database yet: %s",
                        self.client_id, exc)
            return ingest
        if self._db is not None:
            try:
                self._db.close()
            except Exception:  # a broken connection may fail to close
                log.debug("closing the failed connection", exc_info=True)
        self._db = db
        self.ingest = Ingest(db, on_alarm=self._on_alarm, sig_audit=self.sig_audit)
        return self.ingest
