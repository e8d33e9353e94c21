"""Retention (central/retention.py): a closed case is kept until its deadline, then purged
of every byte of personal data as one signed, hash-chained platform action; an export made
before still verifies, and a changed or removed action is named."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from central import export
from central.cli import main as cli_main
from central.db import Database
from central.ingest import Ingest, report
from central.retention import (
    DAY_MS,
    RetentionError,
    close_case,
    load_action_key,
    load_action_public,
    purge,
    read_actions,
    records_sha256,
    write_action_key,
)
from central.routing import add_office, assign, route_new
from core.record import SealedRecord, Timestamp, b64u
from core.topics import records_topic
from lab.chains import Chain

BASE_MS = 1_760_000_000_000
MINUTE = 60_000
GW, OTHER = "gw-retain-0001", "gw-retain-0002"
TAG, OTHER_TAG = "TAG-9C41E07B", "TAG-00D1A2B3"


def ts(seq: int) -> Timestamp:
    return Timestamp(BASE_MS + seq * MINUTE, "ntp", 1_000 + seq)


def populate(db: Database, gw: str, tag: str, lon_e7: int) -> list[SealedRecord]:
    """Enrol *gw* (assigned to a pull office) and ingest: a session, positions naming *tag*,
    a tamper alarm (routed: a delivery row), a record held for want of its session
    certificate, a quarantined altered record, and a conflict row; the records stored."""
    chain = Chain(gateway_id=gw)
    platform = Ingest(db)
    platform.enrol(chain.registration)
    add_office(db, "office-a", None, b"s" * 32)
    assign(db, gw, f"CASE-{gw[-4:]}", "office-a")
    stored = [chain.start_session(ts(1))]
    stored += [chain.seal("tag.presence", {"tag": tag, "lat_e7": 312_304_000 + s,
                                           "lon_e7": lon_e7}, ts(s)) for s in range(2, 7)]
    stored.append(chain.seal("tag.tamper", {"tag": tag}, ts(7)))
    stored += [chain.seal("tag.presence", {"tag": tag, "lat_e7": 312_000_000,
                                           "lon_e7": 1_214_000_000}, ts(s))
               for s in range(8, 11)]
    chain.start_session(ts(11))  # never delivered: what its key signs is held
    held = chain.seal("tag.presence", {"tag": tag, "lat_e7": 313_000_000,
                                                  "lon_e7": 1_215_000_000}, ts(12))
    altered = stored[3].data.replace(b'"lat_e7":3123', b'"lat_e7":4123')
    result = platform.ingest_message(records_topic(gw), b"\n".join(
        [r.data for r in stored] + [held.data, altered]))
    assert result.stored == len(stored), result.as_dict()
    assert result.held == 1, result.as_dict()
    assert sum(result.quarantined.values()) == 1, result.as_dict()
    with db.transaction() as tx:
        assert route_new(tx, BASE_MS) == 2  # key.session and tag.tamper are alarm-class
        tx.execute("INSERT INTO conflicts (gw, seq, stored_digest, digest, data, received_at)"
                   " VALUES (?, ?, ?, ?, ?, ?)",
                   (gw, 5, stored[4].digest, hashlib.sha256(altered).digest(), altered, 0))
    return stored


def haystack(db: Database) -> list[tuple[str, str, bytes]]:
    """Every value of every text and blob column of every table: (table, column, bytes)."""
    with db.transaction(write=False) as tx:
        if tx.backend == "sqlite":
            tables = [str(r[0]) for r in tx.all("SELECT name FROM sqlite_master WHERE "
                                                "type = 'table' AND name NOT LIKE 'sqlite_%'")]
            columns = [(t, str(c[1])) for t in tables for c in tx.all(f"PRAGMA table_info({t})")
                       if str(c[2]).upper() in ("TEXT", "BLOB")]
        else:
            columns = [(str(r[0]), str(r[1])) for r in tx.all(
                "SELECT table_name, column_name FROM information_schema.columns WHERE "
                "table_schema = 'public' AND data_type IN ('text', 'bytea')")]
        assert {"records", "quarantine", "platform_actions"} <= {t for t, _ in columns}
        out = []
        for table, column in columns:
            for (value,) in tx.all(f"SELECT {column} FROM {table}"):  # noqa: S608
                if value is not None:
                    out.append((table, column, value.encode() if isinstance(value, str)
                                else bytes(value)))
    return out


def found(db: Database, needle: bytes) -> list[str]:
    return sorted({f"{t}.{c}" for t, c, v in haystack(db) if needle in v})


def count(db: Database, table: str) -> int:
    with db.transaction(write=False) as tx:
        row = tx.one(f"SELECT COUNT(*) FROM {table}")  # noqa: S608
    return int(row[0]) if row else 0


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "action.pem"
    write_action_key(path)
    return path


def test_a_closed_case_is_purged_after_its_deadline_as_one_signed_action(
        db: Database, tmp_path: Path, key_file: Path) -> None:
    stored = populate(db, GW, TAG, 1_214_737_000)
    populate(db, OTHER, OTHER_TAG, 1_100_000_000)
    key, public = load_action_key(key_file), load_action_public(Path(f"{key_file}.pub"))
    before = tmp_path / "before.zip"
    export.export(db, GW, ts(1).utc_ms, ts(12).utc_ms, before, by="Clerk Li",
                  now_ms=BASE_MS + 100 * MINUTE)
    assert export.check_export(before).problems == []

    ended = BASE_MS + DAY_MS
    closed = close_case(db, GW, ended, keep_days=30, by="Officer Wang")
    deadline = ended + 30 * DAY_MS
    assert closed["purge_after"] == deadline
    assert closed["case"] == "CASE-0001"

    # before the deadline: nothing purged, nothing logged
    assert purge(db, key, now_ms=deadline - 1, by="ops") == []
    assert count(db, "platform_actions") == 0
    assert found(db, TAG.encode())

    (entry,) = purge(db, key, now_ms=deadline, by="ops")
    assert entry["action"] == "purge"
    assert entry["gw"] == GW
    assert entry["n"] == 1
    assert entry["records"] == len(stored)
    assert entry["seq_ranges"] == [[1, 10]]
    assert entry["reason"] == "supervision_ended"
    assert entry["case"] == "CASE-0001"
    assert entry["removed"] == {"held": 1, "quarantine": 1, "conflicts": 1, "deliveries": 2,
                                "unrouted": 0, "alarms": 2, "commands": 0}
    assert entry["records_sha256"] == b64u(records_sha256(r.digest for r in stored))

    # no table holds the gateway's tag id, record bytes or positions any more ...
    assert found(db, TAG.encode()) == []
    for rec in stored:
        assert found(db, rec.data) == [], rec.seq
    assert found(db, b"12147370") == []
    # ... while the other gateway's data is untouched (the search does find data)
    assert "records.data" in found(db, OTHER_TAG.encode())
    # the registration, key history and the counts stay; the gateway is retired
    out = report(db, GW)
    assert out["records"] == 0
    assert out["status"] == "decommissioned"
    assert out["identities"]
    assert out["sessions"]

    # the export made before still verifies, and its records are the ones purged
    assert export.check_export(before).problems == []
    with zipfile.ZipFile(before) as zf:
        lines = zf.read("records.jsonl").splitlines()
    lines.sort(key=lambda line: json.loads(line)["seq"])
    assert entry["records_sha256"] == b64u(records_sha256(
        hashlib.sha256(line).digest() for line in lines))

    # a second purge is a no-op
    assert purge(db, key, now_ms=deadline + DAY_MS, by="ops") == []
    assert count(db, "platform_actions") == 1

    # the log verifies
    check = read_actions(db, public)
    assert check.problems == []
    assert [e["n"] for e in check.entries] == [1]
    assert check.head["n"] == 1


def test_a_changed_or_removed_action_is_named(db: Database, key_file: Path) -> None:
    populate(db, GW, TAG, 1_214_737_000)
    populate(db, OTHER, OTHER_TAG, 1_100_000_000)
    key, public = load_action_key(key_file), load_action_public(Path(f"{key_file}.pub"))
    close_case(db, GW, BASE_MS, keep_days=0, reason="authorisation_lapsed", by="a")
    close_case(db, OTHER, BASE_MS, keep_days=1, by="a")
    assert [e["gw"] for e in purge(db, key, now_ms=BASE_MS, by="ops")] == [GW]
    assert [e["gw"] for e in purge(db, key, now_ms=BASE_MS + DAY_MS, by="ops")] == [OTHER]
    assert read_actions(db, public).problems == []

    with db.transaction() as tx:
        row = tx.one("SELECT entry, sig FROM platform_actions WHERE n = 1")
        assert row is not None
        original, sig = bytes(row[0]), bytes(row[1])
        tx.execute("UPDATE platform_actions SET entry = ? WHERE n = 1",
                   (original.replace(b'"records":10', b'"records":9'),))
    problems = [p["problem"] for p in read_actions(db, public).problems]
    assert any("action 1: bad signature" in p for p in problems), problems
    assert any("action 2: prev" in p and "action 1" in p for p in problems), problems

    with db.transaction() as tx:
        tx.execute("UPDATE platform_actions SET entry = ?, gw = ? WHERE n = 1",
                   (original, "gw-someone-else"))
    problems = [p["problem"] for p in read_actions(db, public).problems]
    assert problems == ["action 1: the column gw ('gw-someone-else') is not what the entry "
                        f"signs ('{GW}'): changed"]

    with db.transaction() as tx:
        tx.execute("DELETE FROM platform_actions WHERE n = 1")
    problems = [p["problem"] for p in read_actions(db, public).problems]
    assert any("action 1 removed" in p for p in problems), problems
    assert any(f"action 1 (the purge of {GW}" in p for p in problems), problems

    with db.transaction() as tx:  # put it back, then remove the last one
        tx.execute("INSERT INTO platform_actions (n, action, gw, at, kid, entry, sig) "
                   "VALUES (1, 'purge', ?, ?, ?, ?, ?)",
                   (GW, BASE_MS, public.kid, original, sig))
        tx.execute("DELETE FROM platform_actions WHERE n = 2")
    problems = [p["problem"] for p in read_actions(db, public).problems]
    assert problems == [f"action 2 (the purge of {OTHER}, per its retention row) is missing "
                        "from the log: removed"]

    other = write_action_key(Path(f"{key_file}.other"))
    problems = [p["problem"] for p in read_actions(db, other).problems]
    assert any("not by the action key" in p for p in problems), problems


def test_the_command_line_and_the_key_file(db_url: str, db: Database, tmp_path: Path,
                                           key_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    populate(db, GW, TAG, 1_214_737_000)
    assert cli_main(["close-case", "--db", db_url, "--gw", GW, "--ended",
                     "2025-10-09T00:00:00Z", "--keep-days", "10", "--json"]) == 0
    closed = json.loads(capsys.readouterr().out)
    assert closed["purge_after"] == closed["ended_at"] + 10 * DAY_MS

    assert cli_main(["purge", "--db", db_url, "--key", str(key_file), "--now",
                     "2025-10-18T00:00:00Z", "--json"]) == 0
    assert capsys.readouterr().out == ""  # before the deadline: nothing
    seed = tmp_path / "seed.key"
    seed.write_bytes(load_action_key(key_file).private_bytes())
    seed.chmod(0o640)
    assert cli_main(["purge", "--db", db_url, "--key", str(seed)]) == 2
    assert "accessible to others" in capsys.readouterr().err
    with pytest.raises(RetentionError, match="chmod 600"):
        load_action_key(seed)
    seed.chmod(0o600)  # the raw 32-byte seed is the same key
    assert cli_main(["purge", "--db", db_url, "--key", str(seed), "--now",
                     "2025-10-19T00:00:00Z", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["gw"] == GW

    assert cli_main(["actions", "--db", db_url, "--verify", "--key-pub",
                     f"{key_file}.pub", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is True
    assert len(out["entries"]) == 1
    assert cli_main(["actions", "--db", db_url, "--verify"]) == 2
    with db.transaction() as tx:
        tx.execute("UPDATE platform_actions SET at = at + 1")
    assert cli_main(["actions", "--db", db_url, "--verify", "--key-pub",
                     f"{key_file}.pub"]) == 1
    assert "PROBLEM action 1: the column at" in capsys.readouterr().out


def command_rows(db: Database, gw: str) -> list[tuple[int, str, str, bytes, str | None]]:
    with db.transaction(write=False) as tx:
        return [(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), r[4]) for r in tx.all(
            "SELECT cseq, kind, sha256, data, outcome FROM commands WHERE gw = ? "
            "ORDER BY cseq, id", (gw,))]


def document(gw: str) -> str:
    """A decision's number, as a county bureau writes it (one per gateway here)."""
    return f"沪司矫电〔2027〕{gw[-2:]}号"  # noqa: RUF001 - the brackets of the real numbers


