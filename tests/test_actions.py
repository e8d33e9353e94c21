"""Every local human action is a signed record naming who did it (issue 9, item 6).

Real files, a real store, the real gateway (lab/site.py's Site, or the daemon in a
process of its own where a kill -9 matters)."""

from __future__ import annotations

import json
import os
import pwd
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway
from app.actions import LocalActions
from buffer.store import StoreReader, store_path
from lab.site import NOWHERE, Site
from provisioning import actions as journal
from provisioning import operator as operators
from provisioning.identity import Identity
from provisioning.operator import Operator
from provisioning.registry import open_registry
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]
OS_USER = pwd.getpwuid(os.getuid()).pw_name
WHO = ("--operator", "Ann Installer")


@pytest.fixture(autouse=True)
def _no_ambient_operator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No operator unless a test gives one (not the machine's /etc/smartcorr)."""
    monkeypatch.delenv(operators.OPERATOR_FILE_ENV, raising=False)
    monkeypatch.delenv("SSH_CONNECTION", raising=False)
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setattr(operators, "DEFAULT_OPERATOR_FILE", tmp_path / "no-operator.json")


def stored(data_dir: Path, identity: Identity) -> list[dict[str, Any]]:
    """Every record in the store (the uplink goes nowhere: all are still queued)."""
    path = store_path(data_dir)
    if not path.exists():
        return []
    reader = StoreReader(path, identity.storage_key)
    try:
        return [json.loads(r) for r in reader.queued()]
    except sqlite3.OperationalError:  # another process is creating it (no table yet)
        return []
    finally:
        reader.close()


def of_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return sorted((r for r in records if r["kind"] == kind), key=lambda r: r["seq"])


def pending(identity: Identity) -> journal.Journal:
    return journal.read(identity.directory, journal.journal_aead(identity))


@pytest.fixture
def site(tmp_path: Path, identity: Identity) -> Iterator[Site]:
    s = Site(tmp_path / "site", identity, NOWHERE, health_interval_s=0.5)
    try:
        yield s
    finally:
        s.close(drain_s=0.1)  # the uplink goes nowhere: nothing to drain


def cli(*argv: str) -> int:
    return gateway.main(list(argv))


def person() -> Operator:
    return operators.resolve_operator("Ann Installer", "installer", None)


# -- who ---------------------------------------------------------------------------------


def test_an_action_without_an_operator_is_refused_and_changes_nothing(
    identity: Identity, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ident = str(identity.directory)
    for argv in (["provision", "pair-tag", "--identity-dir", ident, "--tag", "0x1000"],
                 ["provision", "unpair-tag", "--identity-dir", ident, "--tag", "0x1000"],
                 ["provision", "pair-kiosk", "--identity-dir", ident, "--serial", "KI-1"],
                 ["provision", "unpair-kiosk", "--identity-dir", ident, "--serial", "KI-1"],
                 ["provision", "rotate-key", "--identity-dir", ident]):
        assert cli(*argv) == 2
        assert "say who you are: --operator NAME" in capsys.readouterr().err
    monkeypatch.setenv(operators.OPERATOR_FILE_ENV, str(tmp_path / "missing.json"))
    assert cli("provision", "pair-tag", "--identity-dir", ident, "--tag", "0x1000") == 2
    assert f"operator file {tmp_path / 'missing.json'} does not exist" in capsys.readouterr().err
    assert not (identity.directory / "tags.json").exists()
    assert not (identity.directory / journal.JOURNAL_FILE).exists()
    assert identity.next_key is None
    # a list is no action: no operator needed
    assert cli("provision", "list-tags", "--identity-dir", ident) == 0


def test_the_operator_file_names_who_and_must_not_be_writable_by_others(
    identity: Identity, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    who = tmp_path / "operator.json"
    who.write_text(json.dumps({"name": "Bo Tech", "role": "technician", "badge": "B-17"}))
    who.chmod(0o666)
    ident = str(identity.directory)
    assert cli("provision", "pair-tag", "--identity-dir", ident, "--tag", "0x1000",
               "--operator-file", str(who)) == 2
    err = capsys.readouterr().err
    assert f"operator file {who} is writable by group or others (mode 0666)" in err
    assert not (identity.directory / journal.JOURNAL_FILE).exists()
    who.chmod(0o644)
    assert cli("provision", "pair-tag", "--identity-dir", ident, "--tag", "0x1000",
               "--operator-file", str(who)) == 0
    [entry] = pending(identity).entries
    assert entry.operator["name"] == "Bo Tech"
    assert entry.operator["role"] == "technician"
    assert entry.operator["badge"] == "B-17"
    assert entry.operator["origin"] == str(who)
    assert entry.operator["os_user"] == OS_USER


def test_the_journal_holds_no_person_and_no_key_in_clear(
    identity: Identity, capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli("provision", "pair-tag", *WHO, "--identity-dir", str(identity.directory),
               "--tag", "0x1000", "--json") == 0
    key = json.loads(capsys.readouterr().out)["key"]
    raw = (identity.directory / journal.JOURNAL_FILE).read_bytes()
    assert b"Ann" not in raw
    assert b"T00001000" not in raw
    assert key.encode() not in raw
    assert (identity.directory / journal.JOURNAL_FILE).stat().st_mode & 0o077 == 0
    [entry] = pending(identity).entries
    assert key not in json.dumps(entry.details)  # the key is never written down


# -- the records ---------------------------------------------------------------------------


def test_each_local_action_is_a_record_naming_the_operator_and_the_os_user(
    tmp_path: Path, identity: Identity, site: Site, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ident = str(identity.directory)
    monkeypatch.setenv("SSH_CONNECTION", "192.0.2.7 50022 192.0.2.1 22")
    monkeypatch.setenv("SUDO_USER", "ann")
    site.start()  # running: the bundle reads its store
    assert cli("provision", "pair-tag", *WHO, "--identity-dir", ident, "--tag", "0x1000") == 0
    assert cli("provision", "unpair-tag", *WHO, "--identity-dir", ident, "--tag",
               "T00001000") == 0
    assert cli("provision", "pair-kiosk", *WHO, "--identity-dir", ident, "--serial",
               "KI-7") == 0
    assert cli("provision", "unpair-kiosk", *WHO, "--identity-dir", ident, "--serial",
               "KI-7") == 0
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nidentity_dir = "{ident}"\ndata_dir = "{site.workdir}/data"\n'
                   '[broker]\nhost = "127.0.0.1"\nport = 9\ntls = false\n'
                   "insecure_plaintext = true\n")
    assert cli("diag", "bundle", "--config", str(cfg), "--out", str(tmp_path / "b.tar.gz"),
               "--include-personal", "--operator", "Bo Tech") == 0
    assert cli("diag", "bundle", "--config", str(cfg), "--out",  # no personal data: no entry
               str(tmp_path / "plain.tar.gz")) == 0
    data = site.workdir / "data"
    wait_for(lambda: len(of_kind(stored(data, identity), "local.action")) == 5, 10,
             "five local.action records")
    records = of_kind(stored(data, identity), "local.action")
    assert [r["body"]["action"] for r in records] == [
        "tag.paired", "tag.unpaired", "kiosk.paired", "kiosk.unpaired", "bundle.personal"]
    assert [r["body"]["entry"] for r in records] == [1, 2, 3, 4, 5]
    for rec in records:
        assert rec["prio"] == "alarm"
        op = rec["body"]["operator"]
        assert op["os_user"] == OS_USER
        assert op["sudo_user"] == "ann"
        assert op["ssh_client"] == "192.0.2.7"
        assert op["origin"] == "argv"
        assert isinstance(rec["body"]["at_ms"], int)
    assert records[0]["body"]["operator"]["name"] == "Ann Installer"
    assert records[0]["body"]["operator"]["role"] == "installer"
    assert records[0]["body"]["details"]["tag"] == "T00001000"
    assert records[0]["body"]["details"]["sha256_before"] is None  # no tags.json before
    assert records[1]["body"]["details"]["sha256_before"] is not None
    assert records[2]["body"]["details"]["serial"] == "KI-7"
    assert records[4]["body"]["operator"] == {**records[4]["body"]["operator"],
                                              "name": "Bo Tech", "role": "technician"}
    assert records[4]["body"]["details"]["out"] == str(tmp_path / "b.tar.gz")
    # once recorded, the journal is compacted
    wait_for(lambda: not pending(identity).entries, 10, "the journal compacted")


def test_a_key_rotation_is_written_down_before_the_key_is_staged(identity: Identity) -> None:
    assert cli("provision", "rotate-key", *WHO, "--identity-dir",
               str(identity.directory)) == 0
    [entry] = pending(identity).entries
    assert entry.action == "key.staged"
    assert entry.details == {"kid": identity.kid}
    assert identity.next_key is not None


def test_a_pairing_while_the_gateway_runs_is_recorded_within_seconds(
    identity: Identity, site: Site,
) -> None:
    gw = site.start()
    data = site.workdir / "data"
    wait_for(lambda: of_kind(stored(data, identity), "config.loaded") != [], 10, "config.loaded")
    assert cli("provision", "pair-tag", *WHO, "--identity-dir", str(identity.directory),
               "--tag", "0x2000") == 0
    wait_for(lambda: of_kind(stored(data, identity), "local.action") != [], 10,
             "the pairing's record")
    [rec] = of_kind(stored(data, identity), "local.action")
    assert rec["body"]["details"]["tag"] == "T00002000"
    assert rec["body"]["operator"]["name"] == "Ann Installer"
    wait_for(lambda: not pending(identity).entries, 10, "the journal compacted")
    assert gw.actions.stats.errors == 0
    assert gw.alive()


# -- exactly once, across kill -9 --------------------------------------------------------


def _daemon(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(REPO / "gateway.py"), "run", "--config",
                             str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_an_entry_is_recorded_exactly_once_across_kills(
    tmp_path: Path, identity: Identity,
) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nidentity_dir = "{identity.directory}"\ndata_dir = "{data}"\n'
                   f'[paths]\nruntime_dir = "{tmp_path / "run"}"\n'
                   '[broker]\nhost = "127.0.0.1"\nport = 9\ntls = false\n'
                   "insecure_plaintext = true\n")
    ident = str(identity.directory)
    # the daemon is stopped: the pairing waits in the journal
    assert cli("provision", "pair-tag", *WHO, "--identity-dir", ident, "--tag", "0x1000") == 0

    def actions() -> list[dict[str, Any]]:
        return of_kind(stored(data, identity), "local.action")

    proc = _daemon(cfg)
    try:
        # CI once timed out here (30 s, nothing said): now the daemon's words are kept
        deadline = time.monotonic() + 60
        while len(actions()) != 1 and proc.poll() is None and time.monotonic() < deadline:
            threading.Event().wait(0.05)  # the state of another process: polled
        recorded = len(actions()) == 1
        if recorded:
            proc.send_signal(signal.SIGKILL)  # after the record, before the compaction (5 s on)
            proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert recorded, (f"the pairing not recorded within 60 s (daemon status {proc.returncode}); "
                      f"records: {[r['kind'] for r in stored(data, identity)]}; it said: "
                      f"{err[-3000:]}")
    assert [e.number for e in pending(identity).entries] == [1], "killed after compaction"
    # an action written down by a command killed before it acted (nothing changed)
    journal.append(identity.directory, journal.journal_aead(identity), "tag.unpaired",
                   {"tag": "T00001000"}, person())
    proc = _daemon(cfg)
    try:
        wait_for(lambda: len(of_kind(stored(data, identity), "config.loaded")) == 2, 30,
                 "the second start")
        wait_for(lambda: not pending(identity).entries, 30, "the journal compacted")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert [(r["body"]["entry"], r["body"]["action"]) for r in actions()] == [
        (1, "tag.paired"), (2, "tag.unpaired")]
    assert pending(identity).last == 2  # numbers go on after the compaction
    assert journal.append(identity.directory, journal.journal_aead(identity), "tag.paired",
                          {"tag": "T00001001"}, person()) == 3


# -- files changed, whatever the route ---------------------------------------------------


def _start_stop(workdir: Path, identity: Identity) -> LocalActions:
    s = Site(workdir, identity, NOWHERE)
    try:
        gw = s.start()
        assert gw.writer.flush()
        return gw.actions
    finally:
        s.close(drain_s=0.1)  # the uplink goes nowhere: nothing to drain


def test_tags_json_replaced_by_hand_is_a_change_nobody_explained(
    tmp_path: Path, identity: Identity,
) -> None:
    work = tmp_path / "site"
    data = work / "data"
    _start_stop(work, identity)
    [loaded] = of_kind(stored(data, identity), "config.loaded")
    assert loaded["prio"] == "status"
    assert set(loaded["body"]["files"]) == {"config", "tags", "kiosks"}
    assert loaded["body"]["files"]["tags"]["sha256"] is None
    _start_stop(work, identity)  # nothing changed: no config.changed
    assert of_kind(stored(data, identity), "config.changed") == []
    registry = open_registry(identity)  # by hand: no command line, no journal
    registry.pair("0x1000", bytes(16))
    registry.close()
    _start_stop(work, identity)
    [changed] = of_kind(stored(data, identity), "config.changed")
    assert changed["prio"] == "alarm"
    assert changed["body"]["changed"] == ["tags"]
    assert changed["body"]["explained"] is False
    assert changed["body"]["files"]["tags"]["explained"] is False
    assert changed["body"]["files"]["tags"]["before_prefix"] is None
    # the same change through the command line is explained by its record
    assert cli("provision", "unpair-tag", *WHO, "--identity-dir", str(identity.directory),
               "--tag", "0x1000") == 0
    _start_stop(work, identity)
    second = of_kind(stored(data, identity), "config.changed")[1]
    assert second["body"]["changed"] == ["tags"]
    assert second["body"]["explained"] is True
    assert second["body"]["files"]["tags"]["before_prefix"] == \
        changed["body"]["files"]["tags"]["sha256"][:16]
    _start_stop(work, identity)  # unchanged since: nothing more
    assert len(of_kind(stored(data, identity), "config.changed")) == 2
    assert len(of_kind(stored(data, identity), "config.loaded")) == 5


# -- bounds and damage ---------------------------------------------------------------------


def test_the_journal_is_bounded_and_says_why(
    identity: Identity, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(journal, "MAX_PENDING", 3)
    ident = str(identity.directory)
    for n in range(3):
        assert cli("provision", "pair-tag", *WHO, "--identity-dir", ident, "--tag",
                   str(0x1000 + n)) == 0
    tags = (identity.directory / "tags.json").read_bytes()
    assert cli("provision", "pair-tag", *WHO, "--identity-dir", ident, "--tag", "0x2000") == 2
    err = capsys.readouterr().err
    assert "holds 3 actions the gateway has not recorded yet (at most 3)" in err
    assert "is the gateway running?" in err
    assert (identity.directory / "tags.json").read_bytes() == tags  # refused: unchanged


def test_a_damaged_journal_line_is_recorded_never_skipped_and_never_a_crash(
    identity: Identity, site: Site,
) -> None:
    aead = journal.journal_aead(identity)
    for tag in ("T00000001", "T00000002", "T00000003"):
        journal.append(identity.directory, aead, "tag.paired", {"tag": tag}, person())
    path = identity.directory / journal.JOURNAL_FILE
    lines = path.read_bytes().split(b"\n")
    entry2 = json.loads(lines[2])
    entry2["ct"] = entry2["ct"][:-4] + ("AAAA" if entry2["ct"][-4:] != "AAAA" else "BBBB")
    lines[2] = json.dumps(entry2).encode()
    lines.insert(2, b"garbage, not JSON")
    # and a torn last line: a command killed while it wrote
    path.write_bytes(b"\n".join(lines).rstrip(b"\n") + b"\n" + b'{"n": 9, "nonce": "ab')
    journal.append(identity.directory, aead, "tag.unpaired", {"tag": "T00000001"}, person())
    gw = site.start()
    data = site.workdir / "data"
    wait_for(lambda: len(of_kind(stored(data, identity), "local.action")) == 6, 10,
             "six local.action records")
    records = of_kind(stored(data, identity), "local.action")
    good = [(r["body"]["entry"], r["body"]["details"].get("tag")) for r in records
            if r["body"]["action"] != "journal.unreadable"]
    assert good == [(1, "T00000001"), (3, "T00000003"), (4, "T00000001")]
    bad = [r["body"] for r in records if r["body"]["action"] == "journal.unreadable"]
    assert sorted(str(b["details"]["error"]) for b in bad) == [
        "does not decrypt (altered, moved, or another gateway's storage key)",
        "not a journal entry", "not a journal entry"]
    assert {b["entry"] for b in bad} == {2, None}
    assert all(b["operator"] is None for b in bad)
    assert gw.actions.stats.unreadable == 3
    wait_for(lambda: path.read_bytes().count(b"\n") == 1, 10, "the journal compacted")
    assert gw.alive()
    assert gw.actions.stats.errors == 0
