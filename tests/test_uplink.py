"""The uplink against a real mosquitto with mTLS and the production ACL."""

from __future__ import annotations

import gc
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from app.assembly import Gateway
from app.config import Config
from core.mqtt import BrokerConfig, make_client
from core.record import Reading, Source
from core.topics import PLATFORM_CN, records_topic
from lab.acked import AckedCounter
from lab.mosquitto import Mosquitto, Pki, client_config, make_pki, start_mosquitto
from lab.site import Platform
from provisioning.identity import Identity
from tests.helpers import wait_for
from uplink import forwarder as forwarder_module
from uplink.forwarder import Forwarder

pytestmark = pytest.mark.slow
SRC = Source("tag_receiver", "TR-0001", "1.0.0")


def test_broker_outage_loses_nothing_and_alarms_go_first(
    tmp_path: Path, pki: Pki, identity: Identity
) -> None:
    workdir = tmp_path / "mq"
    broker = start_mosquitto(workdir, pki, persistence=True)
    verifier = Platform(client_config(broker, pki, PLATFORM_CN), identity,
                        persistent_session=True).start()
    arrived = verifier.arrived
    acked = AckedCounter()
    gateway = Gateway(Config(tmp_path / "data", client_config(broker, pki, identity.gateway_id)),
                      identity, on_acked=acked)
    gateway.start()
    try:
        wait_for(lambda: gateway.forwarder.stats.records_acked >= 1, 15, "the boot record")
        broker.stop()
        wait_for(lambda: not gateway.forwarder.stats.connected, 15, "the gateway to notice")
        for i in range(300):
            gateway.writer.submit(Reading("tag.presence", SRC, {"counter": i}, time.monotonic_ns()))
        for i in range(5):
            gateway.writer.submit(Reading("tag.tamper", SRC, {"n": i}, time.monotonic_ns()))
        assert gateway.writer.flush()
        outage_from = gateway.sealer.last_seq - 304
        broker = start_mosquitto(workdir, pki, port=broker.port, persistence=True)
        wait_for(lambda: gateway.forwarder.stats.connects >= 2, 30, "the gateway to reconnect")
        assert gateway.forwarder.wait_idle(30)
    finally:
        drained = gateway.stop(drain_s=10)
    assert drained
    published = acked.count
    assert published == gateway.writer.stats.committed  # each record counted once
    # stop() joined the uplink thread and paho's network loop
    assert not gateway.forwarder.is_alive()
    assert f"paho-mqtt-client-gw-{identity.gateway_id}" not in {
        t.name for t in threading.enumerate()}
    wait_for(lambda: verifier.summary()["received"] >= published, 20, "the verifier")
    verifier.stop()
    broker.stop()

    summary = verifier.summary()
    assert summary["chain_gaps"] == 0
    assert summary["bad_signature"] == 0
    after = [r for r in arrived if r.seq >= outage_from]
    kinds = [r.kind for r in after if r.kind in ("tag.presence", "tag.tamper")]
    assert kinds.count("tag.presence") == 300
    assert kinds[:5] == ["tag.tamper"] * 5  # the alarms overtook the backlog


class _EmptyStore:
    """Reader and writer of a store with nothing queued."""

    deletions_waiting = 0

    def next_batch(self, *_args: object) -> None:
        return None


