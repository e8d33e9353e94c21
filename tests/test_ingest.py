"""The platform's persistent ingest (central/ingest.py, central/db.py): the verifier's
trust rules with their state in a database, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

from buffer.seal import Draft
from central.db import SCHEMA_VERSION, Database, open_db
from central.ingest import (
    MAX_HELD_PER_GATEWAY,
    MAX_MESSAGE_BYTES,
    MAX_RECORD_BYTES,
    Alarm,
    Ingest,
    alarms,
    report,
)
from core.record import Reading, SealedRecord, Timestamp
from core.suites import SoftwareKey
from core.topics import records_topic
from lab.chains import Chain

TS = Timestamp(1_760_000_000_000, "ntp", 1_000)


# --- helpers --------------------------------------------------------------------------


def session(chain: Chain, n: int, *, kinds: tuple[str, ...] = ("tag.presence",)
            ) -> list[SealedRecord]:
    """A key.session, then *n* records (kinds in turn)."""
    out = [chain.start_session(TS)]
    out += [chain.seal(kinds[i % len(kinds)], {"n": i}, TS) for i in range(n)]
    return out


def send(ingest: Ingest, chain: Chain, records: list[SealedRecord] | list[bytes],
         topic: str | None = None) -> dict[str, object]:
    data = [r.data if isinstance(r, SealedRecord) else r for r in records]
    return ingest.ingest_message(topic or records_topic(chain.gateway_id),
                                 b"\n".join(data)).as_dict()


def enrolled(db: Database, *chains: Chain) -> Ingest:
    ingest = Ingest(db)
    for chain in chains:
        assert ingest.enrol(chain.registration)
    return ingest


def count(db: Database, table: str, gw: str) -> int:
    with db.transaction() as tx:
        row = tx.one(f"SELECT COUNT(*) FROM {table} WHERE gw = ?", (gw,))  # noqa: S608
    assert row is not None
    return int(row[0])


# --- the tests ------------------------------------------------------------------------


def test_a_whole_session_is_stored_once_and_verified(db: Database) -> None:
    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 30, kinds=("tag.presence", "gateway.health", "tag.tamper"))
    result = send(ingest, gw, records)
    assert result["stored"] == 31
    assert result["quarantined"] == {}
    assert result["chain_breaks"] == result["reorders"] == 0
    again = send(ingest, gw, records)  # at least once: the broker redelivers
    assert again["duplicates"] == 31
    assert again["stored"] == 0
    assert count(db, "records", gw.gateway_id) == 31
    r = report(db, gw.gateway_id)
    assert r["stored_ranges"] == [[1, 31]]
    assert r["gaps_unexplained"] == r["gaps_explained"] == r["chain_breaks"] == []
    assert r["key_classes"] == {"file": 31}
    with db.transaction() as tx:
        stored = [bytes(row[0]) for row in tx.all(
            "SELECT data FROM records WHERE gw = ? ORDER BY seq", (gw.gateway_id,))]
    assert stored == [rec.data for rec in records]  # the bytes as received


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_arrival_order_gives_the_same_store(db: Database, seed: int) -> None:
    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 20)
    records.append(gw.rotate_identity(TS, SoftwareKey.generate(gw.registration.alg)))
    records += session(gw, 10)
    rng = random.Random(seed)
    order = rng.sample(records, len(records))
    stored = 0
    while order:  # messages of random sizes
        size = rng.randint(1, 6)
        batch, order = order[:size], order[size:]
        stored += int(send(ingest, gw, batch)["stored"])  # type: ignore[call-overload]
    assert stored == len(records)
    r = report(db, gw.gateway_id)
    assert r["stored_ranges"] == [[1, len(records)]]
    assert r["held_for_key"] == 0
    assert r["chain_breaks"] == []
    assert r["quarantined"] == {}
    assert [i["from_seq"] for i in r["identities"]] == [0, 22]  # type: ignore[index]


def test_a_conflict_is_kept_aside_never_overwrites(db: Database) -> None:
    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 3)
    fork = gw.sealer.draft()  # the same seq again, other content, validly signed
    other = fork.seal(Reading("tag.presence", gw.source, {"n": "other"}, 1), TS)
    real = gw.seal("tag.presence", {"n": "real"}, TS)
    send(ingest, gw, [*records, real])
    result = send(ingest, gw, [other])
    assert result["conflicts"] == 1
    assert result["stored"] == 0
    with db.transaction() as tx:
        kept = tx.one("SELECT data FROM records WHERE gw = ? AND seq = ?",
                      (gw.gateway_id, real.seq))
        aside = tx.all("SELECT data, digest, stored_digest FROM conflicts WHERE gw = ?",
                       (gw.gateway_id,))
    assert kept is not None
    assert bytes(kept[0]) == real.data
    assert [(bytes(a[0]), bytes(a[1]), bytes(a[2])) for a in aside] == \
        [(other.data, other.digest, real.digest)]
    assert len(report(db, gw.gateway_id)["conflicts"]) == 1  # type: ignore[arg-type]
    assert send(ingest, gw, [other])["conflicts"] == 1  # counted, kept once
    assert count(db, "conflicts", gw.gateway_id) == 1


def test_a_chain_break_is_found_whichever_end_arrives_first(db: Database) -> None:
    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 4)  # seqs 1..5
    assert gw.session is not None
    bad = Draft(gw.gateway_id, gw.session, boot=gw.boot, last_seq=5,
                last_digest=b"\x01" * 32).seal(Reading("tag.presence", gw.source, {}, 1), TS)
    send(ingest, gw, [bad])  # seq 6 first: its link is checked when seq 5 arrives
    result = send(ingest, gw, records)
    assert result["chain_breaks"] == 1
    assert report(db, gw.gateway_id)["chain_breaks"] == [6]


def test_a_gap_record_explains_its_seqs(db: Database) -> None:
    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 4)  # 1..5
    gap = gw.seal("gap", {"reason": "quota", "count": 2, "by_class": {"position": 2},
                          "evicted": [[3, 4]]}, TS)
    later = gw.seal("tag.presence", {"n": 9}, TS)
    send(ingest, gw, [records[0], records[1], records[4], later])  # 3 and 4: never
    r = report(db, gw.gateway_id)
    assert r["gaps_unexplained"] == [[3, 4], [6, 6]]
    result = send(ingest, gw, [gap])
    assert [a.kind for a in ingest.ingest_message(records_topic(gw.gateway_id),
                                                  gap.data).alarms] == []  # duplicate
    assert result["alarms"][0]["kind"] == "gap"  # type: ignore[index]
    r = report(db, gw.gateway_id)
    assert r["gaps_explained"] == [[3, 4]]
    assert r["gaps_unexplained"] == []
    assert r["stored_ranges"] == [[1, 2], [5, 7]]


def test_records_of_another_gateway_or_signed_with_its_key_are_refused(db: Database) -> None:
    a, b = Chain("gw-aaaa-0001"), Chain("gw-bbbb-0001")
    ingest = enrolled(db, a, b)
    a_records = session(a, 2)
    send(ingest, a, a_records)
    b_records = session(b, 2)
    result = send(ingest, a, b_records, topic=records_topic(a.gateway_id))  # B's on A's topic
    assert result["quarantined"] == {"wrong_topic": 3}
    # B's chain, signed with A's certified session key: no certificate of B names that key
    assert a.session is not None
    forged = b.forge(a.session, "tag.presence", {"n": 1}, TS)
    result = send(ingest, b, [forged])
    assert result["stored"] == 0
    assert result["held"] == 1  # waits for a certificate that never comes
    send(ingest, b, b_records)  # B's own session arrives: the forged record still waits
    r = report(db, b.gateway_id)
    assert r["held_for_key"] == 1
    assert r["records"] == 3


def test_a_decommissioned_or_unknown_gateway_is_quarantined(db: Database) -> None:
    gw, stranger = Chain(), Chain("gw-zzzz-0001")
    ingest = enrolled(db, gw)
    records = session(gw, 4)
    send(ingest, gw, records[:2])
    assert ingest.decommission(gw.gateway_id)
    assert send(ingest, gw, records[2:])["quarantined"] == {"decommissioned": 3}
    assert send(ingest, stranger, session(stranger, 1))["quarantined"] == \
        {"unknown_gateway": 2}
    assert report(db, gw.gateway_id)["quarantined"] == {"decommissioned": 3}
    assert report(db, gw.gateway_id)["status"] == "decommissioned"
    assert not ingest.decommission("gw-nobody-0001")


class Impostor:
    """Claims to be *registered* (its public key, so its key id) but signs with *other*."""

    def __init__(self, registered: SoftwareKey, other: SoftwareKey) -> None:
        self.alg, self.public_raw, self._other = registered.alg, registered.public_raw, other

    def sign(self, data: bytes) -> bytes:
        return self._other.sign(data)


def test_a_forged_key_session_is_refused(db: Database) -> None:
    gw = Chain()
    ingest = enrolled(db, gw)
    forged = gw.start_session(TS, certifier=Impostor(gw.key,
                                                     SoftwareKey.generate("ed25519-sha256")))
    after = gw.seal("tag.presence", {"n": 1}, TS)
    result = send(ingest, gw, [forged, after])
    assert result["quarantined"] == {"forged_certificate": 1}
    assert result["held"] == 1
    assert result["stored"] == 0


def test_the_old_session_key_is_refused_after_a_new_key_session(db: Database) -> None:
    gw = Chain()
    ingest = enrolled(db, gw)
    first = gw.start_session(TS, lifetime_ms=10_000)
    old_key = gw.session
    late = gw.seal("tag.presence", {"n": 1}, Timestamp(TS.utc_ms + 20_000, "ntp",
                                                       TS.mono_ms + 20_000))
    second = gw.start_session(TS)
    assert old_key is not None
    stale = gw.forge(old_key, "tag.presence", {"n": 2}, TS)
    result = send(ingest, gw, [first, late, second, stale])
    assert result["quarantined"] == {"out_of_validity": 2}  # past its time; superseded
    assert result["stored"] == 2


def test_held_records_are_released_when_their_key_session_arrives(db: Database) -> None:
    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 5, kinds=("tag.presence", "tag.tamper"))
    result = send(ingest, gw, records[1:])
    assert result["held"] == 5
    assert report(db, gw.gateway_id)["held_for_key"] == 5
    seen: list[Alarm] = []
    ingest2 = Ingest(db, on_alarm=seen.append)  # another consumer stores the certificate
    result = send(ingest2, gw, records[:1])
    assert result["released"] == 5
    assert result["stored"] == 6
    assert report(db, gw.gateway_id)["held_for_key"] == 0
    assert sorted(a.seq for a in seen) == [1, 3, 5]  # key.session, two tamper alarms


def test_held_records_are_bounded(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    import central.ingest

    monkeypatch.setattr(central.ingest, "MAX_HELD_PER_GATEWAY", 3)
    assert MAX_HELD_PER_GATEWAY > 3
    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 5)
    result = send(ingest, gw, records[1:])
    assert result["held"] == 3
    assert result["quarantined"] == {"unknown_key": 2}


def test_two_consumers_on_one_database_interleave(db_url: str) -> None:
    gateways = [Chain(f"gw-para-{i:04d}") for i in range(3)]
    with open_db(db_url) as setup:
        enrolled(setup, *gateways)
    messages: list[tuple[Chain, list[SealedRecord]]] = []
    rng = random.Random(5)
    for gw in gateways:
        records = session(gw, 24, kinds=("tag.presence", "tag.tamper", "gateway.health"))
        records = rng.sample(records, len(records))
        messages += [(gw, records[i:i + 4]) for i in range(0, len(records), 4)]
    rng.shuffle(messages)
    messages += messages[:6]  # redeliveries
    stored: list[int] = []
    errors: list[BaseException] = []

    def consume(part: list[tuple[Chain, list[SealedRecord]]]) -> None:
        try:
            with open_db(db_url) as mine:
                ingest = Ingest(mine)
                stored.extend(int(send(ingest, gw, recs)["stored"])  # type: ignore[call-overload]
                              for gw, recs in part)
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=consume, args=(messages[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(stored) == 3 * 25
    with open_db(db_url) as check:
        for gw in gateways:
            r = report(check, gw.gateway_id)
            assert r["stored_ranges"] == [[1, 25]], r
            assert r["held_for_key"] == 0
            assert r["chain_breaks"] == []
        ids = [a.id for a in alarms(check)]
        assert len(ids) == 3 * 9  # key.session + 8 tampers each
        assert ids == sorted(ids)


def test_bad_inputs_are_quarantined_with_their_reasons(db: Database) -> None:
    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 2)
    send(ingest, gw, records[:1])
    topic = records_topic(gw.gateway_id)
    tampered = records[1].data.replace(b'"n":0', b'"n":7')
    assert tampered != records[1].data
    cases = {
        b"not json": "malformed",
        b"[1, 2]": "malformed",
        tampered: "bad_signature",
        b"{" + b" " * MAX_RECORD_BYTES + b"}": "oversized",
        json.dumps(json.loads(records[1].data)).encode(): "non_canonical",  # re-encoded
    }
    for payload, reason in cases.items():
        result = ingest.ingest_message(topic, payload)
        assert dict(result.quarantined) == {reason: 1}, payload[:40]
    assert dict(ingest.ingest_message("smartcorr/v1/gw/x/records", records[1].data)
                .quarantined) == {"bad_topic": 1}
    assert dict(ingest.ingest_message("elsewhere", b"").quarantined) == {"bad_topic": 1}
    big = b"\n".join([records[1].data] * (MAX_MESSAGE_BYTES // len(records[1].data) + 1))
    assert dict(ingest.ingest_message(topic, big).quarantined) == {"oversized": 1}
    assert ingest.ingest_message(topic, b"\xff\xfe\x00").quarantined["malformed"] == 1
    r = report(db, gw.gateway_id)
    assert r["quarantined"] == {"bad_signature": 1, "malformed": 3, "non_canonical": 1,
                                "oversized": 2}
    with db.transaction() as tx:
        sizes = tx.all("SELECT size, LENGTH(payload) FROM quarantine WHERE reason = "
                       "'oversized'")
    assert all(int(kept) <= 64 << 10 < int(size) for size, kept in sizes)  # bounded
    assert send(ingest, gw, records[1:])["stored"] == 2  # the genuine ones still go in


def test_alarms_are_surfaced_with_their_latency(db: Database) -> None:
    gw = Chain()
    seen: list[Alarm] = []
    clock = iter(range(TS.utc_ms + 250, TS.utc_ms + 10**6, 1000))
    ingest = Ingest(db, now_ms=lambda: next(clock), on_alarm=seen.append)
    ingest.enrol(gw.registration)
    records = session(gw, 3, kinds=("tag.presence", "tag.tamper"))
    send(ingest, gw, records[:2])
    first = alarms(db)
    assert [(a.seq, a.kind) for a in first] == [(1, "key.session")]
    send(ingest, gw, records[2:])
    assert [(a.seq, a.kind) for a in alarms(db, since=first[-1].id)] == [(3, "tag.tamper")]
    assert [a.seq for a in seen] == [1, 3]
    assert seen[0].latency_ms == seen[0].stored_at - TS.utc_ms > 0


def test_enrolment_is_idempotent_and_refuses_another_key(db: Database) -> None:
    gw = Chain()
    ingest = Ingest(db)
    assert ingest.enrol(gw.registration, tls_fingerprint="AB:CD")
    assert not ingest.enrol(gw.registration)
    from central.ingest import EnrolError

    with pytest.raises(EnrolError, match="another identity key"):
        ingest.enrol(Chain().registration)
    ingest.decommission(gw.gateway_id)
    with pytest.raises(EnrolError, match="decommissioned"):
        ingest.enrol(gw.registration)
    assert report(db, gw.gateway_id)["tls_fingerprint"] == "AB:CD"


def test_migrations_are_idempotent_and_safe_concurrently(db_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        try:
            barrier.wait()
            with open_db(db_url) as mine:
                assert mine.version() == SCHEMA_VERSION
        except BaseException as exc:  # noqa: BLE001 (reported by the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open_db(db_url) as again:
        assert again.migrate() == SCHEMA_VERSION
        with again.transaction() as tx:
            assert tx.all("SELECT version FROM schema_version ORDER BY version") == \
                [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_a_real_gateway_s_records(db: Database, tmp_path: Path) -> None:
    from provisioning.identity import create_identity
    from tests.test_rotation import run_gateway

    identity = create_identity(tmp_path / "identity", "gw-real-0001")
    from central.record import Registration

    run_gateway(tmp_path, identity)
    stored = run_gateway(tmp_path, identity)  # the store keeps both starts' records
    ingest = Ingest(db)
    ingest.enrol(Registration.from_json(identity.registration()))
    result = ingest.ingest_message(records_topic(identity.gateway_id), b"\n".join(stored))
    assert result.stored == len(stored)
    assert dict(result.quarantined) == {}
    r = report(db, identity.gateway_id)
    assert len(r["sessions"]) == 2  # type: ignore[arg-type]
    assert r["chain_breaks"] == r["gaps_unexplained"] == []


def test_a_bad_url_is_a_clear_error(tmp_path: Path) -> None:
    from central.db import DatabaseError

    with pytest.raises(DatabaseError, match="sqlite:///PATH or postgresql://"):
        open_db("mysql://x")
    with pytest.raises(DatabaseError, match="does not exist"):
        open_db(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    with pytest.raises(DatabaseError, match="PostgreSQL"):
        open_db("postgresql://nobody@127.0.0.1:9/x")


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from central.cli import main
    from core.record import b64u

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    gw = Chain()
    reg = gw.registration
    pub = tmp_path / "signing.pub"
    pub.write_text(json.dumps({"gateway_id": reg.gateway_id, "alg": reg.alg, "class": "file",
                               "kid": reg.kid, "suite": reg.suite, "format": 2,
                               "key": b64u(reg.public_raw)}))
    assert main(["enrol", "--db", url, "--registration", str(pub), "--json",
                 "--tls-fingerprint", "AA:BB"]) == 0
    assert json.loads(capsys.readouterr().out)["new"] is True
    with open_db(url) as database:
        send(Ingest(database), gw, session(gw, 2, kinds=("tag.tamper",)))
    assert main(["alarms", "--db", url, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(a["seq"], a["kind"]) for a in lines] == [(1, "key.session"), (2, "tag.tamper"),
                                                     (3, "tag.tamper")]
    assert main(["alarms", "--db", url, "--json", "--since", str(lines[1]["id"])]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["report", "--db", url, "--gw", gw.gateway_id, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["stored_ranges"] == [[1, 3]]
    assert r["tls_fingerprint"] == "AA:BB"
    # errors: what is wrong and how to fix it, exit 2
    assert main(["report", "--db", url, "--gw", "gw-nobody-0001"]) == 2
    assert "enrol it first" in capsys.readouterr().err
    assert main(["enrol", "--db", url, "--registration", str(tmp_path / "none.pub")]) == 2
    assert "signing.pub" in capsys.readouterr().err
    assert main(["report", "--db", "mysql://x", "--gw", "a"]) == 2
    assert "sqlite:///PATH" in capsys.readouterr().err
    assert main(["consume", "--db", url, "--broker", "nowhere", "--client-id", "c"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["consume", "--db", url, "--broker", "127.0.0.1:1", "--client-id", "c"]) == 2
    assert "--ca, --cert and --key" in capsys.readouterr().err
    assert main(["enrol", "--db", url, "--decommission", gw.gateway_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "decommissioned"


def test_a_dropped_tail_is_a_gap_once_a_head_announced_it(db: Database) -> None:
    from core.head import make_head

    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 9)  # seqs 1..10
    assert gw.session is not None
    head = make_head(gw.gateway_id, 1, 10, TS.mono_ms, gw.session)
    result = send(ingest, gw, [*(r.data for r in records[:6]), head])  # the tail never comes
    assert result["heads"] == 1
    assert result["quarantined"] == {}
    r = report(db, gw.gateway_id)
    assert r["gaps_unexplained"] == [[7, 10]]
    assert r["head"] is not None
    assert r["head"]["committed_seq"] == 10  # type: ignore[index]
    forged = make_head(gw.gateway_id, 2, 99, TS.mono_ms, gw.session)  # not its boot
    assert send(ingest, gw, [forged])["quarantined"] == {"bad_signature": 1}
    assert report(db, gw.gateway_id)["gaps_unexplained"] == [[7, 10]]


def test_commands_that_read_a_database_never_create_one(
        db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """alarms, report, gateways, export and verify --db open without migrating: no file or
    no schema is exit 2 with what to do, and nothing is created; enrol creates one."""
    from central.cli import main
    from central.db import NoDatabaseError

    absent = tmp_path / "nothere.db"
    url = f"sqlite:///{absent}"
    capture = tmp_path / "c.capture"
    capture.write_text("")
    for argv in (["alarms", "--db", url], ["report", "--db", url, "--gw", "gw-x"],
                 ["gateways", "--db", url], ["verify", str(capture), "--db", url],
                 ["export", "--db", url, "--gw", "gw-x", "--from", "0", "--to", "1",
                  "--out", str(tmp_path / "x.zip")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"no ingest database at {url}" in err, (argv, err)
        assert "enrol" in err
        assert not absent.exists(), argv
    absent.touch()  # a file, but no schema: refused likewise, left as it was
    assert main(["alarms", "--db", url]) == 2
    assert "no ingest database" in capsys.readouterr().err
    assert absent.stat().st_size == 0
    with pytest.raises(NoDatabaseError):
        open_db(url, migrate=False)
    # a PostgreSQL database without the schema is no ingest database either
    if db_url.startswith("postgresql"):
        with pytest.raises(NoDatabaseError):
            open_db(db_url, migrate=False)
        assert main(["gateways", "--db", db_url]) == 2
        assert "no ingest database" in capsys.readouterr().err


def test_gateways_alarms_and_the_program_s_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from central.cli import build_parser, describe, main, program_name

    assert program_name("/work/main/.venv/bin/ingest") == "ingest"
    assert program_name("/x/central/__main__.py") == "python -m central"
    assert program_name("/usr/bin/pytest") == "ingest"
    assert build_parser("ingest").format_usage().startswith("usage: ingest ")
    monkeypatch.setattr("sys.argv", ["/somewhere/bin/ingest"])
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    gw, idle = Chain(), Chain("gw-idle-0001")
    with open_db(url) as database:
        ingest = enrolled(database, gw, idle)
        send(ingest, gw, session(gw, 2, kinds=("tag.tamper",)))
    capsys.readouterr()
    assert main(["gateways", "--db", url, "--json"]) == 0
    rows = {r["gw"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[gw.gateway_id]["records"] == 3
    assert rows[gw.gateway_id]["highest_seq"] == 3
    assert rows[gw.gateway_id]["status"] == "active"
    assert rows[gw.gateway_id]["enrolled_at"] > 0
    assert rows[idle.gateway_id]["records"] == 0
    assert rows[idle.gateway_id]["highest_seq"] is None
    assert main(["gateways", "--db", url]) == 0
    assert f"{gw.gateway_id}  active" in capsys.readouterr().out
    # the error names the command as it was called, and where the ids are listed
    assert main(["enrol", "--db", url, "--decommission", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ingest enrol: ")
    assert "ingest gateways" in err
    # the human alarms say what the alarm is, from the record's body
    assert main(["alarms", "--db", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert "tag.tamper (n=0)" in out[1]
    body = {"action": "pairing.add", "operator": {"name": "Ana Li", "role": "installer",
                                                  "os_user": "smartcorr"}}
    assert describe("local.action", body) == "local action pairing.add by Ana Li (installer)"
    assert describe("tag.tamper", None) == "tag.tamper"


def test_the_consumer_s_stop_line_is_readable() -> None:
    from central.cli import stopped_line

    assert stopped_line("c2", {"messages": 4, "stored": 12, "records": 12}) == \
        "consumer c2 stopped: 4 messages, 12 records stored"
    assert stopped_line("c2", {}) == "consumer c2 stopped: 0 messages, 0 records stored"


def test_records_after_a_gateway_s_last_record_are_refused(db: Database) -> None:
    """A verified ``gateway.decommissioned`` ends the chain: the records before it that
    arrive after it (lower classes behind the alarm) are stored, any after it (a copy of
    the card that still signs) is refused ``after_final``."""
    gw = Chain()
    ingest = enrolled(db, gw)
    records = session(gw, 4)  # seqs 1..5
    final = gw.seal("gateway.decommissioned", {"action": "decommission"}, TS)  # seq 6
    later = gw.seal("tag.presence", {"n": 99}, TS)  # seq 7: signed, but after the end
    assert send(ingest, gw, [records[0], final])["stored"] == 2
    assert send(ingest, gw, records[1:])["stored"] == 4
    refused = send(ingest, gw, [later])
    assert refused["stored"] == 0
    assert refused["quarantined"] == {"after_final": 1}
    r = report(db, gw.gateway_id)
    assert r["final_seq"] == 6
    assert r["stored_ranges"] == [[1, 6]]
    assert r["gaps_unexplained"] == []
