"""Certificates that renew themselves (issue 12, item 3) and the enrolment's command keyring.

With the real parts: the platform's CA and registry (SQLite), a real mosquitto whose mTLS
listener trusts the platform's CA, the real enrolment service, the gateway's real daemon
assembly (store, writer, uplink, renewal task) and the platform's real ingest counting
what arrives. Short-lived certificates come from the CA's own API (a validity in
seconds), never from a faked clock; only whether the clock is *trusted* is chosen."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway
from app import renewal as renewal_task
from app.assembly import Gateway
from app.config import Config, ConfigError, load_config
from app.daemon import lock_data_dir
from central import ca as central_ca
from central import cli as ingest_cli
from central import command_keys as central_command_keys
from central.db import open_db
from central.enrolment import EnrolmentService
from central.ingest import Ingest, report
from core import durable
from core.clock import Clock
from core.enrolment import EnrolmentError
from core.mqtt import BrokerConfig
from core.record import b64u, canonical
from core.topics import ENROL_CN, PLATFORM_CN
from lab.mosquitto import Mosquitto, Pki, client_config, free_port, start_mosquitto
from lab.site import IngestPlatform
from provisioning import command_keys, enrol, renewal
from provisioning import identity as identity_mod
from provisioning import operator as operators
from provisioning.identity import Identity, load_identity
from provisioning.renewal import DAY_MS, CertInfo, Renew, RenewalPolicy, Schedule, Wait, Warn
from tests.helpers import plaintext_config, wait_for
from tests.test_enrolment import (  # the enrolment's fixtures and helpers, reused
    Platform,
    _no_ambient_operator,  # noqa: F401 (an autouse fixture)
    entries,
    gateway_identity,
    platform,  # noqa: F401 (a fixture)
)
from uplink import forwarder as uplink_forwarder

pytestmark = pytest.mark.slow
OPERATOR = operators.resolve_operator("Ann Installer", None, None)
#: Renewal's own timing scaled down (the schedule is what is tested, not the minutes).
FAST = {"retry_min_s": 0.3, "retry_max_s": 0.6, "timeout_s": 3.0}


@pytest.fixture(autouse=True)
def _fast_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The renewal task and the uplink's file check look often (their constants, scaled)."""
    monkeypatch.setattr(renewal_task, "TICK_S", 0.05)
    monkeypatch.setattr(uplink_forwarder, "CERT_CHECK_S", 0.3)
    monkeypatch.setattr(uplink_forwarder, "CERT_SETTLE_S", 0.1)


@pytest.fixture
def broker(tmp_path: Path, platform: Platform) -> Iterator[tuple[Mosquitto, Pki]]:  # noqa: F811
    """mosquitto with the production ACL; its mTLS listener trusts the platform's CA."""
    pki = platform.pki()
    mq = start_mosquitto(tmp_path / "mq", pki)
    try:
        yield mq, pki
    finally:
        mq.stop()


ServiceFactory = Callable[..., EnrolmentService]


@pytest.fixture
def services(platform: Platform,  # noqa: F811
             broker: tuple[Mosquitto, Pki]) -> Iterator[ServiceFactory]:
    """Starts the platform's enrolment service (options as given)."""
    started: list[EnrolmentService] = []

    def start(**options: Any) -> EnrolmentService:
        events: list[dict[str, Any]] = []
        service = EnrolmentService(platform.db_url, client_config(*broker, ENROL_CN),
                                   platform.ca_dir, command_keys=platform.command_keys,
                                   on_event=events.append, **options).start()
        service.events = events  # type: ignore[attr-defined]
        started.append(service)
        assert service.subscribed.wait(10)
        return service

    yield start
    for service in started:
        service.stop()


