"""Revocation (issue 12, item 3, its revocation half): a revoked gateway is refused by the
broker at TLS (a real mosquitto loading the CRL ``ingest ca crl`` wrote) and its later
records are quarantined ``revoked`` at the ingest (SQLite and the real PostgreSQL)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

from central import ca as central_ca
from central import cli as ingest_cli
from central.db import MIGRATIONS, Database, open_db
from central.ingest import EnrolError, Ingest, report
from central.record import Registration
from core.mqtt import BrokerConfig, make_client
from core.record import Timestamp
from core.topics import records_topic
from lab.chains import Chain
from lab.mosquitto import Pki, start_mosquitto
from provisioning import enrol
from provisioning import pki as lab_pki
from provisioning.identity import Identity, create_identity
from tests.helpers import wait_for

TS = Timestamp(1_760_000_000_000, "ntp", 1_000)


def enrolled(tmp_path: Path, db: Database, authority: central_ca.Authority,
             gw: str) -> tuple[Identity, central_ca.Issued]:
    """A gateway enrolled offline, its answer installed."""
    identity = create_identity(tmp_path / gw, gw)
    request = enrol.make(identity, claim=None, mode="offline")
    issued = central_ca.sign_request(db, authority, request.data, require_claim=False)
    enrol.install(identity, enrol.check_answer(identity, issued.answer))
    return identity, issued


def test_a_revoked_gateways_later_records_are_quarantined_and_it_cannot_come_back(
        tmp_path: Path, db: Database) -> None:
    authority = central_ca.init_ca(tmp_path / "ca", "Test Province CA")
    identity, issued = enrolled(tmp_path, db, authority, "gw-qc-0042")
    chain = Chain(identity.gateway_id, identity=identity.key)  # the gateway's own key
    ingest = Ingest(db)
    topic = records_topic(identity.gateway_id)
    before = [chain.start_session(TS), chain.seal("tag.presence", {"n": 1}, TS)]
    assert ingest.ingest_message(topic, b"\n".join(r.data for r in before)).stored == 2

    assert central_ca.revoke(db, gateway_id=identity.gateway_id,
                             reason="key_compromise") == [issued.serial]
    later = [chain.seal("tag.presence", {"n": n}, TS) for n in range(3)]
    result = ingest.ingest_message(topic, b"\n".join(r.data for r in later))
    assert (result.stored, dict(result.quarantined)) == (0, {"revoked": 3})
    known = report(db, identity.gateway_id)
    assert known["status"] == "revoked"
    assert known["records"] == 2  # what came before stays
    assert known["quarantined"] == {"revoked": 3}
    with pytest.raises(EnrolError, match="was revoked"):  # not back under the same id
        ingest.enrol(Registration.from_json(identity.registration()))
    with pytest.raises(central_ca.CaError, match="not enrolled"):
        central_ca.revoke(db, gateway_id="gw-nobody-0001", reason="superseded")
    assert central_ca.revoke(db, gateway_id=identity.gateway_id, reason="superseded") == []

    crl = central_ca.check_crl(central_ca.make_crl(authority, central_ca.revoked(db)),
                               authority)
    entry = crl.get_revoked_certificate_by_serial_number(int(issued.serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.key_compromise
    [cert] = central_ca.certificates(db, identity.gateway_id)
    assert cert["revoke_reason"] == "key_compromise"


def _connects(broker_port: int, pki_ca: Path, identity: Identity) -> tuple[bool, str]:
    """Whether the gateway's installed certificate gets a CONNACK (success), and why not."""
    d = identity.directory
    client = make_client(identity.gateway_id, BrokerConfig(
        "127.0.0.1", broker_port, str(pki_ca), str(d / "tls.crt"), str(d / "tls.key")))
    outcome: list[str] = []
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object,
                   _p: object) -> None:
        outcome.append(str(reason))
        done.set()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, reason: object,
                      _p: object) -> None:
        outcome.append(f"disconnected: {reason}")
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", broker_port)
        client.loop_start()
        done.wait(5)
    except OSError as exc:  # the TLS handshake itself refused
        outcome.append(f"refused: {exc}")
    finally:
        client.disconnect()
        client.loop_stop()
    return bool(outcome) and outcome[0] == "Success", " ".join(outcome)


