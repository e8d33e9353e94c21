"""The reference platform consumer: subscribes to gateways' records and verifies them.

Runs as one of many consumers of a shared subscription (``$share/GROUP/...``)
when a group is given, so ingest scales out on a broker cluster.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from central.record import Registration, VerifiedRecord
from central.verifier import Verifier
from core.mqtt import BrokerConfig, connect, make_client
from core.topics import TOPIC_ROOT

log = logging.getLogger(__name__)
SESSION_EXPIRY_S = 7 * 24 * 3600


class VerifierClient:
    def __init__(
        self,
        broker: BrokerConfig,
        registrations: Mapping[str, Registration],
        *,
        client_id: str = "platform-verifier",
        share_group: str | None = None,
        persistent_session: bool = False,
        on_record: Callable[[VerifiedRecord], None] | None = None,
    ) -> None:
        self.persistent = persistent_session
        self.verifier = Verifier(registrations, on_record=on_record)
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        topic = f"{TOPIC_ROOT}/+/records"
        self.topic = f"$share/{share_group}/{topic}" if share_group else topic
        self.broker = broker
        self.client = make_client(client_id, broker)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> None:
        if self.persistent:
            # the broker keeps our subscription and queues QoS 1 messages while we are away
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            self.client.connect_async(self.broker.host, self.broker.port,
                                      self.broker.keepalive_s, clean_start=False,
                                      properties=props)
            self.client.loop_start()
        else:
            connect(self.client, self.broker)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def summary(self) -> dict[str, int]:
        with self.lock:
            return self.verifier.summary()

    def takeovers(self) -> dict[str, int]:
        """``uplink.takeover`` records per gateway (see :meth:`Verifier.takeovers`)."""
        with self.lock:
            return self.verifier.takeovers()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        del userdata, flags, properties
        if reason.is_failure:
            log.error("verifier: broker refused the connection: %s", reason)
            return
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        del client, userdata, mid, properties
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
        else:
            log.error("verifier: subscription refused: %s", reasons)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        del client, userdata
        with self.lock:
            # the topic names the gateway (the broker's ACL lets only that one write
            # there): a record of another gateway on it is refused (wrong_gateway)
            self.verifier.ingest(bytes(message.payload), message.topic)
