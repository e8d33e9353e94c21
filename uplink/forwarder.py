"""Forward committed records over MQTT (TLS, client certificate) at QoS 1.

Threads: paho's own network loop, and the forwarder thread, which reads the
store, publishes batches and turns PUBACKs into deletions (sent to the store
writer: one writer owns the store). paho's callbacks only put facts on queues
and set a wake-up event: they never take a lock of ours, because paho calls
``on_publish`` while holding its own message lock.

Delivery: highest class first; within a class in seq order. A bounded window
of MQTT messages in flight. After a reconnect everything not yet deleted is
sent again (the platform de-duplicates by gateway id and seq).
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from buffer.store import StoreReader
from buffer.writer import StoreWriter
from core.kinds import Priority
from core.mqtt import RECONNECT_MAX_S, RECONNECT_MIN_S, BrokerConfig, connect, make_client
from core.topics import records_topic, status_topic

log = logging.getLogger(__name__)

BATCH_RECORDS = 200
BATCH_BYTES = 128 * 1024
WINDOW = 8
#: Stop publishing while this many PUBACKed rows wait to be deleted (bounds memory).
MAX_DELETIONS_WAITING = 20_000


@dataclass
class UplinkStats:
    connects: int = 0
    disconnects: int = 0
    messages_published: int = 0
    records_published: int = 0
    records_acked: int = 0
    refused: int = 0
    connect_failures: int = 0
    connected: bool = False
    last_error: str | None = None
    acked_seqs: set[int] = field(default_factory=set, repr=False)


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
        track_acked: bool = False,
    ) -> None:
        self.gateway_id = gateway_id
        self.broker = broker
        self._reader = reader
        self._writer = writer
        self._window = window
        self._batch = batch_records
        self._track = track_acked
        #: Called on the forwarder's thread with each PUBACKed batch (class, seqs).
        self.on_acked: Callable[[Priority, list[int]], None] | None = None
        self._topic = records_topic(gateway_id)
        self._status = status_topic(gateway_id)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, bool, str]] = queue.SimpleQueue()
        self._conn_events: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._inflight: dict[int, tuple[Priority, list[int]]] = {}
        self._cursors: dict[Priority, int] = {}
        self._connected = False
        self.stats = UplinkStats()
        self.idle = threading.Event()
        self.client = make_client(f"gw-{gateway_id}", broker)
        self.client.will_set(self._status, self._status_payload(online=False), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)

    def _status_payload(self, *, online: bool) -> bytes:
        return json.dumps({"gw": self.gateway_id, "online": online}).encode()

    # -- API -------------------------------------------------------------------
    def start(self) -> None:
        connect(self.client, self.broker)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def notify(self) -> None:
        """New records were committed."""
        self.idle.clear()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        if self._connected:
            self.client.publish(self._status, self._status_payload(online=False), 1, retain=True)
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks (paho's thread): only queue facts ---------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        del userdata, flags, properties
        if reason.is_failure:
            self.stats.last_error = f"connect refused: {reason}"
            log.error("broker refused the connection: %s", reason)
            return
        client.publish(self._status, self._status_payload(online=True), qos=1, retain=True)
        self._conn_events.put(True)
        self._wake.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        del client, userdata
        self.stats.connect_failures += 1
        self.stats.last_error = "cannot connect (network, TLS or broker down); retrying"

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        del userdata, flags, properties
        # jitter the next reconnect so a province of gateways does not reconnect in step
        client.reconnect_delay_set(
            max(1, round(RECONNECT_MIN_S * random.uniform(0.5, 2.0))),  # noqa: S311
            int(RECONNECT_MAX_S),
        )
        self.stats.last_error = f"disconnected: {reason}"
        self._conn_events.put(False)
        self._wake.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        del client, userdata, properties
        self._acks.put((mid, reason.is_failure, str(reason)))
        self._wake.set()

    # -- the forwarder thread ---------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            self._apply_connection_events()
            self._apply_acks()
            if self._connected:
                self._fill_window()

    def _apply_connection_events(self) -> None:
        while True:
            try:
                up = self._conn_events.get_nowait()
            except queue.Empty:
                return
            if up:
                self.stats.connects += 1
                log.info("uplink connected to %s:%d", self.broker.host, self.broker.port)
            elif self._connected:
                self.stats.disconnects += 1
                log.warning("uplink lost: %s", self.stats.last_error)
            self._connected = up
            self.stats.connected = up
            # whatever was in flight is sent again from the store
            self._inflight.clear()
            self._cursors.clear()

    def _apply_acks(self) -> None:
        while True:
            try:
                mid, refused, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue
            prio, seqs = entry
            if refused:
                # kept in the store, sent again after the next reconnect
                self.stats.refused += len(seqs)
                self.stats.last_error = f"broker refused records: {reason}"
                log.error("broker refused %d records (%s): check the ACL for %s; they stay "
                          "queued", len(seqs), reason, self._topic)
                continue
            self._writer.delete_range(int(prio), seqs[0], seqs[-1], len(seqs))
            self.stats.records_acked += len(seqs)
            if self._track:
                self.stats.acked_seqs.update(seqs)
            if self.on_acked is not None:
                self.on_acked(prio, seqs)

    def _fill_window(self) -> None:
        while len(self._inflight) < self._window and not self._stop.is_set():
            if self._writer.deletions_waiting > MAX_DELETIONS_WAITING:
                return  # backpressure: the store catches up; its next commit wakes us
            batch = self._reader.next_batch(self._cursors, self._batch, BATCH_BYTES)
            if batch is None:
                if not self._inflight:
                    self.idle.set()
                return
            prio, rows = batch
            payload = b"\n".join(data for _, data in rows)
            info = self.client.publish(self._topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return  # not connected: the connection events will reset us
            self.idle.clear()
            seqs = [seq for seq, _ in rows]
            self._inflight[info.mid] = (prio, seqs)
            self._cursors[prio] = seqs[-1]
            self.stats.messages_published += 1
            self.stats.records_published += len(seqs)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything committed so far is acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._wake.set()
            if self.idle.wait(0.1):
                return True
        return False
