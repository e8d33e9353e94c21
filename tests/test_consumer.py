"""Ingest consumers on a real broker (central/consumer.py): N processes on a shared
subscription, acknowledging only what is committed; one SIGKILLed mid-stream loses and
duplicates nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from central.db import open_db
from central.ingest import Ingest, alarms, report
from core.mqtt import BrokerConfig, connect, make_client
from core.record import Timestamp
from core.topics import PLATFORM_CN, records_topic
from lab.chains import Chain
from lab.mosquitto import Mosquitto, Pki, client_config, start_mosquitto
from tests.helpers import wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TS = Timestamp(1_760_000_000_000, "ntp", 1_000)


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Mosquitto]:
    # consumers share the platform's certificate, so client ids must stay theirs: the
    # lab broker's binding (client id := CN) would give them one session (docs/broker.md)
    server = start_mosquitto(tmp_path / "mosquitto", pki, bind_client_id=False)
    yield server
    server.stop()


class ConsumerProcess:
    """``python -m central consume`` in a child process, its JSON events collected."""

    def __init__(self, db_url: str, cfg: BrokerConfig, client_id: str) -> None:
        self.client_id = client_id
        self.events: list[dict[str, object]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "central", "consume", "--db", db_url,
             "--broker", f"{cfg.host}:{cfg.port}", "--ca", str(cfg.ca_file),
             "--cert", str(cfg.cert_file), "--key", str(cfg.key_file),
             "--group", "ingest", "--client-id", client_id, "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        for line in self.proc.stdout or ():
            self.events.append(json.loads(line))

    def seen(self, event: str) -> bool:
        return any(e["event"] == event for e in self.events)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def stored(db_url: str) -> int:
    with open_db(db_url) as db, db.transaction() as tx:
        row = tx.one("SELECT COUNT(*) FROM records")
    assert row is not None
    return int(row[0])


def test_two_consumers_one_killed_mid_stream_store_everything_once(
    db_url: str, broker: Mosquitto, pki: Pki
) -> None:
    gateways = [Chain(f"gw-cons-{i:04d}") for i in range(2)]
    with open_db(db_url) as db:
        ingest = Ingest(db)
        for gw in gateways:
            ingest.enrol(gw.registration)
    platform = client_config(broker, pki, PLATFORM_CN)
    consumers = [ConsumerProcess(db_url, platform, f"ingest-{i}") for i in (1, 2)]
    try:
        for c in consumers:
            wait_for(lambda c=c: c.seen("subscribed"), 30, f"{c.client_id} subscribed")
        # each gateway publishes 120 messages of 3 records (a key.session, tampers among
        # them), the two gateways' messages interleaved
        per_gateway: list[list[tuple[str, bytes]]] = []
        for gw in gateways:
            records = [gw.start_session(TS)]
            records += [gw.seal("tag.tamper" if i % 10 == 0 else "tag.presence", {"n": i}, TS)
                        for i in range(359)]
            per_gateway.append([(records_topic(gw.gateway_id),
                                 b"\n".join(r.data for r in records[i:i + 3]))
                                for i in range(0, len(records), 3)])
        messages = [m for pair in zip(*per_gateway, strict=True) for m in pair]
        total = 2 * 360
        configs = {gw.gateway_id: client_config(broker, pki, gw.gateway_id) for gw in gateways}
        publishers = {gw_id: make_client(gw_id, cfg) for gw_id, cfg in configs.items()}
        for gw_id, client in publishers.items():
            connect(client, configs[gw_id])
        for client in publishers.values():
            wait_for(client.is_connected, 15, "the gateways connected")
        half = len(messages) // 2
        sent = 0

        def publish(upto: int) -> None:
            nonlocal sent
            for topic, payload in messages[sent:upto]:
                gw_id = topic.split("/")[3]
                publishers[gw_id].publish(topic, payload, qos=1).wait_for_publish(10)
            sent = upto

        publish(half)
        # the broker shares messages out as it likes: wait until the one to be killed has
        # stored some (an alarm among them), so it dies mid-stream, not idle
        wait_for(lambda: stored(db_url) > 60 and consumers[0].seen("alarm"), 60,
                 "both consumers storing")
        killed = consumers[0]
        killed.proc.kill()  # SIGKILL, mid-stream: its unacknowledged messages wait
        killed.stop()
        assert killed.seen("alarm")  # it was storing when it died
        publish(len(messages))
        consumers[0] = ConsumerProcess(db_url, platform, "ingest-1")  # same session
        wait_for(lambda: stored(db_url) >= total, 90, f"all {total} records stored")
        for client in publishers.values():
            client.disconnect()
            client.loop_stop()
    finally:
        for c in consumers:
            c.stop()
    assert stored(db_url) == total
    with open_db(db_url) as db:
        for gw in gateways:
            r = report(db, gw.gateway_id)
            assert r["stored_ranges"] == [[1, 360]], r
            assert r["conflicts"] == [], r
            assert r["chain_breaks"] == [], r
            assert r["quarantined"] == {}, r
            assert r["held_for_key"] == 0, r
        assert len(alarms(db, limit=10_000)) == 2 * (1 + 36)  # key.session + tampers
    assert consumers[1].seen("stopped")


def _session_present(cfg: BrokerConfig, client_id: str) -> bool:
    """Whether the broker still holds a session for *client_id* (connect without a clean
    start, read the CONNACK, leave no session behind)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    seen: list[bool] = []
    client = make_client(client_id, cfg)

    def on_connect(_c: object, _u: object, flags: Any, _r: object, _p: object) -> None:
        seen.append(bool(flags.session_present))

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, clean_start=False,
                         properties=props)
    client.loop_start()
    try:
        wait_for(lambda: bool(seen), 15, f"{client_id} connected")
    finally:
        client.disconnect()
        client.loop_stop()
    return seen[0]


