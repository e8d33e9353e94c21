"""``gateway.py status``: the daemon's state file (app/state.py) written by a real daemon
process with simulated devices on pseudo-terminals, read by the command once, as JSON, and
live in a real terminal (tmux); what it says when no daemon runs; the uplink said as the
issue asks ("uplink down since 14:02 (TLS: unknown CA), 1,234 queued") in systemd's
STATUS=, the state and the health record; what publishing costs and its bounds."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app import state as st
from app.assembly import Gateway
from app.config import Config, ConfigError, load_config
from app.status_view import HEIGHT, WIDTH, not_running, render
from core.kinds import Priority
from core.mqtt import BrokerConfig
from core.record import SealedRecord
from lab.mosquitto import Mosquitto, Pki, free_port, make_pki
from lab.simulators.gnss import GnssSim
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import pair_tags
from provisioning.identity import Identity, create_identity
from provisioning.pki import issue, write_pem
from tests.conftest import REPO
from tests.helpers import plaintext_config, wait_for

TIME = r"\d\d:\d\d"


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "gateway.py"), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_json(stdout: str) -> dict[str, Any]:
    """stdout is exactly one JSON object and nothing else."""
    value = json.loads(stdout)
    assert isinstance(value, dict), stdout
    return value


# -- the file ------------------------------------------------------------------------------
def test_the_state_file_is_atomic_private_and_read_back(tmp_path: Path) -> None:
    assert st.read_state(tmp_path) is None  # no daemon: no file
    os.umask(0o022)
    st.write_state(tmp_path, {"pid": 1, "a": [1, 2]})
    st.write_state(tmp_path, {"pid": os.getpid(), "written_at_ms": st.wall_ms()})
    path = tmp_path / st.STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [st.STATE_FILE]  # no temporary left
    state = st.read_state(tmp_path)
    assert state is not None
    assert st.daemon_alive(state)
    assert st.remove_state(tmp_path, pid=os.getpid() + 1) is False  # not that daemon's
    assert st.remove_state(tmp_path) is True
    assert not path.exists()


def test_a_damaged_or_foreign_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / st.STATE_FILE).write_text("{not json")
    with pytest.raises(st.StateError, match=r"is not valid JSON .*not the gateway's state"):
        st.read_state(tmp_path)
    (tmp_path / st.STATE_FILE).write_text("[1, 2]")
    with pytest.raises(st.StateError, match="does not hold a JSON object"):
        st.read_state(tmp_path)
    (tmp_path / st.STATE_FILE).write_bytes(b" " * (st.MAX_STATE_BYTES + 1))
    with pytest.raises(st.StateError, match="larger than"):
        st.read_state(tmp_path)
    result = cli("status", "--runtime-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"status: {tmp_path / st.STATE_FILE} is larger than")


def test_status_usage_errors_are_one_clear_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import gateway

    for argv, said in (
        (["--watch"], "--watch needs a terminal (it redraws the screen): without one, run "
                      "'status' or 'status --json'"),
        (["--watch", "--json"], "--watch is a live view for people and --json one JSON "
                                "object, once: give one of them"),
        (["--interval", "0"], "--interval 0: give 0.2 to 60 seconds"),
    ):
        assert gateway.main(["status", "--runtime-dir", str(tmp_path), *argv]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(f"status: {said}"), err


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_not_running_says_why_and_since_when(tmp_path: Path) -> None:
    now = st.wall_ms()
    assert not_running(None, tmp_path, now).message == (  # type: ignore[union-attr]
        f"the daemon is not running (no state in {tmp_path}; systemctl status "
        "smartcorr-gateway)")
    fresh = {"pid": os.getpid(), "written_at_ms": now - 1000}
    assert not_running(fresh, tmp_path, now) is None
    gone = not_running({"pid": _dead_pid(), "written_at_ms": now - 1000}, tmp_path, now)
    assert gone is not None
    assert gone.reason == "stale"
    assert re.search(rf"its last state in {tmp_path} was written at {TIME}:\d\d \(1 s ago\), "
                     r"by process \d+, which is gone", gone.message), gone.message
    old = now - st.STALE_AFTER_MS - 60_000
    wedged = not_running({"pid": os.getpid(), "written_at_ms": old}, tmp_path, now)
    assert wedged is not None
    assert wedged.reason == "wedged"
    assert f"(process {os.getpid()}) has not written its state" in wedged.message
    assert "(1 min 5 s ago); it should every second: it may be wedged" in wedged.message
    assert not st.daemon_alive({"pid": os.getpid()})  # an older daemon's state: no time


# -- what is in it -------------------------------------------------------------------------
def test_the_uplink_in_the_issues_words() -> None:
    clock = [1_000_000]
    tracker = st.UplinkTracker(now_ms=lambda: clock[0])
    down = tracker.update("retrying: broker_untrusted")
    assert (down.state, down.code, down.reason) == ("retrying", "broker_untrusted",
                                                    "TLS: unknown CA")
    assert st.uplink_words(down, 1234) == \
        f"down since {st.clock_time(1_000_000)} (TLS: unknown CA), 1,234 queued"
    clock[0] += 60_000
    again = tracker.update("refused: cn_mismatch expired")  # still down: since unchanged
    assert again.since_ms == 1_000_000
    assert again.reason == "certificate: for another gateway, certificate: expired"
    for code, words in (("dns", "DNS"), ("tcp_refused", "refused"), ("timeout", "timeout"),
                        ("broker_cert_time", "TLS: expired"),
                        ("broker_name", "TLS: name mismatch"),
                        ("not_authorized", "authentication refused"),
                        ("publish_refused", "ACL refusal")):
        assert tracker.update(f"retrying: {code}").reason == words
    up = tracker.update("connected")
    assert (up.since_ms, st.uplink_words(up, 5)) == (clock[0], "connected")


def _alarm(seq: int, kind: str = "tag.tamper") -> SealedRecord:
    data = json.dumps({"seq": seq, "kind": kind, "t": 1_700_000_000_000 + seq}).encode()
    return SealedRecord(seq, Priority.ALARM, kind, data, b"")


def test_the_last_alarms_are_bounded_newest_first_without_their_body() -> None:
    log = st.AlarmLog()
    log.committed([_alarm(1, "key.session")])  # the chain's, not an alarm
    log.committed([_alarm(seq) for seq in range(2, 40)]
                  + [SealedRecord(40, Priority.POSITION, "gnss.fix", b"{}", b"")])
    entries = log.entries()
    assert [e["seq"] for e in entries] == list(range(39, 29, -1))  # MAX_ALARMS, newest first
    assert entries[0] == {"seq": 39, "kind": "tag.tamper", "t_ms": 1_700_000_000_039}


def _big_state() -> dict[str, Any]:
    now = st.wall_ms()
    return {
        "version": "0.1.0", "pid": 4242, "gateway_id": "gw-qc-0042", "started_at_ms": now,
        "written_at_ms": now, "phase": "running",
        "uplink": {"state": "retrying", "reason": "TLS: unknown CA", "since_ms": now,
                   "queued": 1234, "queued_by_class": {"alarm": 3, "checkin": 0, "status": 12,
                                                       "position": 1200, "heartbeat": 19},
                   "last_ack_ms": now - 90_000},
        "clock": {"source": "gnss", "trusted": True, "offset_ms": 1250},
        "devices": [{"role": "tag_receiver",
                     "port": "/dev/serial/by-id/usb-SmartCorr_TagRx_0001-if00-port0",
                     "by_id": "usb-SmartCorr_TagRx_0001-if00-port0",
                     "held": True, "handshake": "ok", "serial": "TR-0001",
                     "firmware": "1.2.3", "frames": 123_456, "errors": 2,
                     "last_heard_ms": now}] * 3,
        "tags": [{"tag": f"T{i:08X}", "present": i % 2 == 0, "last_beacon_ms": now,
                  "rssi_dbm": -70, "beacons": 99_999, "counter": 5} for i in range(40)],
        "tags_total": 70,
        "gnss": {"configured": True, "fix": True, "sats": 9, "hdop": 0.9,
                 "distance_from_installed_m": 3, "last_fix_ms": now},
        "disk": {"store_bytes": 12_300_000, "quota_bytes": 512_000_000,
                 "free_bytes": 3_100_000_000},
        "last_alarms": [{"seq": 1000 + i, "kind": "gateway.moved", "t_ms": now}
                        for i in range(10)],
    }


def test_the_view_fits_80x24_and_says_what_it_left_out() -> None:
    lines = render(_big_state())
    assert len(lines) == HEIGHT
    assert max(len(line) for line in lines) <= WIDTH
    text = "\n".join(lines)
    assert re.search(rf"^Uplink   DOWN since {TIME} \(TLS: unknown CA\), 1,234 queued, last "
                     r"ack 1m ago$", text, re.M), text
    assert "Queue    alarm 3  checkin 0  status 12  position 1,200  heartbeat 19" in text
    assert "Clock    GNSS, +1,250 ms" in text
    assert sum(line.startswith("tag_receiver ...TagRx_0001 ok        TR-0001       1.2.3  "
                               "123,456    2 0s ago") for line in lines) == 3
    assert re.search(r"^\.\.\. \d+ more \(status --json lists them\)$", text, re.M)
    assert "[20/70 present, 20 absent]" in text
    small = render(_big_state(), width=60, height=12)
    assert len(small) == 12
    assert max(len(line) for line in small) <= 60
    # an older daemon's state (missing keys) is shown with what there is
    assert render({"pid": 1, "written_at_ms": st.wall_ms()})[1] == "Uplink   unknown"


def test_runtime_dir_is_checked(tmp_path: Path) -> None:
    base = plaintext_config(tmp_path, tmp_path / "identity").read_text()
    plain = tmp_path / "plain.toml"
    plain.write_text(re.sub(r"\[paths\]\nruntime_dir = .*\n", "", base))
    # the default: /run/smartcorr, moved by SMARTCORR_RUNTIME_DIR (this session's own)
    assert load_config(plain).runtime_dir == st.DEFAULT_RUNTIME_DIR
    assert Path(os.environ.get(st.RUNTIME_DIR_ENV) or "/run/smartcorr") == st.DEFAULT_RUNTIME_DIR
    assert Config(tmp_path, BrokerConfig("h", 1, tls=False)).runtime_dir is None  # in code
    (tmp_path / "a-file").write_text("")
    for value, error in (("run", "is relative: give an absolute directory on tmpfs"),
                         (str(tmp_path / "data" / "run"), "is inside data_dir"),
                         (str(tmp_path / "a-file"), "is not a directory"),
                         ("", "is empty")):
        bad = tmp_path / "bad.toml"
        bad.write_text(base.replace(f'runtime_dir = "{tmp_path / "run"}"',
                                    f'runtime_dir = "{value}"'))
        with pytest.raises(ConfigError, match=rf"\[paths\] runtime_dir: .*{error}"):
            load_config(bad)


# -- the publisher in a gateway ------------------------------------------------------------
def test_publishing_is_cheap_bounded_and_never_stops_the_gateway(
    tmp_path: Path, identity: Identity, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import app.snapshot

    monkeypatch.setattr(st, "WRITE_INTERVAL_S", 0.05)
    monkeypatch.setattr(app.snapshot, "MAX_TAGS", 5)
    pair_tags(identity, [SimTag(0x2000 + i, bytes(16)) for i in range(8)])
    broker = BrokerConfig("127.0.0.1", free_port(), tls=False)
    gateway = Gateway(Config(tmp_path / "data", broker, identity_dir=identity.directory,
                             runtime_dir=tmp_path / "run"), identity)
    gateway.start()
    try:
        assert gateway.publisher is not None
        wait_for(lambda: gateway.publisher.stats.writes >= 10, 10,  # type: ignore[union-attr]
                 "10 states written")
        state = st.read_state(tmp_path / "run")
        assert state is not None
        assert [t["tag"] for t in state["tags"]] == [f"T0000200{i}" for i in range(5)]
        assert state["tags_total"] == 8
        stats = gateway.publisher.stats
        mean_us = stats.total_us / stats.writes
        print(f"state: {stats.writes} writes, mean {mean_us:.0f} us, max {stats.max_us} us, "
              f"{len(json.dumps(state))} bytes")
        assert mean_us < 20_000  # a snapshot and a tmpfs write: well under 1 % of a second
    finally:
        gateway.stop(drain_s=0)
    assert st.read_state(tmp_path / "run") is None  # a clean stop leaves nothing behind

    # a runtime directory that cannot be made: said once, and the writing goes on trying
    caplog.set_level(logging.INFO)
    (tmp_path / "file").write_text("")
    publisher = st.StatePublisher(tmp_path / "file" / "run", lambda: {"pid": os.getpid()})
    publisher.start()
    try:
        wait_for(lambda: publisher.stats.failures >= 3, 10, "three failed writes")
        assert publisher.is_alive()
    finally:
        publisher.stop()
    said = [r for r in caplog.records if "cannot write the state" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == logging.WARNING
    assert "[paths] runtime_dir" in said[0].getMessage()


# paho leaks the socket of a failed TLS handshake; it is collected within the test
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning")
def test_tls_unknown_ca_in_status_health_and_state(
    tmp_path: Path, pki: Pki, mosquitto: Mosquitto, identity: Identity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's example: "uplink down since 14:02 (TLS: unknown CA), 1,234 queued"."""
    rogue = make_pki(tmp_path / "rogue")
    files = pki.client(identity.gateway_id)
    broker = BrokerConfig("127.0.0.1", mosquitto.port, str(rogue.ca_file), str(files.cert),
                          str(files.key))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.settimeout(15)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        gateway = Gateway(Config(tmp_path / "data", broker, runtime_dir=tmp_path / "run"),
                          identity)
        gateway.start()
        try:
            expected = re.compile(rf"STATUS=gateway {identity.gateway_id} running; uplink down "
                                  rf"since {TIME} \(TLS: unknown CA\), \d+ queued")
            seen = [systemd.recv(4096).decode()]
            while not expected.fullmatch(seen[-1]):
                seen.append(systemd.recv(4096).decode())
            wait_for(lambda: (st.read_state(tmp_path / "run") or {}).get("uplink", {}).get(
                "reason") == "TLS: unknown CA", 10, "the reason in the state file")
            health = gateway._health_extra()["uplink"]
            assert isinstance(health, dict)
            assert health["reason"] == "TLS: unknown CA"
            assert isinstance(health["since_ms"], int)
            assert isinstance(health["queued"], int)
        finally:
            gateway.stop(drain_s=0)


