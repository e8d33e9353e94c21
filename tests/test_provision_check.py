"""``provision check`` on a whole installation: an identity made by ``provision init
--no-tpm``, certificates from the lab's CA, a real mosquitto (mTLS, the production ACL),
the real daemon (``gateway.py run``) with simulated devices on ptys. A good installation
passes; each broken item fails with its own line."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import gateway
from app import check
from app.state import STATE_FILE, daemon_alive, read_state, write_state
from core.clock import BUILD_FLOOR_MS
from core.topics import PLATFORM_CN, broker_acl
from lab.mosquitto import Mosquitto, Pki, records_sink
from lab.simulators.gnss import fix_sentences
from lab.simulators.kiosk import KioskSim
from lab.simulators.pty import PtySim
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import pair_kiosk, pair_tags
from provisioning.identity import load_identity
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
#: Where the simulated GNSS receiver is, and the installed position given to the gateway.
HOME = (46.81, -71.21)


class EarlyGnss(PtySim):
    """A GNSS receiver (NMEA on a pty) whose time runs from an hour after the software's
    build date. This machine's kernel clock may not be NTP-synchronised; then the daemon's
    trusted time comes from GNSS, and a GNSS time more than a day past the build date is
    used only after 10 steady minutes (core/clock.py): a true time would keep the clock
    untrusted for the length of the test."""

    def __init__(self, link: Path) -> None:
        super().__init__("gnss", link)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            when = dt.datetime.fromtimestamp(BUILD_FLOOR_MS / 1000 + 3600
                                             + time.monotonic() - self._t0, dt.UTC)
            with contextlib.suppress(OSError):  # nobody reads yet
                os.write(self.pty.master, fix_sentences(when, *HOME))


@dataclass
class Install:
    """An installation in a directory: identity, TLS files, configuration."""

    root: Path
    gateway_id: str
    broker_port: int
    devices: list[tuple[str, str, str]] = field(default_factory=list)
    gnss: str | None = None
    tls: Path = field(init=False)

    def __post_init__(self) -> None:
        self.tls = self.root / "tls"

    @property
    def config(self) -> Path:
        return self.root / "gateway.toml"

    @property
    def identity_dir(self) -> Path:
        return self.root / "identity"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    def write(self) -> Path:
        lines = [f'[gateway]\nidentity_dir = "{self.identity_dir}"\n'
                 f'data_dir = "{self.root / "data"}"\n',
                 f'[broker]\nhost = "127.0.0.1"\nport = {self.broker_port}\n'
                 f'ca_file = "{self.tls / "ca.crt"}"\ncert_file = "{self.tls / "gw.crt"}"\n'
                 f'key_file = "{self.tls / "gw.key"}"\n',
                 f'[paths]\nruntime_dir = "{self.runtime_dir}"\n']
        for name, kind, path in self.devices:
            lines.append(f'[[devices]]\nname = "{name}"\nkind = "{kind}"\npath = "{path}"\n')
        if self.gnss is not None:
            lines.append(f'[gnss]\npath = "{self.gnss}"\ninstalled_lat = {HOME[0]}\n'
                         f'installed_lon = {HOME[1]}\nfix_interval_s = 1\n')
        self.config.write_text("\n".join(lines))
        return self.config


def install(root: Path, pki: Pki, gateway_id: str, broker_port: int,
            capsys: pytest.CaptureFixture[str]) -> Install:
    """What an installer does: ``provision init --no-tpm``, the certificate the platform's
    CA issued for the gateway id (the lab's CA here), the configuration."""
    root.mkdir(parents=True, exist_ok=True)
    assert gateway.main(["provision", "init", "--identity-dir", str(root / "identity"),
                         "--gateway-id", gateway_id, "--no-tpm", "--json"]) == 0
    capsys.readouterr()
    inst = Install(root, gateway_id, broker_port)
    inst.tls.mkdir()
    issued = pki.client(gateway_id)
    shutil.copy(pki.ca_file, inst.tls / "ca.crt")
    shutil.copy(issued.cert, inst.tls / "gw.crt")
    shutil.copy(issued.key, inst.tls / "gw.key")
    (inst.tls / "gw.key").chmod(0o600)
    inst.write()
    return inst


def run_check(inst: Install, capsys: pytest.CaptureFixture[str],
              *extra: str) -> tuple[int, dict[str, dict[str, Any]], dict[str, Any]]:
    """``provision check --json``: its exit code, its items by name, the whole object."""
    capsys.readouterr()
    code = gateway.main(["provision", "check", "--config", str(inst.config), "--json",
                         "--timeout", "5", "--skip-hardening", *extra])
    report = json.loads(capsys.readouterr().out)
    return code, {i["name"]: i for i in report["items"]}, report


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    runtime_dir: Path
    log: Path

    def state(self) -> dict[str, Any]:
        found = read_state(self.runtime_dir)
        return found if found is not None and daemon_alive(found) else {}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def start_daemon(inst: Install, daemons: list[Daemon]) -> Daemon:
    log = inst.root / "daemon.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "gateway.py"), "run", "--config",
                                 str(inst.config)], stdout=subprocess.DEVNULL, stderr=err,
                                cwd=REPO)
    daemon = Daemon(proc, inst.runtime_dir, log)
    daemons.append(daemon)
    wait_for(lambda: bool(daemon.state()) or proc.poll() is not None, 30,
             "the daemon's state file")
    assert proc.poll() is None, log.read_text()
    return daemon