def test_the_demo_s_platform_leaves_a_real_ingest_its_records(
        broker: Mosquitto, pki: Pki, tmp_path: Path) -> None:
    """``gateway.py demo --broker`` on a broker where a real ingest runs: the demo's
    platform (its own group and client id, no lasting session) takes none of the real
    ingest's records, during its run or after, and leaves no session behind."""
    from central.consumer import Consumer
    from lab.demo import demo_platform
    from provisioning.identity import create_identity

    real_url = f"sqlite:///{tmp_path / 'real.db'}"
    gw = Chain("gw-real-0001")
    with open_db(real_url) as db:
        Ingest(db).enrol(gw.registration)
    platform_cfg = client_config(broker, pki, PLATFORM_CN)
    real = Consumer(real_url, platform_cfg, client_id="ingest-real", group="ingest")
    identity = create_identity(tmp_path / "demo-id", "demo-gw-0a0b0c0d")
    gw_cfg = client_config(broker, pki, gw.gateway_id)
    publisher = make_client(gw.gateway_id, gw_cfg)
    records = [gw.start_session(TS)] + [gw.seal("tag.presence", {"n": i}, TS)
                                        for i in range(59)]
    try:
        real.start()
        wait_for(real.subscribed.is_set, 30, "the real ingest subscribed")
        connect(publisher, gw_cfg)
        wait_for(publisher.is_connected, 15, "the gateway connected")

        def publish(part: list[bytes]) -> None:
            for data in part:
                publisher.publish(records_topic(gw.gateway_id), data, qos=1) \
                    .wait_for_publish(10)

        demo = demo_platform(platform_cfg, identity, f"sqlite:///{tmp_path / 'demo.db'}",
                             private=False)
        assert demo.consumer.client_id == "demo-demo-gw-0a0b0c0d"
        assert demo.consumer.session_expiry_s == 0
        assert "$share/ingest/" not in demo.consumer.topic
        demo.start()
        publish([r.data for r in records[:30]])  # while the demo runs
        wait_for(lambda: stored(real_url) >= 30, 30, "the real ingest storing")
        demo.stop()
        identity.close()
        assert not _session_present(platform_cfg, demo.consumer.client_id)
        publish([r.data for r in records[30:]])  # after it stopped
        wait_for(lambda: stored(real_url) >= 60, 30, "every record at the real ingest")
        publisher.disconnect()
        publisher.loop_stop()
    finally:
        real.stop()
    with open_db(real_url) as db:
        assert report(db, gw.gateway_id)["stored_ranges"] == [[1, 60]]
    assert demo.summary()["received"] == 0  # none of the real gateway's records


def test_the_demo_s_platform_on_its_private_broker_keeps_the_certificate_s_cn(
        tmp_path: Path) -> None:
    from lab.demo import demo_platform
    from provisioning.identity import create_identity

    identity = create_identity(tmp_path / "demo-id", "demo-gw-01020304")
    try:
        demo = demo_platform(BrokerConfig("127.0.0.1", 9, tls=False), identity,
                             f"sqlite:///{tmp_path / 'demo.db'}", private=True)
    finally:
        identity.close()
    assert demo.consumer.client_id == PLATFORM_CN
    assert demo.consumer.topic.startswith("$share/demo-demo-gw-01020304/")
    assert demo.consumer.session_expiry_s == 0


def test_an_unreachable_broker_and_a_shared_client_id_are_logged_plainly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreachable: one ERROR at once (what, where, what to check), then at most one a
    minute. A client id reconnecting over and over: a WARNING naming the certificate."""
    import central.consumer as consumer_module
    from central.consumer import FLAPPING_CONNECTS, Consumer

    now = [1000.0]
    monkeypatch.setattr(consumer_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    c = Consumer(f"sqlite:///{tmp_path / 'x.db'}", BrokerConfig("127.0.0.1", 9, tls=False),
                 client_id="c2")
    with caplog.at_level("INFO", logger="central.consumer"):
        for _ in range(30):  # 30 attempts over 59 s: one line
            c._on_connect_fail(c.client, None)
            now[0] += 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1, errors
        assert "c2 cannot connect to the broker 127.0.0.1:9" in errors[0]
        assert "check" in errors[0]
        now[0] += 10  # a minute on: once more, with the count
        c._on_connect_fail(c.client, None)
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 2
        assert "31 attempts" in errors[1]
        caplog.clear()
        for _ in range(FLAPPING_CONNECTS + 5):
            c._count_connect(now[0])
            now[0] += 1
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, warnings
        assert "its own certificate" in warnings[0]
        assert "docs/broker.md" in warnings[0]


def test_a_demo_problem_says_why() -> None:
    from lab.demo import why_problem

    out: dict[str, Any] = {
        "published": 770, "received": 0, "verified": 0, "drained": True, "bad_signature": 0,
        "chain_gaps": 0, "forged_certificate": 0, "quarantined": 0, "conflicts": 0,
        "beacons_acked": 5, "kinds": {}}
    platform = types.SimpleNamespace(
        report=lambda: {"quarantined": {}, "held_for_key": 0},
        consumer=types.SimpleNamespace(topic="$share/demo-x/smartcorr/v1/gw/x/records"))
    reasons = why_problem(out, 5, 0, platform)  # type: ignore[arg-type]
    assert reasons[0].startswith("0 of 770 published records reached the demo's ingest: ")
    assert "$share/demo-x/" in reasons[0]
    platform.report = lambda: {"quarantined": {"bad_signature": 3}, "held_for_key": 767}
    reasons = why_problem(out, 5, 0, platform)  # type: ignore[arg-type]
    assert "held for a key: 767" in reasons[0]
    assert "quarantined: bad_signature 3" in reasons[0]