# -- a real daemon with simulated devices ----------------------------------------------------
@dataclass
class Site:
    directory: Path
    runtime: Path
    proc: subprocess.Popen[str]
    sim: TagReceiverSim
    tags: list[SimTag]
    err: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Site]:
    """``gateway.py run`` as a process: a tag receiver (3 paired tags, 2 beaconing, one
    tampered), a GNSS receiver near its installed position, and an uplink that refuses to
    connect with a certificate issued for another gateway (so a stop does not wait for a
    broker to come back)."""
    d = tmp_path_factory.mktemp("site")
    identity = create_identity(d / "identity", "gw-status-0001")
    tags = [SimTag(0x1000 + i, secrets.token_bytes(16)) for i in range(3)]
    pair_tags(identity, tags)
    identity.close()
    sim = TagReceiverSim("TR-STAT-0001", tags=tags, link=d / "tty-tags")
    gnss = GnssSim(link=d / "tty-gnss", period_s=0.2)
    sim.start()
    gnss.start()
    files = write_pem(d / "tls", "gw", *issue(pki.ca, "gw-someone-else"))
    cfg = d / "gateway.toml"
    cfg.write_text(f"""
[gateway]
identity_dir = "{d / 'identity'}"
data_dir = "{d / 'data'}"
[paths]
runtime_dir = "{d / 'run'}"
[broker]
host = "127.0.0.1"
port = {free_port()}
ca_file = "{pki.ca_file}"
cert_file = "{files.cert}"
key_file = "{files.key}"
[[devices]]
name = "tags"
kind = "tag_receiver"
path = "{sim.path}"
[gnss]
path = "{gnss.path}"
installed_lat = 46.8101
installed_lon = -71.2101
""")
    err = d / "daemon.err"
    with err.open("w") as errf:
        proc = subprocess.Popen([sys.executable, str(REPO / "gateway.py"), "run", "--config",
                                 str(cfg)], stdout=subprocess.DEVNULL, stderr=errf, text=True)
    site = Site(d, d / "run", proc, sim, tags, err)
    try:
        wait_for(lambda: _state(site).get("devices") and
                 _state(site)["devices"][0]["handshake"] == "ok", 30, "the tag receiver up")
        tags[1].strap_closed = False  # a tamper alarm
        for _ in range(3):
            sim.send_beacon(tags[0], rssi=-61)
            sim.send_beacon(tags[1], rssi=-75)
        wait_for(lambda: [t["beacons"] for t in _state(site)["tags"]] == [3, 3, 0], 15,
                 "the beacons counted")
        wait_for(lambda: _state(site)["gnss"]["fix"] and _state(site)["last_alarms"], 15,
                 "a fix and the tamper alarm")
        yield site
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        sim.stop()
        gnss.stop()