def enrolled(tmp_path: Path, platform: Platform, gw: str,  # noqa: F811
             validity: dt.timedelta) -> Identity:
    """A gateway enrolled offline, its certificate valid *validity* from now."""
    identity = gateway_identity(tmp_path, gw)
    data = enrol.make(identity, claim=None, mode="offline").data
    with open_db(platform.db_url) as db:
        issued = central_ca.sign_request(db, platform.ca, data, require_claim=False,
                                         command_keys=platform.command_keys,
                                         validity=validity)
    enrol.complete(identity, issued.answer, OPERATOR, mode="offline")
    return identity


def uplink_files(identity: Identity, port: int) -> BrokerConfig:
    d = identity.directory
    return BrokerConfig("127.0.0.1", port, str(d / "ca.crt"), str(d / "tls.crt"),
                        str(d / "tls.key"))


def run_gateway(workdir: Path, identity: Identity, broker: BrokerConfig, policy: RenewalPolicy,
                *, synced: Callable[[], bool] = lambda: True,
                health_interval_s: float = 300.0) -> Gateway:
    """The daemon's assembly; *synced*: whether the kernel says NTP set the clock."""
    config = Config(workdir / "data", broker, identity_dir=identity.directory, renewal=policy)
    gw = Gateway(config, identity, clock=Clock(synced=synced),
                 health_interval_s=health_interval_s)
    gw.start()
    return gw


def arrived(db_url: str, gw: str) -> list[dict[str, Any]]:
    """The records the platform's ingest stored for *gw* (each once: by seq)."""
    with open_db(db_url) as db, db.transaction(write=False) as tx:
        rows = tx.all("SELECT data FROM records WHERE gw = ? ORDER BY seq", (gw,))
    return [json.loads(bytes(r[0])) for r in rows]


def kinds(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind]


def serial_of(identity: Identity) -> str:
    cert = x509.load_pem_x509_certificate((identity.directory / "tls.crt").read_bytes())
    return format(cert.serial_number, "x")


# --- the configuration --------------------------------------------------------------------

def test_the_enrolment_section_is_checked_with_clear_errors(tmp_path: Path) -> None:
    ident = tmp_path / "id"
    cfg = plaintext_config(tmp_path, ident, extra="[enrolment]\nrenew_before_days = 14\n"
                                                  "renew_life_share = 0.5\n")
    policy = load_config(cfg).renewal
    assert (policy.enabled, policy.before_days, policy.life_share) == (True, 14.0, 0.5)
    assert load_config(plaintext_config(tmp_path, ident)).renewal == RenewalPolicy()
    for extra, key, says in (
            ("renew_before_days = 0", "renew_before_days", "must be 1-365 days"),
            ("renew_life_share = 2", "renew_life_share", "must be 0.05-1"),
            ("renew = \"yes\"", "renew", "expected bool"),
            ("renew_after_days = 3", "renew_after_days", "unknown key")):
        with pytest.raises(ConfigError) as bad:
            load_config(plaintext_config(tmp_path, ident, extra=f"[enrolment]\n{extra}\n"))
        assert f"[enrolment] {key}: {says}" in str(bad.value)


# --- when: the schedule, sans-IO ------------------------------------------------------------

def _cert(not_before_ms: int, not_after_ms: int, fp: str = "aa") -> CertInfo:
    return CertInfo("1f", fp, not_before_ms, not_after_ms)


def test_renewal_is_due_30_days_before_expiry_or_over_the_last_third_of_a_short_life() -> None:
    policy = RenewalPolicy()
    year = _cert(0, 397 * DAY_MS)
    assert policy.renew_from_ms(year) == 367 * DAY_MS
    short = _cert(0, 9 * 60_000)  # nine minutes: renewed over its last three
    assert policy.renew_from_ms(short) == 6 * 60_000
    schedule = Schedule(policy)
    never_warned: Callable[[str], bool] = lambda _key: False  # noqa: E731
    assert [type(a).__name__ for a in schedule.decide(year, 366 * DAY_MS, True, 0,
                                                      warned=never_warned)] == ["Wait"]
    assert [type(a).__name__ for a in schedule.decide(year, 368 * DAY_MS, True, 0,
                                                      warned=never_warned)] == ["Renew"]
    # an untrusted clock neither triggers renewal nor warns, however late it says it is
    assert [(type(a).__name__, getattr(a, "why", None)) for a in schedule.decide(
        year, 396 * DAY_MS, False, 0, warned=never_warned)] == [("Wait", "untrusted_time")]


