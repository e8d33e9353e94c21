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
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from buffer.store import StoreReader
from buffer.writer import StoreWriter
from core.kinds import Priority
from core.mqtt import RECONNECT_MAX_S, RECONNECT_MIN_S, BrokerConfig, connect, make_client
from core.record import JSON, Reading, Source
from core.topics import records_topic, status_topic
from uplink.delivery import (
    MAX_DELETIONS_WAITING,
    WINDOW,
    Delete,
    Delivery,
    Ignored,
    ReadFrom,
    Refused,
)
from uplink.takeover import Takeover, TakeoverWatch

__all__ = ["BATCH_BYTES", "BATCH_RECORDS", "MAX_DELETIONS_WAITING", "WINDOW", "AckHook",
           "Forwarder", "UplinkStats"]

log = logging.getLogger(__name__)

BATCH_RECORDS = 200
BATCH_BYTES = 128 * 1024
#: The forwarder thread looks at its queue at least this often, seconds.
POLL_S = 1.0
#: How often :meth:`Forwarder.wait_idle` nudges the thread, seconds.
IDLE_CHECK_S = 0.1
#: How long :meth:`Forwarder.stop` waits for the forwarder thread, seconds.
STOP_JOIN_S = 10.0
#: The next reconnect waits RECONNECT_MIN_S times a factor drawn in this range.
RECONNECT_JITTER = (0.5, 2.0)
#: How long the broker keeps our session after we drop, seconds: a reconnect within it
#: resumes the session, and finding none is a sign of a takeover (uplink/takeover.py).
SESSION_EXPIRY_S = 3600
#: The record kind of a detected takeover of our client id (an alarm).
TAKEOVER_KIND = "uplink.takeover"

#: Called on the forwarder's thread with each PUBACKed batch (class, seqs increasing).
AckHook = Callable[[Priority, list[int]], None]


# -- facts from paho's thread ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Connected:
    session_present: bool
    #: How long the broker keeps the session: ours, unless its CONNACK said otherwise.
    session_expiry_s: int


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    pass


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


UplinkEvent = Connected | ConnectRefused | ConnectFailed | Disconnected | Published