def _state(site: Site) -> dict[str, Any]:
    return st.read_state(site.runtime) or {}


def test_status_of_a_running_daemon(site: Site) -> None:
    result = cli("status", "--runtime-dir", str(site.runtime), "--json")
    assert result.returncode == 0, result.stderr
    state = one_json(result.stdout)
    assert state["running"] is True
    assert state["pid"] == site.proc.pid
    assert state["uplink"]["state"] == "refused"
    assert state["uplink"]["reason"] == "certificate: for another gateway"
    assert state["uplink"]["code"] == "cn_mismatch"
    assert state["uplink"]["queued"] == sum(state["uplink"]["queued_by_class"].values()) > 0
    device = state["devices"][0]
    assert {k: device[k] for k in ("role", "held", "handshake", "serial", "firmware")} == {
        "role": "tag_receiver", "held": True, "handshake": "ok", "serial": "TR-STAT-0001",
        "firmware": "1.0.0"}
    assert device["frames"] > 0
    assert device["errors"] == 0
    assert state["devices"][1]["role"] == "gnss"
    assert [(t["tag"], t["present"], t["rssi_dbm"]) for t in state["tags"]] == [
        ("T00001000", True, -61), ("T00001001", True, -75), ("T00001002", None, None)]
    assert state["gnss"]["sats"] == 9
    assert 5 < state["gnss"]["distance_from_installed_m"] < 30  # never the coordinates
    assert not any(k in json.dumps(state) for k in ("lat", "lon"))
    assert [a["kind"] for a in state["last_alarms"]] == ["tag.tamper"]
    assert state["clock"]["source"] in ("ntp", "gnss", "none")
    assert state["disk"]["store_bytes"] > 0

    text = cli("status", "--runtime-dir", str(site.runtime))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    assert re.match(rf"Uplink   DOWN since {TIME} \(certificate: for another gateway\), \d+ "
                    "queued", lines[1])
    assert any(re.match(r"tag_receiver tty-tags +ok +TR-STAT-0001 +1\.0\.0 +\d+ +0 \d+s ago",
                        line) for line in lines), text.stdout
    assert any(line.startswith("T00001001     present    -75 dBm") for line in lines)


