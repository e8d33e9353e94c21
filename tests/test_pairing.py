"""Pairing never silently replaces a key (issue 12, item 5), and an unpaired device's data
leaves the gateway once delivered, never before (issue 11, item 4).

Real registries and journal, the real command line, the real gateway on a real store,
a real mosquitto that goes down and comes back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import gateway
from app.actions import LocalActions
from app.removals import Removals, pending_key
from buffer.store import Store, StoreReader, committed_state, store_path
from buffer.writer import StoreWriter
from core.clock import Clock
from core.record import Reading, Source
from core.topics import PLATFORM_CN
from lab.mosquitto import Pki, client_config, free_port, start_mosquitto
from lab.simulators.tag import SimTag
from lab.site import NOWHERE, Platform, Site
from provisioning import actions as journal
from provisioning import operator as operators
from provisioning.identity import Identity
from provisioning.kiosks import open_kiosks
from provisioning.registry import device_key_id, open_registry
from tests.helpers import stored_records, wait_for

WHO = ("--operator", "Ann Installer")
TAG = "T00001000"


@pytest.fixture(autouse=True)
def _no_ambient_operator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(operators.OPERATOR_FILE_ENV, raising=False)
    monkeypatch.setattr(operators, "DEFAULT_OPERATOR_FILE", tmp_path / "no-operator.json")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = gateway.main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and "--json" in argv else out), err


def entries(identity: Identity) -> list[journal.Entry]:
    return journal.read(identity.directory, journal.journal_aead(identity)).entries


def key_file(tmp_path: Path, name: str, key: bytes) -> str:
    path = tmp_path / name
    path.write_text(key.hex())
    path.chmod(0o600)
    return str(path)


# -- pairing again ---------------------------------------------------------------------


def test_pairing_a_paired_tag_again_is_refused_and_changes_nothing(
    identity: Identity, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    ident = str(identity.directory)
    code, first, _ = cli(capsys, "provision", "pair-tag", *WHO, "--identity-dir", ident,
                         "--tag", "0x1000", "--absent-after", "600", "--json")
    assert code == 0
    assert first["replaced"] is False
    tags_json = (identity.directory / "tags.json").read_bytes()
    code, _, err = cli(capsys, "provision", "pair-tag", *WHO, "--identity-dir", ident,
                       "--tag", TAG, "--key-file", key_file(tmp_path, "k", bytes(16)))
    assert code == 2
    assert f"tag {TAG} is already paired" in err
    assert "absent after 600 s" in err
    assert f"key {first['kid']}" in err  # what is paired now, by key id
    assert "give --replace" in err  # and how to replace it
    assert "Traceback" not in err
    assert (identity.directory / "tags.json").read_bytes() == tags_json  # untouched
    assert [e.action for e in entries(identity)] == ["tag.paired"]  # a refusal: no entry
    registry = open_registry(identity)
    try:
        paired = registry.get(TAG)
        with pytest.raises(Exception, match="already paired"):  # the registry refuses too
            registry.pair(TAG, bytes(16))
    finally:
        registry.close()
    assert paired is not None
    assert paired.key.hex() == first["key"]


def test_replace_keeps_the_settings_and_the_record_names_both_key_ids(
    identity: Identity, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    ident = str(identity.directory)
    old_key, new_key = bytes(range(16)), bytes(range(16, 32))
    assert cli(capsys, "provision", "pair-tag", *WHO, "--identity-dir", ident, "--tag", TAG,
               "--absent-after", "900", "--key-file", key_file(tmp_path, "old", old_key))[0] == 0
    before = open_registry(identity).get(TAG)
    assert before is not None
    site = Site(tmp_path / "site", identity, NOWHERE, health_interval_s=0.2)
    gw = site.start()  # the daemon runs while the key is replaced
    try:
        wait_for(lambda: gw.actions.stats.recorded == 1, 10, "the pairing recorded")
        code, out, err = cli(capsys, "provision", "pair-tag", *WHO, "--identity-dir", ident,
                             "--tag", TAG, "--replace", "--json",
                             "--key-file", key_file(tmp_path, "new", new_key))
        assert code == 0, err
        assert out == {"tag": TAG, "absent_after_s": 900, "kid": device_key_id(new_key),
                       "old_kid": device_key_id(old_key), "replaced": True}
        wait_for(lambda: gw.actions.stats.recorded == 2, 10, "the replacement recorded")
        assert gw.writer.flush()
    finally:
        site.close(drain_s=0)
    after = open_registry(identity).get(TAG)
    assert after is not None
    assert after.key == new_key
    assert after.absent_after_s == 900  # kept, not reset to the default
    assert after.paired_at == before.paired_at
    raw = stored_records(store_path(tmp_path / "site" / "data"), identity.storage_key)
    actions = [json.loads(r)["body"] for r in raw if json.loads(r)["kind"] == "local.action"]
    assert [a["action"] for a in actions] == ["tag.paired", "tag.replaced"]
    replaced = actions[1]["details"]
    assert replaced["kid"] == device_key_id(new_key)
    assert replaced["old_kid"] == device_key_id(old_key)
    assert replaced["absent_after_s"] == 900
    assert actions[1]["operator"]["name"] == "Ann Installer"
    for rec in raw:  # never the keys, in no record
        assert old_key.hex().encode() not in rec
        assert new_key.hex().encode() not in rec
    # a setting given with --replace is taken
    assert cli(capsys, "provision", "pair-tag", *WHO, "--identity-dir", ident, "--tag", TAG,
               "--replace", "--absent-after", "60",
               "--key-file", key_file(tmp_path, "third", bytes(16)))[0] == 0
    changed = open_registry(identity).get(TAG)
    assert changed is not None
    assert changed.absent_after_s == 60


def test_a_new_identity_is_refused_while_the_old_one_holds_what_only_it_can_read(
    identity: Identity, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Pairings and the journal are encrypted under the identity's storage key: a new
    identity (init --force, or init over a directory whose gateway.json is gone) would
    leave them unreadable, the next start failing on them."""
    ident = str(identity.directory)
    assert cli(capsys, "provision", "pair-tag", *WHO, "--identity-dir", ident,
               "--tag", TAG)[0] == 0
    assert cli(capsys, "provision", "pair-kiosk", *WHO, "--identity-dir", ident,
               "--serial", "KI-0001")[0] == 0
    files = ("gateway.json", "signing.key", "tags.json", "kiosks.json", "actions.journal")
    before = {name: (identity.directory / name).read_bytes() for name in files}
    init = ("provision", "init", "--identity-dir", ident, "--gateway-id", "gw-test-0001",
            "--no-tpm")
    for argv in ((*init, "--force"), init):
        if argv == init:  # an identity half gone: its registries are still there
            (identity.directory / "gateway.json").unlink()
        code, _, err = cli(capsys, *argv)
        assert code == 2, err
        assert "1 paired tag (tags.json)" in err
        assert "1 paired kiosk (kiosks.json)" in err
        assert "2 local actions not yet recorded by the daemon (actions.journal)" in err
        assert "provision decommission" in err
        assert "move those files out" in err
        assert "Traceback" not in err
        for name in files[1:]:
            assert (identity.directory / name).read_bytes() == before[name], name
    (identity.directory / "gateway.json").write_bytes(before["gateway.json"])
    registry = open_registry(identity)  # the old identity still reads its pairings
    try:
        assert registry.get(TAG) is not None
    finally:
        registry.close()

    aside = tmp_path / "aside"
    aside.mkdir()
    for name in files[2:]:  # the installer discards them, knowingly
        (identity.directory / name).rename(aside / name)
    code, out, err = cli(capsys, *init, "--force", "--json")
    assert code == 0, err
    assert out["kid"] != identity.kid