@pytest.mark.slow
def test_the_broker_refuses_a_revoked_certificate_at_tls(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    authority = central_ca.init_ca(tmp_path / "ca", "Test Province CA")
    url = f"sqlite:///{tmp_path / 'ingest.db'}"
    with open_db(url) as db:
        revoked, _ = enrolled(tmp_path, db, authority, "gw-aaaa-0001")
        kept, _ = enrolled(tmp_path, db, authority, "gw-bbbb-0001")
    crl = tmp_path / "ca" / central_ca.CRL_FILE  # the empty one 'ca init' wrote
    lab_ca = lab_pki.Authority(authority.key, authority.cert)
    pki = Pki(tmp_path / "pki", lab_ca, tmp_path / "ca" / "ca.crt",
              lab_pki.issue_to(tmp_path / "pki", lab_ca, "broker", server=True))
    broker = start_mosquitto(tmp_path / "mq", pki, extra_conf=[f"crlfile {crl}"])
    try:
        for identity in (revoked, kept):  # both welcome before the revocation
            ok, why = _connects(broker.port, pki.ca_file, identity)
            assert ok, why
        assert ingest_cli.main(["ca", "revoke", "--db", url, "--gw", "gw-aaaa-0001",
                                "--reason", "key_compromise", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["revoked"] != []
        assert ingest_cli.main(["ca", "crl", "--ca-dir", str(tmp_path / "ca"), "--db", url,
                                "--out", str(crl), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["revoked"] == 1
        broker.process.send_signal(signal.SIGHUP)  # mosquitto reloads its CRL (docs/broker.md)
        wait_for(lambda: any("Reloading config" in line for line in broker.log), 5,
                 "mosquitto to reload")
        ok, why = _connects(broker.port, pki.ca_file, revoked)
        assert not ok, why
        ok, why = _connects(broker.port, pki.ca_file, kept)
        assert ok, why
        wait_for(lambda: any("certificate verify failed" in line for line in broker.log), 5,
                 "mosquitto to refuse the revoked certificate at TLS")
        connected = [line for line in broker.log if "as gw-aaaa-0001" in line]
        assert len(connected) == 1  # only before the revocation
    finally:
        broker.stop()


def test_one_certificate_revoked_by_serial_leaves_the_gateway_and_its_other_one(
        tmp_path: Path) -> None:
    authority = central_ca.init_ca(tmp_path / "ca", "Test Province CA")
    with open_db(f"sqlite:///{tmp_path / 'ingest.db'}") as db:
        identity, first = enrolled(tmp_path, db, authority, "gw-qc-0042")
        (identity.directory / "tls.key").unlink()  # a new TLS key: a second certificate
        second = central_ca.sign_request(
            db, authority, enrol.make(identity, claim=None, mode="offline").data,
            require_claim=False)
        assert central_ca.revoke(db, serial=first.serial, reason="superseded") == \
            [first.serial]
        assert report(db, identity.gateway_id)["status"] == "active"
        serials = {e.serial for e in central_ca.revoked(db)}
    assert serials == {first.serial}
    assert second.serial not in serials


def _v4_database(url: str) -> None:
    """A database as schema version 4 left it, with one gateway and its records."""
    with _raw(url) as db, db.transaction() as tx:
        tx.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
                   "applied_at BIGINT NOT NULL)")
        for version, statements in enumerate(MIGRATIONS[db.backend][:4], start=1):
            for sql in statements:
                tx.execute(sql)
            tx.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
        tx.execute("INSERT INTO gateways (gw, status, registration, enrolled_at) VALUES "
                   "('gw-old-0001', 'active', '{}', 1)")
        tx.execute("INSERT INTO records (gw, seq, kind, prio, digest, prev, boot, t, kid, "
                   "key_class, received_at, data) VALUES ('gw-old-0001', 1, 'gap', 'alarm', "
                   "?, ?, 1, 1, 'k', 'file', 1, ?)", (b"d", b"p", b"{}"))


def _raw(url: str) -> Database:
    """The database at *url* opened without any schema (an empty file or database)."""
    import sqlite3

    from central.db import Database as Db
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("PRAGMA foreign_keys=ON")
        return Db(url, "sqlite", conn)
    import psycopg
    return Db(url, "postgresql", psycopg.connect(url, autocommit=True))


def test_schema_5_keeps_every_gateway_and_its_records(db_url: str) -> None:
    _v4_database(db_url)
    with open_db(db_url) as db:  # migrated to version 5
        assert db.version() == len(MIGRATIONS[db.backend])
        assert report(db, "gw-old-0001")["records"] == 1
        with db.transaction() as tx:
            tx.execute("UPDATE gateways SET status = 'revoked' WHERE gw = 'gw-old-0001'")
        assert report(db, "gw-old-0001")["status"] == "revoked"
        with pytest.raises(Exception, match=r"(?i)foreign key|violates"), \
                db.transaction() as tx:  # the records still reference their gateway
            tx.execute("DELETE FROM gateways WHERE gw = 'gw-old-0001'")
