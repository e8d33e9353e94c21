"""Ingest consumers on a real broker (central/consumer.py): N processes on a shared
subscription, acknowledging only what is committed; one SIGKILLed mid-stream loses and
duplicates nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ingest.db'}"
    return str(request.getfixturevalue("postgres_dsn"))


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
        wait_for(lambda: stored(db_url) > 60, 60, "consumers storing")
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