def _tmux(server: list[str], *args: str) -> str:
    return subprocess.run([*server, *args], capture_output=True, text=True, check=True,
                          timeout=10).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed "
                    "(scripts/setup.sh --test installs it)")
def test_watch_in_a_real_terminal_then_the_daemon_goes(site: Site, tmp_path: Path) -> None:
    server = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null"]
    command = (f"{sys.executable} {REPO / 'gateway.py'} status --watch --interval 0.2 "
               f"--runtime-dir {site.runtime}; echo EXITED $?; sleep 30")
    _tmux(server, "new-session", "-d", "-x", "80", "-y", "24", "-s", "w", command)
    try:
        def screen() -> list[str]:
            return _tmux(server, "capture-pane", "-p", "-t", "w").splitlines()

        def until(what: str, check: Callable[[list[str]], bool], timeout: float = 15) -> None:
            """Wait until the screen passes *check* (a frame may be caught half drawn: the
            next capture sees it whole); on a timeout, fail showing the screen."""
            try:
                wait_for(lambda: check(screen()), timeout, what)
            except AssertionError:
                pytest.fail(f"{what}: not on the screen:\n" + "\n".join(screen()))

        def first_view(lines: list[str]) -> bool:
            return (len(lines) == 24  # it fills the terminal: the footer on the last row
                    and lines[-1] == "every 0.2 s; q quits"
                    and all(len(line) < 80 for line in lines)  # the last column left alone
                    and bool(re.match(r"SmartCorr gateway gw-status-0001  running  pid \d+ "
                                      r".* \d\d:\d\d:\d\d$", lines[0]))
                    and lines[1].startswith("Uplink   DOWN since ")
                    and bool(re.match(r"Queue    alarm \d+  checkin 0  status \d+  position "
                                      r"\d+", lines[2]))
                    and any(re.match(r"tag_receiver tty-tags +ok +TR-STAT-0001", line)
                            for line in lines)
                    and any(line.startswith("T00001000     present    -61 dBm")
                            for line in lines))

        until("the view at 80x24", first_view)

        # live: a beacon counted on the next redraw
        site.sim.send_beacon(site.tags[0], rssi=-50)
        until("the beacon", lambda lines: any(
            line.startswith("T00001000     present    -50 dBm") for line in lines))

        # a resize is followed at once
        _tmux(server, "resize-window", "-t", "w", "-x", "60", "-y", "12")
        until("the view at 60x12", lambda lines: len(lines) == 12
              and lines[-1] == "every 0.2 s; q quits" and all(len(line) < 60 for line in lines)
              and lines[1].startswith("Uplink   DOWN since "))
        _tmux(server, "resize-window", "-t", "w", "-x", "80", "-y", "24")
        until("the view at 80x24 again", lambda lines: len(lines) == 24
              and lines[-1] == "every 0.2 s; q quits")

        # the daemon goes (a clean stop): its state with it, and the view says so, whole
        site.proc.send_signal(signal.SIGTERM)
        assert site.proc.wait(30) == 0
        assert not (site.runtime / st.STATE_FILE).exists()
        until("the daemon gone", lambda lines: lines[0].startswith(
            "the daemon is not running (no state in")
            and "waiting for it to start (q quits)" in lines
            and not any(line.startswith(("Uplink", "every")) for line in lines))
        _tmux(server, "send-keys", "-t", "w", "q")
        until("q to quit", lambda lines: "EXITED 0" in lines)
    finally:
        subprocess.run([*server, "kill-server"], capture_output=True, check=False, timeout=10)
    # start and stop: one line each, at INFO, shown at the default verbosity
    err = site.err.read_text()
    assert re.search(rf" INFO +gateway\.lifecycle: gateway gw-status-0001 running \(version "
                     rf"[\d.]+\): ports tags=\S+tty-tags, gnss=\S+tty-gnss; uplink "
                     rf"127\.0\.0\.1:\d+ \(TLS\); store \d+ records queued, [\d.]+ [kMG]?B "
                     rf"of [\d.]+ [kMG]?B quota; state in {site.runtime}\n", err), err
    assert re.search(r" INFO +gateway\.lifecycle: gateway gw-status-0001 stopped after \d+ s: "
                     r"\d+ records sealed, 0 forwarded, \d+ queued \(not all forwarded: they "
                     r"go out at the next start\)\n", err), err
    assert not [line for line in err.splitlines() if " WARNING " in line and "running" in line]

    result = cli("status", "--runtime-dir", str(site.runtime))
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr == (f"status: the daemon is not running (no state in {site.runtime}; "
                             "systemctl status smartcorr-gateway)\n")