def fails(items: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: item["detail"] for name, item in items.items() if item["ok"] == "fail"}


# -- a good installation, then a tag that is not heard ------------------------------------------
@pytest.fixture
def subscribed(mosquitto: Mosquitto, pki: Pki) -> Iterator[None]:
    """The platform's side subscribed to the records (else the broker keeps nothing and
    the gateway delivers nothing: PUBACK 0x10)."""
    with records_sink(mosquitto, pki):
        yield


def test_a_good_installation_passes_and_a_silent_tag_fails_with_its_line(
    tmp_path: Path, pki: Pki, mosquitto: Mosquitto, *, daemons: list[Daemon],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, subscribed: None,
) -> None:
    inst = install(tmp_path / "site", pki, "gw-check-good", mosquitto.port, capsys)
    tags = [SimTag(0x2001, bytes([1]) * 16), SimTag(0x2002, bytes([2]) * 16)]
    receiver = TagReceiverSim("TR-CHECK-0001", tags=tags, link=tmp_path / "tty-tags",
                              firmware=(2, 1, 0)).start()
    kiosk_key = bytes([7]) * 16
    kiosk = KioskSim("KI-CHECK-0001", key=kiosk_key, link=tmp_path / "tty-kiosk").start()
    gnss = EarlyGnss(tmp_path / "tty-gnss").start()
    try:
        identity = load_identity(inst.identity_dir)
        pair_tags(identity, tags)
        pair_kiosk(identity, "KI-CHECK-0001", kiosk_key)
        identity.close()
        inst.devices = [("tags", "tag_receiver", str(tmp_path / "tty-tags")),
                        ("kiosk", "kiosk", str(tmp_path / "tty-kiosk"))]
        inst.gnss = str(tmp_path / "tty-gnss")
        inst.write()
        daemon = start_daemon(inst, daemons)
        receiver.send_beacon(tags[0], rssi=-58)

        def ready() -> bool:
            state = daemon.state()
            heard = {t["tag"]: t["last_beacon_ms"] for t in state.get("tags", [])}
            return (state.get("clock", {}).get("trusted") is True
                    and state.get("gnss", {}).get("fix") is True
                    and state.get("uplink", {}).get("last_ack_ms") is not None
                    and heard.get(tags[0].tag) is not None
                    and all(d["handshake"] == "ok" for d in state.get("devices", [])
                            if d["role"] != "gnss"))
        wait_for(ready, 90, "the daemon to hear its devices, take GNSS time and deliver")

        # a paired tag whose tag sends nothing: its own line fails, and only it
        monkeypatch.setattr(check, "TAG_HEARD_WITHIN_S", 1)
        wait_for(lambda: (daemon.state().get("written_at_ms", 0)
                          - daemon.state().get("started_at_ms", 0)) > 1500, 10, "uptime")
        receiver.send_beacon(tags[0], rssi=-58)  # the other tag is heard, just now
        wait_for(lambda: any(t["beacons"] >= 2 for t in daemon.state().get("tags", [])), 10,
                 "the second beacon in the state")
        code, items, report = run_check(inst, capsys)
        assert code == 1
        assert list(fails(items)) == [f"tag {tags[1].tag}"], fails(items)
        assert fails(items)[f"tag {tags[1].tag}"].startswith(
            "not heard since the gateway started (started ")
        assert "provision range-test --tag" in items[f"tag {tags[1].tag}"]["fix"]
        assert items[f"tag {tags[0].tag}"]["ok"] == "pass"

        # its tag speaks: the installation is good
        monkeypatch.setattr(check, "TAG_HEARD_WITHIN_S", 60)
        receiver.send_beacon(tags[1], rssi=-61)
        wait_for(lambda: all(t["last_beacon_ms"] for t in daemon.state().get("tags", [])),
                 10, "both tags heard")
        code, items, report = run_check(inst, capsys)
        assert code == 0, fails(items)
        assert report["ok"] is True
        assert report["failed"] == 0
        names = list(items)
        assert names[:5] == ["config", "identity", "file modes", "command keys", "certificate"]
        assert names.index("broker DNS") < names.index("broker TCP") < \
            names.index("broker TLS") < names.index("broker MQTT") < \
            names.index("broker publish") < names.index("clock") < names.index("disk") < \
            names.index("daemon")
        for name in ("config", "file modes", "certificate", "broker DNS", "broker TCP",
                     "broker TLS", "broker MQTT", "broker publish", "clock", "device tags",
                     "device kiosk", "kiosk KI-CHECK-0001", f"tag {tags[0].tag}",
                     f"tag {tags[1].tag}", "GNSS", "disk", "daemon"):
            assert items[name]["ok"] == "pass", items[name]
        # what was found, in words: the handshake's serial and firmware, the TLS peer,
        # the distance from the installed position (never the coordinates)
        assert items["device tags"]["detail"].startswith("TR-CHECK-0001 firmware 2.1.0")
        assert "firmware" in items["kiosk KI-CHECK-0001"]["detail"]
        assert "with the broker broker" in items["broker TLS"]["detail"]
        assert "the running gateway is connected" in items["broker MQTT"]["detail"]
        assert items["clock"]["detail"].startswith("synchronised (source ")
        assert "0 m from the installed position" in items["GNSS"]["detail"]
        text = json.dumps(report)
        assert "46.81" not in text
        assert "-71.21" not in text
        # the identity is a file (no TPM) and no command keys came: warnings, not failures
        assert items["identity"]["ok"] == "warn"
        assert items["command keys"]["ok"] == "warn"

        # the text form: one line per item, plain ASCII off a terminal, exit 0
        assert gateway.main(["provision", "check", "--config", str(inst.config),
                             "--skip-hardening"]) == 0
        out = capsys.readouterr().out
        assert out.isascii()
        assert "PASS broker publish" in out.replace("  ", " ")
        assert out.rstrip().endswith("the installation is ready")
    finally:
        for sim in (receiver, kiosk, gnss):
            sim.stop()