def test_backoff_doubles_is_jittered_and_bounded_and_warnings_come_once_renewal_failed() -> None:
    policy = RenewalPolicy(retry_min_s=60, retry_max_s=3600)
    cert = _cert(0, 397 * DAY_MS)
    schedule = Schedule(policy, rng=random.Random(7))
    delays = [schedule.failed(cert, 0) for _ in range(12)]
    assert all(30 <= d <= 3600 for d in delays)
    assert delays[-1] >= 1800  # capped: the cap times the jitter, never past the cap
    assert len({round(d, 6) for d in delays[:5]}) == 5  # jittered, growing
    assert delays[3] > delays[0]
    # the retry is held back until its time, then due again
    now_ms = 380 * DAY_MS  # 17 days left: the 30-day warning, not the 7-day one
    held = schedule.decide(cert, now_ms, True, 0, warned=lambda _k: False)
    assert [type(a).__name__ for a in held] == ["Warn", "Wait"]
    assert held[0].kind == "cert.expiring"  # type: ignore[union-attr]
    later = schedule.decide(cert, now_ms, True, schedule.retry_at_ns or 0,
                            warned=lambda _k: True)  # warned already: not again
    assert [type(a).__name__ for a in later] == ["Renew"]
    # a new certificate (renewed) starts afresh: no failure, no warning
    fresh = Schedule(policy)
    assert [type(a).__name__ for a in fresh.decide(
        cert, now_ms, True, 0, warned=lambda _k: False)] == ["Renew"]


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.lists(st.tuples(
    st.sampled_from(["look", "look", "fail", "renewed"]), st.integers(0, 45 * DAY_MS),
    st.booleans(), st.integers(0, 3 * 3600 * 10**9)), max_size=60))
def test_the_schedule_never_renews_early_or_on_untrusted_time_nor_warns_twice(
        enabled: bool, steps: list[tuple[str, int, bool, int]]) -> None:
    policy = RenewalPolicy(enabled=enabled, retry_min_s=60, retry_max_s=3600)
    cert = _cert(0, 60 * DAY_MS)  # renewal from day 30; warnings from day 30 and day 53
    schedule = Schedule(policy, rng=random.Random(0))
    warned: set[str] = set()
    mono = 0
    for op, utc, trusted, elapsed_ns in steps:
        mono += elapsed_ns
        if op == "fail":
            assert 30 <= schedule.failed(cert, mono) <= 3600
            continue
        if op == "renewed":
            schedule.succeeded()
            continue
        retry_at = schedule.retry_at_ns
        actions = schedule.decide(cert, utc, trusted, mono, warned=warned.__contains__)
        if not trusted:
            assert actions == [Wait("untrusted_time")]
        for action in actions:
            if isinstance(action, Renew):
                assert enabled
                assert utc >= policy.renew_from_ms(cert)
                assert retry_at is None or mono >= retry_at
            if isinstance(action, Warn):
                assert action.ledger_key not in warned
                assert cert.not_after_ms - utc < action.days * DAY_MS
                assert schedule.failures or not enabled
                warned.add(action.ledger_key)


# --- the platform's side -------------------------------------------------------------------