def send_commands(db: Database, gw: str, tag: str, first: int = 1) -> list[bytes]:
    """Commands the platform signed for *gw* (as central/commands.py stores them): an
    authorisation naming *tag* and its decision (answered), a spot check (unanswered)."""
    from core.commands import command_digest, sign_command
    from core.suites import ED25519, SoftwareKey

    key = SoftwareKey(ED25519, bytes(range(32)))
    sent = [sign_command(key, gw=gw, cseq=first, issued_at_ms=BASE_MS,
                         not_after_ms=BASE_MS + DAY_MS, kind="set-authorisation", body={
                             "tag": tag, "basis": "prohibition_order",
                             "document": document(gw), "approver": "head",
                             "start": "2025-10-09", "end": "2026-01-08", "zone": "UTC"}),
            sign_command(key, gw=gw, cseq=first + 1, issued_at_ms=BASE_MS,
                         not_after_ms=BASE_MS + DAY_MS, kind="request-presence",
                         body={"tag": tag})]
    with db.transaction() as tx:
        for i, data in enumerate(sent):
            obj = json.loads(data)
            tx.execute("INSERT INTO commands (gw, cseq, kind, sha256, data, kid, issued_at, "
                       "not_after, created_by, created_at, outcome, outcome_seq) VALUES "
                       "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (gw, obj["cseq"], obj["kind"], command_digest(data), data, key.kid,
                        BASE_MS, BASE_MS + DAY_MS, "Officer Wang", BASE_MS,
                        "applied" if i == 0 else None, 9 if i == 0 else None))
    return sent