@dataclass
class UplinkStats:
    """Written on the forwarder thread only; other threads read plain values."""

    connects: int = 0
    disconnects: int = 0
    messages_published: int = 0
    records_published: int = 0
    records_acked: int = 0
    refused: int = 0
    ignored_acks: int = 0
    connect_failures: int = 0
    taken_over: int = 0  # the broker said "session taken over" (0x8E)
    sessions_lost: int = 0  # reconnected in time, and the broker had no session for us
    takeover_records: int = 0  # uplink.takeover records submitted
    connected: bool = False
    last_error: str | None = None


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
        self._events: queue.SimpleQueue[UplinkEvent] = queue.SimpleQueue()
        self._delivery = Delivery(window=window)
        self._takeover = TakeoverWatch()
        self._source = source or Source("gateway", gateway_id)
        self._now_ns = now_ns
        self.stats = UplinkStats()
        self.idle = threading.Event()
        self._commits = 0  # notify() calls (the writer's thread alone adds to it)
        self.client_id = f"gw-{gateway_id}"
        self.client = make_client(self.client_id, broker)
        self.client.will_set(self._status, self._status_payload(online=False), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._loop_started = False

    def _status_payload(self, *, online: bool) -> bytes:
        return json.dumps({"gw": self.gateway_id, "online": online}).encode()

    # -- API -------------------------------------------------------------------
    def start(self) -> None:
        connect(self.client, self.broker, session_expiry_s=SESSION_EXPIRY_S)
        self._loop_started = True
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def notify(self) -> None:
        """New records were committed."""
        self._commits += 1
        self.idle.clear()
        self._wake.set()

    def stop(self) -> None:
        """Stop the forwarder thread, say offline, disconnect and join paho's loop."""
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(STOP_JOIN_S)
            if self._thread.is_alive():
                log.error("the uplink thread did not stop within %.0f s", STOP_JOIN_S)
        if self.stats.connected:
            self.client.publish(self._status, self._status_payload(online=False), 1, retain=True)
        self.client.disconnect()
        if self._loop_started:
            self.client.loop_stop()  # joins paho's network thread
            self._loop_started = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything committed so far is acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._wake.set()
            if self.idle.wait(IDLE_CHECK_S):
                return True
        return False

    # -- paho callbacks (paho's thread): only queue facts ---------------------------
    def _post(self, event: UplinkEvent) -> None:
        self._events.put(event)
        self._wake.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        del userdata
        if reason.is_failure:
            self._post(ConnectRefused(str(reason)))
            return
        client.publish(self._status, self._status_payload(online=True), qos=1, retain=True)
        expiry = getattr(properties, "SessionExpiryInterval", SESSION_EXPIRY_S)
        self._post(Connected(bool(flags.session_present), int(expiry)))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        del client, userdata
        self._post(ConnectFailed())

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        del userdata, properties
        # jitter the next reconnect so a province of gateways does not reconnect in step
        client.reconnect_delay_set(
            max(1, round(RECONNECT_MIN_S * random.uniform(*RECONNECT_JITTER))),  # noqa: S311
            int(RECONNECT_MAX_S),
        )
        code = int(reason.value) if flags.is_disconnect_packet_from_server else None
        self._post(Disconnected(str(reason), code))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        del client, userdata, properties
        self._post(Published(mid, bool(reason.is_failure), str(reason)))

    # -- the forwarder thread ---------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            self._drain_events()
            self._report_takeover()
            self._fill_window()

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._apply(event)

    def _apply(self, event: UplinkEvent) -> None:
        stats = self.stats
        match event:
            case Published(mid, refused, reason):
                self._acked(self._delivery.puback(mid, refused=refused, reason=reason))
            case Connected(session_present, expiry_s):
                self._delivery.connection_made()
                stats.connects += 1
                stats.connected = True
                log.info("uplink connected to %s:%d", self.broker.host, self.broker.port)
                if self._takeover.connected(session_present=session_present,
                                            session_expiry_s=expiry_s, now_ns=self._now_ns()):
                    stats.sessions_lost += 1
                    log.warning("the broker had no session for %s: another client may have "
                                "connected with our client id", self.client_id)
            case Disconnected(reason, code):
                stats.last_error = f"disconnected: {reason}"
                if self._takeover.disconnected(code, self._now_ns()):
                    stats.taken_over += 1
                    log.error("another client connected with our client id %s: the broker "
                              "dropped us (session taken over)", self.client_id)
                if self._delivery.connection_lost():
                    stats.disconnects += 1
                    log.warning("uplink lost: %s", stats.last_error)
                stats.connected = False
            case ConnectRefused(reason):
                stats.last_error = f"connect refused: {reason}"
                log.error("broker refused the connection: %s", reason)
            case ConnectFailed():
                stats.connect_failures += 1
                stats.last_error = "cannot connect (network, TLS or broker down); retrying"

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
                if self.on_acked is not None:
                    self.on_acked(prio, list(seqs))
            case Refused(rows=rows, reason=reason):
                self.stats.refused += rows
                self.stats.last_error = f"broker refused records: {reason}"
                log.error("broker refused %d records (%s): check the ACL for %s; they stay "
                          "queued", rows, reason, self._topic)
            case Ignored():
                self.stats.ignored_acks += 1

    def _fill_window(self) -> None:
        commits = self._commits
        while not self._stop.is_set():
            step = self._delivery.next_read(self._writer.deletions_waiting)
            if not isinstance(step, ReadFrom):
                return
            batch = self._reader.next_batch(step.cursors, self._batch, BATCH_BYTES)
            if batch is None:
                if self._delivery.nothing_to_read():
                    self.idle.set()
                    if self._commits != commits:  # a commit raced the read: look again
                        self.idle.clear()
                return
            prio, rows = batch
            payload = b"\n".join(data for _, data in rows)
            if self.heads:
                payload += b"\n"
                head = self._writer.head_line(before=payload)
                payload = payload + head if head is not None else payload[:-1]
            info = self.client.publish(self._topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return  # not connected: the connection events will reset us
            self.idle.clear()
            seqs = [seq for seq, _ in rows]
            self._delivery.published(info.mid, prio, seqs)
            self.stats.messages_published += 1
            self.stats.records_published += len(seqs)
