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
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from central.db import Database, StorageError, open_db
from central.ingest import Alarm, Ingest
from core.mqtt import BrokerConfig, make_client
from core.topics import TOPIC_ROOT

log = logging.getLogger(__name__)

#: How long the broker keeps a consumer's session (and its queued messages) while it is
#: away: a week.
SESSION_EXPIRY_S = 7 * 24 * 3600
#: Messages the broker may send before this consumer acknowledges them.
RECEIVE_MAXIMUM = 32
#: After a database failure, how long before trying the same message again, seconds.
RETRY_S = 1.0
RETRY_MAX_S = 30.0


def shared_topic(group: str) -> str:
    return f"$share/{group}/{TOPIC_ROOT}/+/records"


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
                 on_alarm: Callable[[Alarm], None] | None = None,
                 on_subscribed: Callable[[], None] | None = None) -> None:
        self.db_url = db_url
        self.broker = broker
        self.client_id = client_id
        self.topic = shared_topic(group)
        self.session_expiry_s = session_expiry_s
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
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name=f"ingest-{client_id}",
                                        daemon=True)

    def start(self) -> None:
        """Open the database (DatabaseError if it cannot be), then connect."""
        self._db = open_db(self.db_url)
        self.ingest = Ingest(self._db, on_alarm=self._on_alarm)
        self._worker.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        # never a clean start: a restarted consumer resumes its session, and with it the
        # messages it had not acknowledged
        self.client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive_s,
                                  clean_start=False, properties=props)
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
        log.info("consumer %s connected (session present: %s)", self.client_id,
                 flags.session_present)
        client.subscribe(self.topic, qos=1)

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

    def _work(self) -> None:
        ingest = self.ingest
        assert ingest is not None  # noqa: S101 (set by start before the thread runs)
        while (item := self._inbox.get()) is not None:
            if self._stopping.is_set():
                return
            delay = RETRY_S
            while True:
                try:
                    ingest.ingest_message(item.topic, item.payload)
                    break
                except StorageError as exc:
                    log.error("consumer %s: the database failed (%s); message %d stays "  # noqa: TRY400
                              "unacknowledged, trying again in %.0f s", self.client_id, exc,
                              item.mid, delay)
                    ingest = self._reconnect(ingest)
                except Exception as exc:
                    # a bug, not bad input (that is quarantined): leave the message with
                    # the broker and stop, so that a supervisor restarts us
                    log.exception("consumer %s: ingest failed on message %d", self.client_id,
                                  item.mid)
                    self.error = exc
                    self.failed.set()
                    return
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, RETRY_MAX_S)
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
        self.ingest = Ingest(db, on_alarm=self._on_alarm)
        return self.ingest