def test_stop_joins_both_uplink_threads_while_the_broker_is_down(
    pki: Pki, identity: Identity
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    files = pki.client(identity.gateway_id)
    cfg = BrokerConfig("127.0.0.1", port, str(pki.ca_file), str(files.cert), str(files.key))
    forwarder = Forwarder(identity.gateway_id, cfg, _EmptyStore(), _EmptyStore())  # type: ignore[arg-type]
    forwarder.start()
    wait_for(lambda: forwarder.stats.connect_failures >= 1, 15, "a failed connection attempt")
    forwarder.stop()  # paho's loop is waiting to reconnect: only loop_stop() ends it now
    assert not forwarder.is_alive()
    assert f"paho-mqtt-client-gw-{identity.gateway_id}" not in {
        t.name for t in threading.enumerate()}
    assert not forwarder.stats.connected
    assert forwarder.stats.last_error is not None


def _publish(client: mqtt.Client, topic: str, payload: bytes) -> Any:
    """Publish at QoS 1 and return the PUBACK's reason code."""
    acked = threading.Event()
    result: list[Any] = []

    def on_publish(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        result.append(reason)
        acked.set()

    client.on_publish = on_publish
    client.publish(topic, payload, qos=1)
    assert acked.wait(10)
    return result[0]


def _connected_client(broker: Mosquitto, cfg: BrokerConfig, client_id: str) -> mqtt.Client:
    client = make_client(client_id, cfg)
    up = threading.Event()
    client.on_connect = lambda *_args: up.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert up.wait(10)
    return client


def test_a_gateway_cannot_publish_under_another_gateways_prefix(
    mosquitto: Mosquitto, pki: Pki
) -> None:
    config = client_config(mosquitto, pki, "gw-aaa-0001")
    client = _connected_client(mosquitto, config, "gw-aaa-0001")
    try:
        own = _publish(client, records_topic("gw-aaa-0001"), b"x")
        other = _publish(client, records_topic("gw-bbb-0002"), b"x")
    finally:
        client.disconnect()
        client.loop_stop()
    assert not own.is_failure
    assert other.is_failure
    assert other.value == 0x87  # not authorised


def test_a_client_certificate_from_another_ca_is_refused(
    mosquitto: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    rogue = make_pki(tmp_path / "rogue")
    files = rogue.client("gw-aaa-0001")
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):  # noqa: PT012
        import socket

        with socket.create_connection((mosquitto.host, mosquitto.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            # TLS 1.3: the server checks our certificate after the handshake
            tls.sendall(b"\x10\x00")
            if not tls.recv(1):
                raise ConnectionError("closed by the broker")


# paho leaks the socket of a failed TLS handshake; it is collected inside this test
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning")
def test_the_broker_certificate_is_verified(mosquitto: Mosquitto, pki: Pki,
                                            tmp_path: Path) -> None:
    rogue = make_pki(tmp_path / "rogue")
    files = pki.client("gw-aaa-0001")
    cfg = BrokerConfig(mosquitto.host, mosquitto.port, str(rogue.ca_file), str(files.cert),
                       str(files.key))
    client = make_client("gw-aaa-0001", cfg)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect(mosquitto.host, mosquitto.port)
    del client
    gc.collect()


def test_records_nobody_subscribes_to_are_kept_and_sent_again(
    tmp_path: Path, pki: Pki, identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker with no subscriber for the records (a platform whose consumers never
    subscribed yet) answers PUBACK 0x10 'No matching subscribers' and keeps nothing: a
    success to MQTT, not a delivery. The records stay queued and go out again until a
    subscriber is there; none is lost (before: all of them were deleted)."""
    broker = start_mosquitto(tmp_path / "mq", pki)
    acked = AckedCounter()
    gateway = Gateway(Config(tmp_path / "data", client_config(broker, pki, identity.gateway_id)),
                      identity, on_acked=acked)
    monkeypatch.setattr(forwarder_module, "NO_SUBSCRIBERS_RETRY_S", 0.5)  # scaled down
    gateway.start()
    verifier = None
    try:
        for i in range(50):
            gateway.writer.submit(Reading("tag.presence", SRC, {"counter": i}, time.monotonic_ns()))
        assert gateway.writer.flush()
        wait_for(lambda: gateway.forwarder.stats.no_subscribers >= 50, 15,
                 "PUBACKs saying nobody subscribes")
        assert acked.count == 0  # nothing counted as delivered, nothing deleted
        verifier = Platform(client_config(broker, pki, PLATFORM_CN), identity).start()
        committed = gateway.writer.stats.committed
        wait_for(lambda: verifier.summary()["received"] >= committed, 20,
                 "every record, once a subscriber is there")
    finally:
        gateway.stop(drain_s=5)
        if verifier is not None:
            verifier.stop()
        broker.stop()
    summary = verifier.summary()
    assert summary["chain_gaps"] == 0
    assert summary["bad_signature"] == 0
    assert acked.count >= committed


def test_a_broker_whose_port_was_taken_before_it_bound_starts_on_another(
        tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """free_port() closes its socket before mosquitto binds: another process may take the
    port meanwhile (a parallel test's broker, an outgoing connection). The lab's broker
    then starts on another port instead of failing the test that wanted one."""
    import lab.mosquitto as lab_mosquitto

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    real = lab_mosquitto.free_port
    handed: list[int] = []

    def first_the_taken_one(host: str = "127.0.0.1") -> int:
        handed.append(port if not handed else real(host))
        return handed[-1]

    monkeypatch.setattr(lab_mosquitto, "free_port", first_the_taken_one)
    try:
        broker = start_mosquitto(tmp_path / "mosquitto", pki)
        try:
            assert handed[0] == port
            assert broker.port == handed[-1] != port
            with socket.create_connection((broker.host, broker.port), timeout=5):
                pass  # listening
        finally:
            broker.stop()
    finally:
        taken.close()
