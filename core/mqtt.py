"""MQTT connection settings and the paho client both sides build from them.

The gateway's uplink and the platform's consumers connect the same way: MQTT v5
over TLS with a client certificate, paho 2.x callbacks, reconnecting by itself.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.errors import UserError

KEEPALIVE_S = 30
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 60.0


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    host: str
    port: int = 8883
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls: bool = True
    keepalive_s: int = KEEPALIVE_S


class MqttSetupError(UserError):
    """The MQTT client cannot be set up as configured (e.g. unusable TLS files)."""


def make_client(client_id: str, broker: BrokerConfig) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,  # v5: a PUBACK says whether the broker took the message
    )
    if broker.tls:
        try:
            client.tls_set(
                ca_certs=broker.ca_file,
                certfile=broker.cert_file,
                keyfile=broker.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError) as exc:
            raise MqttSetupError(
                f"TLS files unusable ({exc}): check ca_file, cert_file, key_file") from exc
    client.reconnect_delay_set(int(RECONNECT_MIN_S), int(RECONNECT_MAX_S))
    return client


def connect(client: mqtt.Client, broker: BrokerConfig, *, session_expiry_s: int = 0) -> None:
    """Start connecting in the background; paho's loop thread reconnects by itself.

    With *session_expiry_s*, the first connect starts a clean session that the broker
    keeps that long after a disconnection, and every reconnect resumes it (so the
    CONNACK's *session present* tells whether the broker still had it)."""
    if not session_expiry_s:
        client.connect_async(broker.host, broker.port, broker.keepalive_s, clean_start=True)
    else:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
        client.connect_async(broker.host, broker.port, broker.keepalive_s,
                             clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
    client.loop_start()