def test_a_killed_daemon_is_not_running_and_says_since_when(tmp_path: Path) -> None:
    create_identity(tmp_path / "identity", "gw-status-0002").close()
    cfg = plaintext_config(tmp_path, tmp_path / "identity", port=free_port())
    proc = subprocess.Popen([sys.executable, str(REPO / "gateway.py"), "run", "--config",
                             str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for((tmp_path / "run" / st.STATE_FILE).exists, 30, "the state")
        running = cli("status", "--config", str(cfg), "--json")
        assert running.returncode == 0, running.stderr
        assert one_json(running.stdout)["gateway_id"] == "gw-status-0002"
    finally:
        proc.kill()  # SIGKILL: no clean stop
        proc.wait()
    assert (tmp_path / "run" / st.STATE_FILE).exists()  # left behind
    result = cli("status", "--config", str(cfg), "--json")
    assert result.returncode == 3
    why = one_json(result.stdout)
    assert (why["running"], why["reason"], why["pid"]) == (False, "stale", proc.pid)
    assert re.search(rf"^status: the daemon is not running \(its last state in "
                     rf"{tmp_path / 'run'} was written at {TIME}:\d\d \(\d+ s ago\), by "
                     rf"process {proc.pid}, which is gone", result.stderr), result.stderr


def test_the_uplink_line_says_what_the_linger_holds() -> None:
    state = _big_state()
    state["uplink"] = {"state": "connected", "since_ms": state["written_at_ms"],
                       "queued": 12, "queued_by_class": {"position": 10, "status": 2},
                       "held": 10, "linger_s": 120.0, "target": "mqtt.example:8883",
                       "tls": True, "last_ack_ms": state["written_at_ms"]}
    text = "\n".join(render(state))
    assert "\nQueue    status 2  position 10; 10 held up to 120 s\n" in text, text
    state["uplink"]["held"] = 0  # nothing held: nothing said
    assert "\nQueue    status 2  position 10\n" in "\n".join(render(state))