def test_the_platform_refuses_revoked_unknown_or_unsigned_renewals_and_rate_limits(
        tmp_path: Path, platform: Platform) -> None:  # noqa: F811
    a = enrolled(tmp_path, platform, "gw-aaaa-0001", dt.timedelta(days=30))
    first = serial_of(a)
    with open_db(platform.db_url) as db:
        def renew(identity: Identity, after_ms: int = 0, data: bytes | None = None,
                  ) -> central_ca.Issued:
            return central_ca.renew_request(
                db, platform.ca, data or renewal.new_request(identity).data,
                renew_only_after_ms=after_ms, validity=dt.timedelta(days=30))

        def refused(reason: str, identity: Identity, after_ms: int = 0,
                    data: bytes | None = None) -> str:
            with pytest.raises(EnrolmentError) as exc:
                renew(identity, after_ms, data)
            assert exc.value.reason == reason
            return str(exc.value)

        # the enrolment just issued one: renewals at least an hour apart
        assert "try again after" in refused("too_soon", a, after_ms=3600_000)
        request = renewal.new_request(a)
        issued = renew(a, data=request.data)
        assert issued.new
        again = renew(a, after_ms=3600_000, data=request.data)  # a lost answer: the same
        assert (again.serial, again.new) == (issued.serial, False)
        refused("too_soon", a, after_ms=3600_000)  # a new request within the hour
        # the answer was lost twice: the certificate in between is revoked (superseded)
        third = renew(a)
        rows = {r["serial"]: r for r in central_ca.certificates(db, a.gateway_id)}
        assert rows[issued.serial]["revoke_reason"] == "superseded"
        assert {s for s, r in rows.items() if r["revoked_at"] is None} == {first, third.serial}
        assert report(db, a.gateway_id)["tls_fingerprint"] == third.fingerprint

        # the current TLS key did not sign: a copy of the identity key alone renews nothing
        forged = json.loads(renewal.new_request(a).data)
        other = enrolled(tmp_path, platform, "gw-bbbb-0002", dt.timedelta(days=30))
        forged_tls = json.loads(renewal.new_request(other).data)["tls_sig"]
        forged["tls_sig"] = forged_tls
        del forged["sig"]
        forged["sig"] = b64u(a.key.sign(canonical(forged)))
        refused("bad_tls_signature", a, data=canonical(forged))
        # another identity key for this id
        impostor = gateway_identity(tmp_path / "x", "gw-aaaa-0001")
        (impostor.directory / "tls.crt").write_bytes((a.directory / "tls.crt").read_bytes())
        (impostor.directory / "tls.key").write_bytes((a.directory / "tls.key").read_bytes())
        assert "not by the key the registry holds" in refused("registry", impostor)
        # unknown, decommissioned, revoked
        stranger = gateway_identity(tmp_path / "y", "gw-cccc-0003")
        (stranger.directory / "tls.crt").write_bytes((a.directory / "tls.crt").read_bytes())
        (stranger.directory / "tls.key").write_bytes((a.directory / "tls.key").read_bytes())
        refused("not_enrolled", stranger)
        central_ca.revoke(db, gateway_id=a.gateway_id, reason="key_compromise")
        assert "revoked (key_compromise)" in refused("revoked", a)
        Ingest(db).decommission(other.gateway_id)
        refused("decommissioned", other)
        assert len(central_ca.certificates(db, a.gateway_id)) == 3  # nothing more issued


class PowerCut(Exception):  # noqa: N818 (what it stands for)
    pass