# -- broken items, the daemon stopped ------------------------------------------------------------
@pytest.fixture
def stopped(tmp_path: Path, pki: Pki, mosquitto: Mosquitto,
            capsys: pytest.CaptureFixture[str]) -> Install:
    """A good installation whose daemon is not started: the broker steps are this
    command's own (CONNECT and the test publish)."""
    return install(tmp_path / "site", pki, "gw-check-stop", mosquitto.port, capsys)


def test_before_the_start_the_broker_steps_pass_and_the_daemon_is_what_is_missing(
    stopped: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    code, items, _ = run_check(stopped, capsys)
    for name in ("broker DNS", "broker TCP", "broker TLS", "broker MQTT", "broker publish"):
        assert items[name]["ok"] == "pass", items[name]
    assert items["broker MQTT"]["detail"] == "CONNECT accepted as gw-check-stop (MQTT v5)"
    assert "smartcorr/v1/gw/gw-check-stop/check acknowledged" in \
        items["broker publish"]["detail"]
    assert code == 1
    assert items["daemon"] == {"name": "daemon", "ok": "fail",
                               "detail": "not running: nothing is recorded",
                               "fix": check.START_HINT}
    # --before-start: the daemon's absence is a warning (the clock may still fail: it is
    # this machine's kernel clock then, and no GNSS is configured)
    code, items, _ = run_check(stopped, capsys, "--before-start")
    assert items["daemon"]["ok"] == "warn"
    assert set(fails(items)) <= {"clock"}
    assert code == (1 if fails(items) else 0)


def test_a_missing_port_fails_with_its_line(
    stopped: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    stopped.devices = [("tags", "tag_receiver", "/dev/serial/by-id/usb-SmartCorr_TagRx_0")]
    stopped.write()
    code, items, _ = run_check(stopped, capsys, "--skip-broker", "--before-start")
    assert code == 1
    item = items["device tags"]
    assert item["ok"] == "fail"
    assert item["detail"] == ("tag_receiver port /dev/serial/by-id/usb-SmartCorr_TagRx_0 is "
                              "missing")
    assert "ls -l /dev/serial/by-id/" in item["fix"]
    assert set(fails(items)) <= {"device tags", "clock"}


@pytest.mark.parametrize("name", ["signing.key", "tls"])
def test_a_wrong_file_mode_fails_with_its_line(
    stopped: Install, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = stopped.tls / "gw.key" if name == "tls" else stopped.identity_dir / name
    path.chmod(0o644)
    code, items, _ = run_check(stopped, capsys, "--skip-broker", "--before-start")
    assert code == 1
    assert items["file modes"]["ok"] == "fail"
    assert items["file modes"]["detail"] == (f"{path} is mode 0644 (readable by group or "
                                             "others)")
    assert items["file modes"]["fix"].startswith("chmod 600")
    assert set(fails(items)) <= {"file modes", "clock"}


def test_an_unreachable_broker_fails_at_its_step_and_stops_there(
    stopped: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    from lab.mosquitto import free_port

    stopped.broker_port = free_port()  # nothing listens there
    stopped.write()
    code, items, _ = run_check(stopped, capsys, "--before-start")
    assert code == 1
    assert items["broker DNS"]["ok"] == "pass"
    assert items["broker TCP"]["ok"] == "fail"
    assert items["broker TCP"]["detail"] == (f"nothing accepts connections at "
                                             f"127.0.0.1:{stopped.broker_port} (connection "
                                             "refused)")
    assert "the broker runs" in items["broker TCP"]["fix"]
    assert not {"broker TLS", "broker MQTT", "broker publish"} & set(items)
    assert set(fails(items)) <= {"broker TCP", "clock"}


def test_an_acl_refusing_the_gateway_fails_the_test_publish(
    stopped: Install, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    # the province's broker runs an ACL without the gateways' check topic (reloaded)
    acl_file = _acl_file(mosquitto)
    acl_file.write_text("\n".join(line for line in broker_acl(PLATFORM_CN).splitlines()
                                  if not line.endswith("/check")) + "\n")
    mosquitto.process.send_signal(signal.SIGHUP)
    wait_for(lambda: any("Reloading config" in line for line in mosquitto.log), 10,
             "mosquitto to reload its ACL")
    code, items, _ = run_check(stopped, capsys, "--before-start")
    assert code == 1
    assert items["broker MQTT"]["ok"] == "pass"
    item = items["broker publish"]
    assert item["ok"] == "fail"
    assert item["detail"].startswith("the broker refused the test publish on "
                                     "smartcorr/v1/gw/gw-check-stop/check: Not authorized "
                                     "(PUBACK 0x87)")
    assert "docs/broker.md" in item["fix"]


def _acl_file(broker: Mosquitto) -> Path:
    conf = next(Path(arg) for arg in broker.process.args if str(arg).endswith(".conf"))
    line = next(t for t in conf.read_text().splitlines() if t.startswith("acl_file "))
    return Path(line.split(" ", 1)[1])


# -- the clock, from the daemon's state ------------------------------------------------------------
def test_an_unsynchronised_clock_fails_with_its_line(
    stopped: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state written per the contract of app/state.py by a live process (this one): the
    daemon's clock is not trusted."""
    stopped.runtime_dir.mkdir()
    now = int(time.time() * 1000)
    state = {"version": "test", "pid": os.getpid(), "gateway_id": stopped.gateway_id,
             "started_at_ms": now - 600_000, "written_at_ms": now,
             "uplink": {"state": "connected", "reason": None, "since_ms": now - 500_000,
                        "queued": 0, "queued_by_class": {}, "last_ack_ms": now - 1000},
             "clock": {"source": "none", "trusted": False, "offset_ms": 0},
             "devices": [], "tags": [], "gnss": {"fix": False}, "disk": {},
             "last_alarms": []}
    write_state(stopped.runtime_dir, state)
    assert (stopped.runtime_dir / STATE_FILE).stat().st_mode & 0o777 == 0o600
    code, items, _ = run_check(stopped, capsys, "--skip-broker")
    assert code == 1
    assert items["clock"]["ok"] == "fail"
    assert items["clock"]["detail"] == ("not synchronised: the gateway stamps its records "
                                        "'unsynced' (source none, +0 ms from the system "
                                        "clock)")
    assert "timedatectl timesync-status" in items["clock"]["fix"]
    assert items["daemon"]["ok"] == "pass"
    assert set(fails(items)) == {"clock"}
    # the same clock trusted: the line passes
    write_state(stopped.runtime_dir, state | {
        "written_at_ms": int(time.time() * 1000),
        "clock": {"source": "ntp", "trusted": True, "offset_ms": 3}})
    _, items, _ = run_check(stopped, capsys, "--skip-broker")
    assert items["clock"] == {"name": "clock", "ok": "pass", "fix": None,
                              "detail": "synchronised (source ntp, +3 ms from the system "
                                        "clock)"}


def test_a_configuration_that_does_not_load_is_the_one_failed_item(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[gateway]\nidentity_dir = 3\n")
    assert gateway.main(["provision", "check", "--config", str(cfg), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in report["items"]] == ["config"]
    assert "identity_dir" in report["items"][0]["detail"]
    # no file at all: a usage error (exit 2), one line saying what to give
    assert gateway.main(["provision", "check", "--config", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_daemon_holding_the_data_dir_is_never_taken_for_stopped(
    stopped: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway that holds its data directory but writes no state (an older version, or a
    runtime_dir of its own): the check does not CONNECT with the gateway's certificate
    (the broker would hand it the daemon's session) and says what it found."""
    from app.daemon import lock_data_dir

    (stopped.root / "data").mkdir(mode=0o700)
    held = lock_data_dir(stopped.root / "data")  # this process stands for the daemon
    try:
        code, items, _ = run_check(stopped, capsys)
    finally:
        os.close(held)
    assert code == 1
    assert items["broker TLS"]["ok"] == "pass"
    assert items["broker MQTT"]["ok"] == "warn"
    assert items["broker MQTT"]["detail"].startswith(f"not tried: the daemon (pid {os.getpid()}) "
                                                     "holds the gateway's session")
    assert "broker publish" not in items
    assert items["daemon"]["ok"] == "fail"
    assert f"(pid {os.getpid()}) holds" in items["daemon"]["detail"]


def test_the_hardening_findings_are_lines_of_the_check(
    stopped: Install, tmp_path: Path
) -> None:
    """app/hardening.py's findings, each a line under its own name after the daemon's; a
    root without the production layout fails them (here an empty tree)."""
    from app.hardening import hardening_findings

    root = tmp_path / "root"
    root.mkdir()
    items = check.check_installation(stopped.config, check.CheckOptions(
        skip_broker=True, before_start=True, root=root))
    names = [i.name for i in items]
    expected = [f.name for f in hardening_findings(root)]
    assert names[-len(expected):] == expected
    assert names.index("daemon") < names.index(expected[0])
    service = next(i for i in items if i.name == "service-user")
    assert service.ok is check.Outcome.FAIL
    assert check.exit_code(items) == 1
    skipped = check.check_installation(stopped.config, check.CheckOptions(
        skip_broker=True, before_start=True, skip_hardening=True))
    assert [(i.name, i.ok) for i in skipped][-1] == ("hardening", check.Outcome.WARN)


def test_the_text_form_marks_each_line_and_says_what_to_do(
    stopped: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    (stopped.identity_dir / "signing.key").chmod(0o640)
    assert gateway.main(["provision", "check", "--config", str(stopped.config),
                         "--skip-broker", "--skip-hardening"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    modes = next(i for i, line in enumerate(lines) if line.startswith("FAIL file modes"))
    assert lines[modes + 1].strip().startswith("-> chmod 600")
    assert lines[0].startswith("PASS config")
    assert "None" not in out
    assert "['" not in out
    assert lines[-1].startswith(f"{out.count(chr(10) + 'FAIL')} failed")
    text = check.render([check.Item("daemon", check.Outcome.FAIL, "not running", "start it")],
                        unicode=True)
    assert text.splitlines()[:2] == ["✘ daemon  not running", "          → start it"]


def test_a_paired_tag_without_authorisation_is_a_warning_when_one_is_required(
    stopped: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    """[supervision] require_authorisation (the default): a paired tag the platform never
    authorised records nothing of its presence; the check says so, per tag (a warning:
    the installer pairs before the platform authorises)."""
    import datetime as dt

    from app.supervision import STATE_FILE
    from core.supervision import BODY_PARSERS, Authorisation, Supervision
    from provisioning.identity import load_identity as load
    from provisioning.registry import open_registry as registry_of

    authorised, never = "T00000A01", "T00000A02"
    identity = load(stopped.identity_dir)
    reg = registry_of(identity)
    try:
        reg.pair(authorised)
        reg.pair(never)
    finally:
        reg.close()
        identity.close()
    stopped.devices = [("tags", "tag_receiver", str(stopped.root / "no-receiver"))]
    stopped.write()
    # the daemon's saved supervision state: one of the two authorised
    today = dt.datetime.now(dt.UTC).date()
    body = BODY_PARSERS["set-authorisation"]({
        "tag": authorised, "basis": "prohibition_order", "document": "D-1",
        "approver": "head", "start": (today - dt.timedelta(days=1)).isoformat(),
        "end": (today + dt.timedelta(days=30)).isoformat(), "zone": "UTC"})
    assert isinstance(body, Authorisation)
    sup = Supervision()
    sup.set_authorisation(body, time.time_ns() // 1_000_000)
    data = stopped.root / "data"
    data.mkdir(exist_ok=True)
    (data / STATE_FILE).write_text(json.dumps({"format": 1, "gen": 1, "cseq": 1,
                                               "state": sup.to_json()}))
    _, items, _ = run_check(stopped, capsys, "--skip-broker", "--before-start")
    assert f"tag {authorised} authorisation" not in items
    item = items[f"tag {never} authorisation"]
    assert item["ok"] == "warn"
    assert "no authorisation in force" in item["detail"]
    assert f"set-authorisation --tag {never}" in item["fix"]
    # a bench that records tags on their pairing alone: no such item
    stopped.config.write_text(stopped.config.read_text()
                              + "\n[supervision]\nrequire_authorisation = false\n")
    _, items, _ = run_check(stopped, capsys, "--skip-broker", "--before-start")
    assert not [name for name in items if name.endswith(" authorisation")]