def test_kiosk_pairing_again_needs_replace_and_names_both_key_ids(
    identity: Identity, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    ident = str(identity.directory)
    first = key_file(tmp_path, "k1", bytes(range(16)))
    assert cli(capsys, "provision", "pair-kiosk", *WHO, "--identity-dir", ident,
               "--serial", "KI-0001", "--key-file", first)[0] == 0
    code, _, err = cli(capsys, "provision", "pair-kiosk", *WHO, "--identity-dir", ident,
                       "--serial", "KI-0001")
    assert code == 2
    assert "kiosk KI-0001 is already paired" in err
    assert f"key {device_key_id(bytes(range(16)))}" in err
    assert "--replace" in err
    code, out, _ = cli(capsys, "provision", "pair-kiosk", *WHO, "--identity-dir", ident,
                       "--serial", "KI-0001", "--replace", "--json")  # a generated key
    assert code == 0
    assert out["old_kid"] == device_key_id(bytes(range(16)))
    assert out["kid"] == device_key_id(bytes.fromhex(out["key"]))
    kiosks = open_kiosks(identity)
    try:
        paired = kiosks.get("KI-0001")
    finally:
        kiosks.close()
    assert paired is not None
    assert paired.key == bytes.fromhex(out["key"])
    assert [(e.action, e.details.get("old_kid")) for e in entries(identity)] == [
        ("kiosk.paired", None), ("kiosk.replaced", device_key_id(bytes(range(16))))]


# -- an unpaired tag's data, removed once delivered --------------------------------------


def ledger(data_dir: Path, identity: Identity) -> dict[str, int]:
    """The store's ledger as on disk (read with the gateway's storage key)."""
    return committed_state(store_path(data_dir), identity.storage_key)[1]


@pytest.mark.slow
def test_an_unpaired_tags_data_stays_until_delivered_then_goes(
    tmp_path: Path, pki: Pki, identity: Identity, capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    broker = start_mosquitto(tmp_path / "mosquitto", pki, port=port, persistence=True)
    platform = Platform(client_config(broker, pki, PLATFORM_CN), identity,
                        persistent_session=True).start()
    gw_broker = client_config(broker, pki, identity.gateway_id)
    work, data = tmp_path / "home", tmp_path / "home" / "data"
    work.mkdir()
    tag = SimTag(0x1000, bytes(range(16)))
    site = Site(work, identity, gw_broker, health_interval_s=0.2)
    sim = site.tag_receiver([tag], "TR-RM-0001")
    gw = site.start()
    try:
        for _ in range(3):
            sim.send_beacon(tag)
        wait_for(lambda: len(sim.acked()) == 3, 20, "three beacons committed")
        assert gw.writer.ledger_value(f"tag:{TAG}") == 3  # the counter kept of the tag
        broker.stop()  # the broker goes down with records of the tag queued
    finally:
        site.close(drain_s=0)
    assert cli(capsys, "provision", "unpair-tag", *WHO, "--identity-dir",
               str(identity.directory), "--tag", TAG)[0] == 0
    assert open_registry(identity).get(TAG) is None  # its key goes at once

    site = Site(work, identity, gw_broker, health_interval_s=0.2)  # restarted, no tag
    gw = site.start()
    try:
        mark = pending_key("tag", TAG)
        wait_for(lambda: gw.writer.ledger_value(mark) == 1, 10, "the unpairing recorded")
        polls = gw.removals.polls
        wait_for(lambda: gw.removals.polls >= polls + 5, 10, "five polls, broker down")
        assert gw.writer.stats.by_kind["tag.data_removed"] == 0
        assert ledger(data, identity)[f"tag:{TAG}"] == 3  # undelivered: nothing of it is gone

        broker = start_mosquitto(tmp_path / "mosquitto", pki, port=port, persistence=True)
        wait_for(lambda: gw.writer.stats.by_kind["tag.data_removed"] == 1, 30,
                 "the removal once the broker is back")
        assert gw.writer.ledger_value(f"tag:{TAG}") is None
        assert gw.writer.ledger_value(mark) is None
        assert gw.removals.errors == 0
    finally:
        assert site.close(drain_s=15)  # everything delivered, the removal record too
        broker.stop()
    assert not [k for k in ledger(data, identity) if TAG in k]  # gone from the disk as well
    wait_for(lambda: any(r.kind == "tag.data_removed" for r in platform.arrived), 15,
             "the removal's record at the platform")
    platform.stop()
    [removed] = [r for r in platform.arrived if r.kind == "tag.data_removed"]
    body = removed.record["body"]
    assert body == {"tag": TAG, "ledger": ["counter", "interval"],
                    "delivered_through": body["delivered_through"]}
    about = [r for r in platform.arrived if r.record["body"].get("tag") == TAG
             or r.record["body"].get("details", {}).get("tag") == TAG]
    assert {r.kind for r in about} >= {"tag.interval", "local.action", "tag.data_removed"}
    # every record about the tag was sealed before the bound and arrived before the removal
    assert all(r.seq <= body["delivered_through"] for r in about if r is not removed)
    # its three beacons: the interval the first stop sealed
    [interval] = [r.record["body"] for r in about if r.kind == "tag.interval"]
    assert (interval["first_counter"], interval["last_counter"], interval["beacons"]) == \
        (1, 3, 3)


def test_removals_wait_for_a_restart_keep_a_repaired_device_and_are_bounded(
    tmp_path: Path, identity: Identity, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rules on a real store and writer: a device still paired at this start waits,
    a mark of 0 (paired again) keeps the device's counter, at most MAX_MARKS_PER_POLL
    marks a poll, and nothing goes while a record at or below the bound is queued."""
    from app import removals

    monkeypatch.setattr(removals, "MAX_MARKS_PER_POLL", 2)
    store = Store(tmp_path / "records.db", identity.storage_key)
    source = Source("gateway", identity.gateway_id)
    writer = StoreWriter(store, store.sealer(identity.gateway_id,
                                             identity.session_key()), Clock(), source=source)
    writer.start()
    reader = StoreReader(tmp_path / "records.db", identity.storage_key)
    try:
        marks = [(pending_key("tag", f"T0000100{i}"), 1) for i in range(4)]
        marks.append((pending_key("tag", "T00002000"), 0))  # paired again since
        counters = [(f"tag:T0000100{i}", 7) for i in range(4)] + [("tag:T00002000", 9)]
        writer.submit(Reading("local.action", source, {"action": "test"}, 0,
                              ledger=(*marks, *counters)))
        assert writer.flush()
        rm = Removals(writer, reader, {"tag": frozenset({"T00001003"})}, source,
                      lambda: 0)
        rm.poll()  # the record at the bound is still queued: nothing goes
        assert writer.flush()
        assert writer.stats.by_kind["tag.data_removed"] == 0
        assert writer.ledger_value("tag:T00001000") == 7
        assert writer.ledger_value("tag:T00002000") == 9
        writer.delete_range(0, 0, writer.last_seq, 1)  # delivered
        assert writer.flush()
        seen = []
        for _ in range(3):
            rm.poll()
            assert writer.flush()
            seen.append(writer.stats.by_kind["tag.data_removed"])
        # two marks a poll, on from where the last stopped: 1002 (1003 waits), then the
        # mark of 2000, then 1000 and 1001 (whose bound the first poll took)
        assert seen == [1, 1, 3]
        for i in range(3):
            assert writer.ledger_value(f"tag:T0000100{i}") is None
        assert writer.ledger_value("tag:T00001003") == 7  # paired at this start: kept
        assert writer.ledger_value(pending_key("tag", "T00001003")) == 1
        assert writer.ledger_value("tag:T00002000") == 9  # paired again: its counter stays
        assert writer.ledger_value(pending_key("tag", "T00002000")) is None
        assert rm.errors == 0
    finally:
        writer.stop()
        reader.close()
        store.close()


def test_a_pairing_journal_entry_marks_the_device(identity: Identity, tmp_path: Path) -> None:
    """The marks come with the action's record: unpairing 1, pairing again 0."""
    store = Store(tmp_path / "records.db", identity.storage_key)
    source = Source("gateway", identity.gateway_id)
    writer = StoreWriter(store, store.sealer(identity.gateway_id, identity.session_key()),
                         Clock(), source=source)
    writer.start()
    try:
        person = operators.resolve_operator("Ann Installer", "installer", None)
        journal.record(identity, "kiosk.unpaired", {"serial": "KI-9"}, person)
        actions = LocalActions(writer, identity, None, source, lambda: 0)
        actions.poll()
        assert writer.flush()
        assert writer.ledger_value(pending_key("kiosk", "KI-9")) == 1
        journal.record(identity, "kiosk.paired", {"serial": "KI-9"}, person)
        actions.poll()
        assert writer.flush()
        assert writer.ledger_value(pending_key("kiosk", "KI-9")) == 0
    finally:
        writer.stop()
        store.close()


# -- the command line and the platform's commands never interleave ----------------------


def _waiting_on(lock_file: Path, pid: int) -> bool:
    """Whether *pid* waits for an flock on *lock_file* (/proc/locks: '->' marks a waiter)."""
    inode = lock_file.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields:
            rest = fields[fields.index("->") + 1:]
            if int(rest[3]) == pid and int(rest[4].rsplit(":", 1)[1]) == inode:
                return True
    return False


def test_a_cli_pairing_waits_for_a_command_holding_the_journal_lock(
    identity: Identity, tmp_path: Path,
) -> None:
    """``provision pair-tag`` takes the journal's lock (the one app/commands.py holds while
    it applies a platform's pairing) before it reads the registry: a pairing the command
    made meanwhile is what it replaces, and its journal entry says so."""
    import subprocess
    import sys

    from provisioning.registry import new_device_key

    ident = identity.directory
    commands_key, cli_key = new_device_key(), bytes(range(16))
    with journal.locked(ident):  # as app/commands.py while it applies a pair-tag
        proc = subprocess.Popen(
            [sys.executable, str(Path(gateway.__file__)), "provision", "pair-tag", *WHO,
             "--identity-dir", str(ident), "--tag", TAG, "--replace", "--json",
             "--key-file", key_file(tmp_path, "cli", cli_key)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: _waiting_on(ident / journal.LOCK_FILE, proc.pid), 60,
                     "the command line waiting for the journal's lock")
            registry = open_registry(identity)  # the command's effect, still under the lock
            try:
                registry.pair(TAG, commands_key, absent_after_s=300)
            finally:
                registry.close()
        except BaseException:
            proc.kill()
            raise
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["old_kid"] == device_key_id(commands_key)
    [entry] = entries(identity)
    # it saw the command's pairing: a replacement of that key, its setting kept
    assert entry.action == "tag.replaced"
    assert entry.details["old_kid"] == device_key_id(commands_key)
    assert entry.details["absent_after_s"] == 300
    after = open_registry(identity).get(TAG)
    assert after is not None
    assert (after.key, after.absent_after_s) == (cli_key, 300)


def test_the_journal_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(
    identity: Identity,
) -> None:
    import threading

    ident = identity.directory
    other: list[bool] = []
    with journal.locked(ident) as held, journal.locked(ident) as again:
        assert held
        assert again  # the holder takes it again (a journal entry while pairing)
        thread = threading.Thread(target=lambda: other.append(
            journal.locked(ident, wait=False).__enter__()))
        thread.start()
        thread.join()
        assert other == [False]  # another thread does not
    with journal.locked(ident, wait=False) as free:
        assert free