def test_a_power_cut_at_any_step_of_the_installation_leaves_a_matching_pair(
        tmp_path: Path, platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    identity = enrolled(tmp_path, platform, "gw-aaaa-0001", dt.timedelta(days=30))
    old = serial_of(identity)
    pending = renewal.new_request(identity)
    with open_db(platform.db_url) as db:
        answer = central_ca.renew_request(db, platform.ca, pending.data,
                                          command_keys=platform.command_keys,
                                          renew_only_after_ms=0).answer
    checked, _ = renewal.check(identity, pending, answer, central_ca.now_ms())
    new = format(checked.certificate.serial_number, "x")
    real_write, real_replace = identity_mod.atomic_write, durable.replace
    outcomes = []
    for cut in range(12):  # every durable step of the installation, then none
        copy = tmp_path / f"cut-{cut}" / identity.gateway_id
        shutil.copytree(identity.directory, copy)
        steps = [0]

        def step(real: Callable[..., None], *args: Any, limit: int = cut,
                 done: list[int] = steps) -> None:
            if done[0] == limit:
                raise PowerCut
            done[0] += 1
            real(*args)

        target = load_identity(copy, repair=False)
        with monkeypatch.context() as cutting:
            cutting.setattr(identity_mod, "atomic_write", lambda *a, s=step: s(real_write, *a))
            cutting.setattr(durable, "replace", lambda *a, s=step: s(real_replace, *a))
            with contextlib.suppress(PowerCut):
                renewal.install(target, pending, checked, central_ca.now_ms())
        target.close()
        recovered = load_identity(copy)  # the next start completes or rolls back
        recovered.close()
        cert, _key = renewal.current_certificate(recovered)  # raises when they do not match
        outcomes.append(format(cert.serial_number, "x"))
        assert not (copy / "install.json").exists()
        assert (copy / "tls.key").stat().st_mode & 0o077 == 0
    assert set(outcomes) == {old, new}
    assert (outcomes[0], outcomes[-1]) == (old, new)
    flips = [a != b for a, b in itertools.pairwise(outcomes)]
    assert flips.count(True) == 1  # old until the intent, new from it on


# --- the enrolment's command keyring (the fix) -------------------------------------------------

def test_an_enrolment_answer_never_rolls_back_the_command_keys_nor_changes_their_root(
        tmp_path: Path, platform: Platform, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    root = platform.directory / "command-root"
    issued = central_command_keys.issue(root, "*", 365, platform.directory / "k2")
    older = platform.directory / "export-older"  # revocation list 1
    central_command_keys.revoke(root, str(issued["kid"]), "retired")
    central_command_keys.export(root, older)
    first = json.loads((platform.command_keys / "command-keys.json").read_text())
    central_command_keys.revoke(root, first["certificates"][0]["kid"], "compromised")
    newest = platform.directory / "export-newest"
    central_command_keys.export(root, newest)  # list 2
    identity = gateway_identity(tmp_path, "gw-aaaa-0001")

    def answer(keys: Path) -> bytes:
        data = enrol.make(identity, claim=None, mode="offline").data
        with open_db(platform.db_url) as db:
            return central_ca.sign_request(db, platform.ca, data, require_claim=False,
                                           command_keys=keys).answer

    done = enrol.complete(identity, answer(newest), OPERATOR, mode="offline")
    assert done["command_keys"][0].startswith("command root ")
    held = (identity.directory / "command-keys.json").read_bytes()
    ring, _ = command_keys.load_keyring(identity.directory) or pytest.fail("no keyring")
    assert ring.revocations_number == 2
    completed = [e for e in entries(identity) if e.action == "enrol.completed"]
    assert completed[-1].details["command_keys"] == done["command_keys"]  # in the record

    with pytest.raises(enrol.EnrolFailed) as rollback:
        enrol.complete(identity, answer(older), OPERATOR, mode="offline")
    assert rollback.value.reason == "command_keys"
    assert "rollback" in str(rollback.value)
    assert "nothing was installed" in str(rollback.value)
    other_root = tmp_path / "other-root"
    central_command_keys.init_root(other_root)
    central_command_keys.export(other_root, tmp_path / "other-export")
    tls_before = (identity.directory / "tls.crt").read_bytes()
    with pytest.raises(enrol.EnrolFailed) as rooted:
        enrol.complete(identity, answer(tmp_path / "other-export"), OPERATOR, mode="offline")
    assert "wrong_root" in str(rooted.value)
    assert (identity.directory / "command-keys.json").read_bytes() == held  # untouched
    assert (identity.directory / "tls.crt").read_bytes() == tls_before
    failed = [e.details["reason"] for e in entries(identity) if e.action == "enrol.failed"]
    assert failed == ["command_keys", "command_keys"]
    # and from the command line: one clear line, exit 1
    usb = tmp_path / "usb"
    assert gateway.main(["provision", "enrol", "--operator", "Ann", "--identity-dir",
                         str(identity.directory), "--request-out", str(usb)]) == 0
    assert ingest_cli.main(["ca", "sign", str(usb), "--ca-dir", str(platform.ca_dir), "--db",
                            platform.db_url, "--command-keys", str(older)]) == 0
    capsys.readouterr()
    assert gateway.main(["provision", "enrol", "--operator", "Ann", "--identity-dir",
                         str(identity.directory), "--answer", str(usb)]) == 1
    assert "FAILED (command_keys)" in capsys.readouterr().err


# --- renewal end to end -------------------------------------------------------------------------

def test_a_short_lived_certificate_renews_itself_and_records_keep_flowing(
        tmp_path: Path, platform: Platform, broker: tuple[Mosquitto, Pki],  # noqa: F811
        services: ServiceFactory) -> None:
    mq, pki = broker
    services(validity=dt.timedelta(hours=1), renew_only_after_ms=0)
    identity = enrolled(tmp_path, platform, "gw-aaaa-0001", dt.timedelta(seconds=150))
    old = serial_of(identity)
    ingest = IngestPlatform(client_config(mq, pki, PLATFORM_CN), identity, platform.db_url,
                            client_id=PLATFORM_CN).start()
    # a certificate of 5 min 150 s (backdated 5 min) is renewed over its last half at once
    gw = run_gateway(tmp_path / "site", identity, uplink_files(identity, mq.port),
                     RenewalPolicy(life_share=0.5, **FAST), health_interval_s=0.05)
    try:
        wait_for(lambda: serial_of(identity) != old, 20, "the renewed certificate installed")
        wait_for(lambda: gw.forwarder.stats.connects >= 2, 20,
                 "the uplink reconnecting with it")
        acked_at_reconnect = gw.forwarder.stats.records_acked
        wait_for(lambda: gw.forwarder.stats.records_acked > acked_at_reconnect + 10, 10,
                 "records flowing over the new connection")
        drained = gw.stop(drain_s=5)
        assert drained  # everything committed reached the broker
        wait_for(lambda: len(arrived(platform.db_url, identity.gateway_id)) ==
                 gw.writer.last_seq, 10, "every record at the platform")
    finally:
        gw.stop(drain_s=0)
        ingest.stop()
    records = arrived(platform.db_url, identity.gateway_id)
    assert [r["seq"] for r in records] == list(range(1, gw.writer.last_seq + 1))  # none lost
    with open_db(platform.db_url) as db:
        rep = report(db, identity.gateway_id)
    assert rep["gaps_unexplained"] == []
    assert rep["conflicts"] == []
    [requested] = kinds(records, "cert.renewal_requested")
    [renewed] = kinds(records, "cert.renewed")
    assert requested["body"]["current"] == renewed["body"]["previous"] == old
    assert renewed["body"]["serial"] == serial_of(identity)
    assert renewed["body"]["request_id"] == requested["body"]["request_id"]
    assert renewed["body"]["command_keys"] == []  # the same material: nothing changed
    assert kinds(records, "cert.renewal_failed") == kinds(records, "cert.expiring") == []
    assert rep["tls_fingerprint"] == renewed["body"]["fingerprint"]
    assert (identity.directory / "tls.key").stat().st_mode & 0o077 == 0
    new = x509.load_pem_x509_certificate((identity.directory / "tls.crt").read_bytes())
    assert new.not_valid_after_utc - new.not_valid_before_utc > dt.timedelta(minutes=60)
    assert not (identity.directory / "install.json").exists()


def test_a_refused_renewal_is_recorded_and_warns_at_30_then_7_days_once_each(
        tmp_path: Path, platform: Platform, broker: tuple[Mosquitto, Pki],  # noqa: F811
        services: ServiceFactory) -> None:
    mq, pki = broker
    services(renew_only_after_ms=24 * 3600_000)  # the enrolment just issued: too soon
    # 30 days and 2 s: renewal (from 30 days) and the 30-day warning come in 2 s
    identity = enrolled(tmp_path, platform, "gw-aaaa-0001",
                        dt.timedelta(days=30, seconds=2))
    ingest = IngestPlatform(client_config(mq, pki, PLATFORM_CN), identity, platform.db_url,
                            client_id=PLATFORM_CN).start()
    policy = RenewalPolicy(before_days=30, life_share=1, **FAST)

    def started(name: str) -> Gateway:
        return run_gateway(tmp_path / name, identity, uplink_files(identity, mq.port), policy)

    def seen(kind: str) -> list[dict[str, Any]]:
        return kinds(arrived(platform.db_url, identity.gateway_id), kind)

    try:
        gw = started("site")
        wait_for(lambda: (renewal.read_state(gw.data_dir) or {}).get("state") == "idle", 5,
                 "the schedule saying: not due yet")
        assert gw.renewal is not None
        assert gw.renewal.stats.attempts == 0
        wait_for(lambda: len(seen("cert.renewal_failed")) >= 3, 20,
                 "three refused attempts")
        gw.stop(drain_s=5)
        wait_for(lambda: len(seen("cert.expiring")) == 1, 10, "the 30-day warning")
        [warning] = seen("cert.expiring")
        assert (warning["prio"], warning["body"]["threshold_days"]) == ("status", 30)
        assert warning["body"]["renewal"] == "failing"
        assert warning["body"]["last_failure"] == "too_soon"
        failed = seen("cert.renewal_failed")
        assert {f["body"]["reason"] for f in failed} == {"too_soon"}
        assert [f["body"]["attempt"] for f in failed[:3]] == [1, 2, 3]
        assert seen("cert.expiring_soon") == []

        # 7 days and 2 s left on a certificate installed by hand (an enrolment again)
        with open_db(platform.db_url) as db:
            data = enrol.make(identity, claim=None, mode="offline").data
            answer = central_ca.sign_request(db, platform.ca, data, require_claim=False,
                                             command_keys=platform.command_keys,
                                             validity=dt.timedelta(days=7, seconds=2)).answer
        enrol.complete(identity, answer, OPERATOR, mode="offline")
        gw = started("site")  # the same store: its ledger remembers what was warned
        wait_for(lambda: len(seen("cert.expiring_soon")) == 1, 20, "the 7-day alarm")
        gw.stop(drain_s=5)
        gw = started("site")  # a restart warns of nothing again
        before = len(seen("cert.renewal_failed"))
        wait_for(lambda: len(seen("cert.renewal_failed")) >= before + 2, 20,
                 "two more refused attempts after the restart")
        gw.stop(drain_s=5)
        wait_for(lambda: len(seen("cert.renewal_failed")) >= before + 2 and
                 len(seen("cert.expiring")) == 2, 10, "the records at the platform")
    finally:
        ingest.stop()
    expiring, soon = seen("cert.expiring"), seen("cert.expiring_soon")
    assert [w["body"]["threshold_days"] for w in expiring] == [30, 30]  # one per certificate
    assert expiring[0]["body"]["serial"] != expiring[1]["body"]["serial"]
    assert [(w["prio"], w["body"]["threshold_days"]) for w in soon] == [("alarm", 7)]
    gw_ledger = [k for k, _ in gw.writer.ledger_items(renewal.WARNED_PREFIX, 10)]
    assert len(gw_ledger) == 2


def test_an_untrusted_clock_defers_renewal_until_the_time_is_trusted(tmp_path: Path,
                                                                     platform: Platform,  # noqa: F811
                                                                     ) -> None:
    identity = enrolled(tmp_path, platform, "gw-aaaa-0001", dt.timedelta(days=1))
    trusted = threading.Event()
    policy = RenewalPolicy(life_share=1, retry_min_s=0.3, retry_max_s=0.6, timeout_s=0.5)
    gw = run_gateway(tmp_path / "site", identity, uplink_files(identity, free_port()),
                     policy, synced=trusted.is_set)  # due: renewal from 30 days
    task = gw.renewal
    assert task is not None
    try:
        wait_for(lambda: (renewal.read_state(gw.data_dir) or {}).get("state") == "waiting",
                 10, "the task waiting for trusted time")
        ticks = task.stats
        assert (ticks.attempts, ticks.warnings) == (0, 0)
        trusted.set()  # NTP answers: the renewal goes on (here: no broker to reach)
        wait_for(lambda: task.stats.warnings == 2, 10,
                 "an attempt failed, then both warnings (a day left)")
    finally:
        gw.stop(drain_s=0.1)
    state = renewal.read_state(gw.data_dir) or {}
    assert (state.get("state"), state.get("reason")) == ("failed", "not_connected")


# --- provision renew ----------------------------------------------------------------------------

def test_provision_renew_asks_the_running_gateway_or_renews_by_itself(
        tmp_path: Path, platform: Platform, broker: tuple[Mosquitto, Pki],  # noqa: F811
        services: ServiceFactory, capsys: pytest.CaptureFixture[str]) -> None:
    mq, _pki = broker
    services(renew_only_after_ms=0)
    identity = enrolled(tmp_path, platform, "gw-aaaa-0001", dt.timedelta(days=90))
    d = identity.directory
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nidentity_dir = "{d}"\ndata_dir = "{tmp_path / "data"}"\n'
                   f'[broker]\nhost = "127.0.0.1"\nport = {mq.port}\nca_file = "{d}/ca.crt"\n'
                   f'cert_file = "{d}/tls.crt"\nkey_file = "{d}/tls.key"\n')
    tech = ("--operator", "Tom Technician")

    # no daemon: the command connects itself, and writes each step down
    first = serial_of(identity)
    assert gateway.main(["provision", "renew", "--config", str(cfg), *tech, "--json"]) == 0
    out, err = capsys.readouterr()
    done = json.loads(out)
    assert (done["status"], done["via"], done["previous"]) == ("renewed", "direct", first)
    assert done["serial"] == serial_of(identity) != first
    assert "the gateway is not running" in err
    assert "answer received" in err
    steps = [(e.action, e.details.get("mode")) for e in entries(identity)][-2:]
    assert steps == [("enrol.requested", "renew"), ("enrol.completed", "renew")]
    assert [e for e in entries(identity) if e.action == "enrol.completed"][-1].operator[
        "name"] == "Tom Technician"

    # a daemon runs (it holds the data directory's lock): it is asked, and does it
    held = lock_data_dir(tmp_path / "data")
    config = load_config(cfg)
    gw = Gateway(config, load_identity(d), clock=Clock(synced=lambda: True))
    gw.start()
    try:
        wait_for(lambda: gw.forwarder.stats.connected, 10, "the uplink connected")
        second = serial_of(identity)
        assert gateway.main(["provision", "renew", "--config", str(cfg), *tech]) == 0
        out, err = capsys.readouterr()
        assert "asked it to renew now" in err
        assert out.startswith("renewed by the running gateway: certificate ")
        assert serial_of(identity) != second
        assert gw.renewal is not None
        assert gw.renewal.stats.renewed == 1
    finally:
        gw.stop(drain_s=1)
        os.close(held)

    # what it refuses, and how it says so
    bad = tmp_path / "plain.toml"
    bad.write_text(f'[gateway]\nidentity_dir = "{d}"\ndata_dir = "{tmp_path / "data"}"\n'
                   '[broker]\nhost = "127.0.0.1"\ntls = false\ninsecure_plaintext = true\n')
    assert gateway.main(["provision", "renew", "--config", str(bad), *tech]) == 2
    assert "does not use TLS" in capsys.readouterr().err
    assert gateway.main(["provision", "renew", "--config", str(cfg)]) == 2
    assert "--operator" in capsys.readouterr().err
    with open_db(platform.db_url) as db:
        central_ca.revoke(db, gateway_id=identity.gateway_id, reason="key_compromise")
    assert gateway.main(["provision", "renew", "--config", str(cfg), *tech, "--json"]) == 1
    failed = json.loads(capsys.readouterr().out)
    assert (failed["status"], failed["reason"]) == ("failed", "revoked")
