"""Another MQTT client taking a gateway's client id: the broker's binding, the gateway's
detection (uplink/takeover.py), the platform's count; and no false alarm on ordinary drops."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.assembly import Gateway
from app.config import Config
from core.kinds import KIND_PRIORITY, Priority
from core.mqtt import BrokerConfig, make_client
from core.record import Reading, Source
from core.topics import PLATFORM_CN
from lab.acked import AckedCounter
from lab.mosquitto import Mosquitto, Pki, client_config, start_mosquitto
from lab.site import Platform
from provisioning.identity import Identity
from tests.helpers import wait_for
from uplink.forwarder import TAKEOVER_KIND, Forwarder, UplinkStats
from uplink.takeover import (
    SESSION_LOSSES_FOR_ALARM,
    SESSION_TAKEN_OVER,
    Takeover,
    TakeoverWatch,
)

S = 1_000_000_000
SRC = Source("tag_receiver", "TR-0001", "1.0.0")
ROGUE_CN = "gw-rogue-0002"


# -- the sans-IO watch ----------------------------------------------------------------
def _watch() -> TakeoverWatch:
    return TakeoverWatch(losses_for_alarm=2, loss_window_ns=3600 * S, report_interval_ns=60 * S)


def _reconnect(watch: TakeoverWatch, at_s: int, *, present: bool, away_s: int = 2) -> bool:
    watch.disconnected(None, (at_s - away_s) * S)
    return watch.connected(session_present=present, session_expiry_s=3600, now_ns=at_s * S)


def test_the_kind_is_an_alarm() -> None:
    assert KIND_PRIORITY[TAKEOVER_KIND] is Priority.ALARM


def test_session_taken_over_is_reported_at_once() -> None:
    watch = _watch()
    watch.connected(session_present=False, session_expiry_s=3600, now_ns=0)
    assert watch.disconnected(SESSION_TAKEN_OVER, 10 * S)
    assert watch.report(10 * S) == Takeover(taken_over=1, sessions_lost=0)
    assert watch.report(11 * S) is None  # reported once


def test_repeated_session_loss_is_a_takeover_one_loss_is_not() -> None:
    watch = _watch()
    watch.connected(session_present=False, session_expiry_s=3600, now_ns=0)  # first: clean
    assert watch.report(0) is None
    assert _reconnect(watch, 100, present=False)
    assert watch.report(100 * S) is None  # one loss: a broker restart without persistence
    assert _reconnect(watch, 200, present=False)
    assert watch.report(200 * S) == Takeover(taken_over=0, sessions_lost=2)
    assert watch.losses_seen == 2


def test_losses_far_apart_make_no_alarm() -> None:
    watch = _watch()
    watch.connected(session_present=False, session_expiry_s=3600, now_ns=0)
    for hour in range(1, 6):
        assert _reconnect(watch, hour * 3700, present=False)
        assert watch.report(hour * 3700 * S) is None


def test_drops_restarts_and_expired_sessions_are_no_takeover() -> None:
    watch = _watch()
    watch.connected(session_present=False, session_expiry_s=3600, now_ns=0)
    for i in range(1, 10):  # network drops, broker restarts that keep sessions
        assert not _reconnect(watch, i * 10, present=True)
    for i in range(1, 4):  # away longer than the session lives: it expired, as agreed
        assert not _reconnect(watch, 10_000 * i, present=False, away_s=3600)
    watch.disconnected(0x8B, 50_000 * S)  # server shutting down
    assert watch.report(50_000 * S) is None
    assert watch.losses_seen == 0


def test_reports_are_rate_limited_and_add_up() -> None:
    watch = _watch()
    watch.connected(session_present=False, session_expiry_s=3600, now_ns=0)
    watch.disconnected(SESSION_TAKEN_OVER, 1 * S)
    assert watch.report(1 * S) == Takeover(1, 0)
    for i in range(2, 30):  # a client fighting us for the id
        watch.disconnected(SESSION_TAKEN_OVER, i * S)
        watch.connected(session_present=True, session_expiry_s=3600, now_ns=i * S)
        assert watch.report(i * S) is None
    assert watch.report(61 * S) == Takeover(28, 0)


# -- against a real mosquitto -------------------------------------------------------------
@contextmanager
def _gateway(tmp_path: Path, broker: Mosquitto, pki: Pki, identity: Identity, *,
             persistent_session: bool = False) -> Iterator[tuple[Gateway, Platform]]:
    """Gateway A (the product's pipeline) and the platform's verifier on *broker*; on exit
    A drains and stops, and everything it committed must have reached the platform."""
    platform = Platform(client_config(broker, pki, PLATFORM_CN), identity,
                        persistent_session=persistent_session).start()
    acked = AckedCounter()
    gateway = Gateway(Config(tmp_path / "data", client_config(broker, pki, identity.gateway_id)),
                      identity, on_acked=acked)
    gateway.start()
    try:
        wait_for(lambda: gateway.forwarder.stats.records_acked >= 1, 15, "the boot record")
        yield gateway, platform
        assert gateway.forwarder.wait_idle(30)
    finally:
        drained = gateway.stop(drain_s=10)
    try:
        assert drained
        assert acked.count == gateway.writer.stats.committed  # every record went out
        wait_for(lambda: platform.summary()["received"] >= acked.count, 20, "the platform")
        summary = platform.summary()
        assert summary["chain_gaps"] == 0  # and none was lost on the way
        assert summary["bad_signature"] == summary["malformed"] == 0
    finally:
        platform.stop()


def _rogue_connects(cfg: BrokerConfig, client_id: str) -> None:
    """Another client connects with *client_id*, waits for its CONNACK and leaves."""
    client = make_client(client_id, cfg)
    up = threading.Event()
    client.on_connect = lambda *_args: up.set()
    client.connect(cfg.host, cfg.port)
    client.loop_start()
    try:
        assert up.wait(10), "the rogue client could not connect"
    finally:
        client.disconnect()
        client.loop_stop()


def _wait_reconnect(stats: UplinkStats, connects_before: int, timeout: float = 15) -> None:
    wait_for(lambda: stats.connects > connects_before, timeout, "A to reconnect")


def _submit(gateway: Gateway, n: int) -> None:
    for i in range(n):
        gateway.writer.submit(Reading("tag.presence", SRC, {"counter": i}, time.monotonic_ns()))


@pytest.mark.slow
@pytest.mark.parametrize(("bind_client_id", "rogue_cn"), [
    (True, None),  # the lab's broker binds the id to the CN: only a clone of A's certificate
    (False, ROGUE_CN),  # stock mosquitto: any valid certificate, with A's client id
], ids=["clone-on-binding-broker", "rogue-on-stock-broker"])
def test_a_takeover_is_recorded_and_counted_and_nothing_is_lost(
    tmp_path: Path, pki: Pki, identity: Identity, bind_client_id: bool, rogue_cn: str | None,
) -> None:
    broker = start_mosquitto(tmp_path / "mq", pki, bind_client_id=bind_client_id)
    rogue = client_config(broker, pki, rogue_cn or identity.gateway_id)
    try:
        with _gateway(tmp_path, broker, pki, identity) as (gateway, platform):
            stats = gateway.forwarder.stats
            for _ in range(SESSION_LOSSES_FOR_ALARM):  # the rogue: again and again
                connects = stats.connects
                _rogue_connects(rogue, gateway.forwarder.client_id)
                _submit(gateway, 20)  # committed while A is off the broker
                _wait_reconnect(stats, connects)
            wait_for(lambda: stats.takeover_records == 1, 15, "A to record the takeover")
            assert stats.sessions_lost == SESSION_LOSSES_FOR_ALARM
            assert gateway.forwarder.wait_idle(30)
            wait_for(lambda: platform.client.takeovers() == {identity.gateway_id: 1}, 15,
                     "the platform to count the takeover")
        reports = [r for r in platform.arrived if r.kind == TAKEOVER_KIND]
        assert len(reports) == 1
        assert reports[0].record["prio"] == "alarm"
        assert reports[0].record["body"]["sessions_lost"] == SESSION_LOSSES_FOR_ALARM
        assert reports[0].record["body"]["client_id"] == gateway.forwarder.client_id
        assert platform.summary()["takeovers"] == 1
    finally:
        broker.stop()


@pytest.mark.slow
def test_the_lab_broker_binds_the_client_id_to_the_certificate(
    tmp_path: Path, pki: Pki, identity: Identity,
) -> None:
    broker = start_mosquitto(tmp_path / "mq", pki)
    rogue = client_config(broker, pki, ROGUE_CN)  # a valid certificate, not A's
    try:
        with _gateway(tmp_path, broker, pki, identity) as (gateway, platform):
            _rogue_connects(rogue, gateway.forwarder.client_id)
            # A's next batch goes out on its first connection: the broker did not drop it
            _submit(gateway, 5)
            assert gateway.forwarder.wait_idle(15)
            stats = gateway.forwarder.stats
            assert (stats.connects, stats.disconnects, stats.sessions_lost) == (1, 0, 0)
        assert not [line for line in broker.log if "already connected" in line]
        assert platform.summary()["takeovers"] == 0
    finally:
        broker.stop()


def _drop_connection(forwarder: Forwarder) -> None:
    """An ordinary network drop: the TCP connection under A's TLS session dies."""
    sock = forwarder.client.socket()
    assert sock is not None
    with socket.fromfd(sock.fileno(), socket.AF_INET, socket.SOCK_STREAM) as dup:
        dup.shutdown(socket.SHUT_RDWR)


@pytest.mark.slow
def test_network_drops_and_broker_restarts_raise_no_takeover(
    tmp_path: Path, pki: Pki, identity: Identity,
) -> None:
    workdir = tmp_path / "mq"
    brokers = [start_mosquitto(workdir, pki, persistence=True)]
    try:
        with _gateway(tmp_path, brokers[0], pki, identity,
                      persistent_session=True) as (gateway, platform):
            forwarder = gateway.forwarder
            stats = forwarder.stats
            for _ in range(SESSION_LOSSES_FOR_ALARM + 1):
                connects = stats.connects
                _drop_connection(forwarder)
                _submit(gateway, 10)
                _wait_reconnect(stats, connects)
            for _ in range(SESSION_LOSSES_FOR_ALARM + 1):
                connects = stats.connects
                brokers[-1].stop()
                wait_for(lambda: not stats.connected, 15, "A to notice the broker is gone")
                _submit(gateway, 10)
                brokers.append(start_mosquitto(workdir, pki, port=brokers[0].port,
                                               persistence=True))
                _wait_reconnect(stats, connects, 30)
            assert gateway.forwarder.wait_idle(30)
            assert stats.connects == 1 + 2 * (SESSION_LOSSES_FOR_ALARM + 1)
            assert (stats.taken_over, stats.sessions_lost, stats.takeover_records) == (0, 0, 0)
        assert platform.summary()["takeovers"] == 0
        assert not [r for r in platform.arrived if r.kind == TAKEOVER_KIND]
    finally:
        brokers[-1].stop()