def test_a_closed_cases_commands_are_purged_with_it(db: Database, key_file: Path) -> None:
    """The platform's commands table (schema 7) holds the case's tags, decisions, rules
    and sealed keys: purged with the case (the bytes; the bookkeeping and digests stay),
    counted in the signed action, and a gateway whose commands alone are left is due."""
    from central.commands import CommandError, stored
    from core.commands import command_digest

    tag, other_tag = "T0000C0DE", "T0000D00D"
    populate(db, GW, TAG, 1_214_737_000)
    populate(db, OTHER, OTHER_TAG, 1_100_000_000)
    sent = send_commands(db, GW, tag)
    kept = send_commands(db, OTHER, other_tag)
    key, public = load_action_key(key_file), load_action_public(Path(f"{key_file}.pub"))
    assert "commands.data" in found(db, tag.encode())
    ended = BASE_MS + DAY_MS
    close_case(db, GW, ended, keep_days=0, by="Officer Wang")
    (entry,) = purge(db, key, now_ms=ended, by="ops")
    assert entry["removed"]["commands"] == 2  # type: ignore[index]
    assert entry["commands_sha256"] == b64u(records_sha256(
        command_digest(d).encode() for d in sent))
    # nothing of what was commanded is left: the tag, the decision's number
    assert found(db, tag.encode()) == []
    assert found(db, document(GW).encode()) == []
    # what was commanded when, and its answer, stay (cseq, kind, digest, outcome)
    rows = command_rows(db, GW)
    assert [(c, k, d, data, o) for c, k, d, data, o in rows] == [
        (1, "set-authorisation", command_digest(sent[0]), b"", "applied"),
        (2, "request-presence", command_digest(sent[1]), b"", None)]
    with pytest.raises(CommandError, match="purged with its case"):
        stored(db, GW, 1)
    # the other gateway's commands are untouched
    assert [r[3] for r in command_rows(db, OTHER)] == kept
    assert stored(db, OTHER, 1).data == kept[0]
    # a gateway purged before its commands were (a platform upgraded since): due again,
    # and the purge of its commands is an action of its own
    send_commands(db, GW, tag, first=3)
    (again,) = purge(db, key, now_ms=ended + DAY_MS, by="ops")
    assert (again["n"], again["records"], again["removed"]["commands"]) == (  # type: ignore[index]
        2, 0, 2)
    assert found(db, tag.encode()) == []
    assert purge(db, key, now_ms=ended + 2 * DAY_MS, by="ops") == []
    check = read_actions(db, public)
    assert check.problems == []
    assert [e["n"] for e in check.entries] == [1, 2]
