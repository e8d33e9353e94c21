"""``diag ports`` tells the truth: a missing port or one that is not a tty fails; a device
on a pty is asked who it is (serial, firmware) unless the running gateway holds its port,
whose state is reported instead; /dev/serial/by-id is listed with the roles it suggests."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import diag
from app.config import load_config
from app.ports import MAX_BY_ID_ENTRIES, MAX_PROBE_BYTES, READ_CHUNK, list_by_id, probe_framed
from app.state import write_state
from tests.helpers import plaintext_config

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO.parent / "shared" / "data" / "nmea"


def diag_ports(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command itself, in its own process."""
    return subprocess.run([sys.executable, str(REPO / "gateway.py"), "diag", "ports",
                           "--config", str(cfg), "--timeout", "2", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def report(cfg: Path, *, probe: bool = True, by_id: Path | None = None) -> dict[str, Any]:
    """What the command prints with --json, made in this process (quicker)."""
    out = diag.ports_report(load_config(cfg), probe=probe, timeout_s=2.0,
                            **({"by_id_dir": by_id} if by_id is not None else {}))
    found: dict[str, Any] = json.loads(json.dumps(out))  # as the command prints it
    return found


def config(tmp_path: Path, devices: dict[str, tuple[str, str]], gnss: str | None = None) -> Path:
    """A configuration with *devices* (name: (kind, path)), maybe GNSS, and its own
    runtime directory (tmp_path/run, tests/helpers.py)."""
    extra = ""
    for name, (kind, path) in devices.items():
        extra += f'[[devices]]\nname = "{name}"\nkind = "{kind}"\npath = "{path}"\n'
    if gnss is not None:
        extra += f'[gnss]\npath = "{gnss}"\ninstalled_lat = 44.0689\ninstalled_lon = -121.3142\n'
    (tmp_path / "run").mkdir(exist_ok=True)
    return plaintext_config(tmp_path, tmp_path / "identity", extra=extra)


class Sim:
    """``python -m lab.simulators ARGS --pty --json``: its pty and its last status."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lab.simulators", *args, "--pty", "--json",
             "--status-every", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 20)
        assert ready, "the simulator printed no path"
        self.path = self.process.stdout.readline().strip()

    def stop(self) -> dict[str, object]:
        """Stop it (SIGTERM); its final status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=10)
        return dict(json.loads(out.splitlines()[-1]))


@pytest.fixture
def sims() -> Iterator[list[Sim]]:
    started: list[Sim] = []
    yield started
    for sim in started:
        if sim.process.poll() is None:
            sim.process.kill()
            sim.process.communicate(timeout=10)


def test_a_missing_port_fails_with_its_line(tmp_path: Path) -> None:
    missing = "/dev/serial/by-id/usb-SmartCorr_TagRx_0099-if00"
    cfg = config(tmp_path, {"tags": ("tag_receiver", missing)})
    human = diag_ports(cfg)
    assert human.returncode == 1
    assert f"tags (tag receiver): {missing}" in human.stdout
    assert "MISSING: not present: check the cable and `ls -l /dev/serial/by-id/`" in human.stdout
    assert "None" not in human.stdout
    assert "1 port problem(s)" in human.stderr
    found = json.loads(diag_ports(cfg, "--json").stdout)
    assert found["tags"]["exists"] is False
    assert found["ok"] is False
    assert found["problems"][0].startswith("tags: missing")


def test_dev_null_is_not_a_tty(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"kiosk": ("kiosk", "/dev/null")})
    done = diag_ports(cfg)
    assert done.returncode == 1
    assert "NOT A TTY" in done.stdout
    found = report(cfg)
    assert found["kiosk"]["exists"] is True
    assert found["kiosk"]["tty"] is False
    assert found["problems"] == [
        "kiosk: not a tty: a character device but no serial port (e.g. /dev/null): give the "
        "serial port's path"]


def test_devices_on_ptys_are_asked_who_they_are(tmp_path: Path, sims: list[Sim]) -> None:
    tags = Sim("tag", "--serial", "TR-PROBE-3", "--firmware", "1.4.2")
    sims.append(tags)
    gnss = Sim("gnss", "--replay", str(CAPTURES / "ublox-8.log"), "--interval", "0.2",
               "--loop")
    sims.append(gnss)
    cfg = config(tmp_path, {"tags": ("tag_receiver", tags.path)}, gnss=gnss.path)
    done = diag_ports(cfg, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(done.stdout)
    entry = found["tags"]
    assert (entry["source"], entry["handshake"]) == ("probe", "ok")
    assert (entry["serial"], entry["firmware"], entry["protocol"]) == ("TR-PROBE-3", "1.4.2", 2)
    assert entry["tty"] is True
    assert entry["held_by_gateway"] is False
    assert entry["frames"] >= 1
    assert found["gnss"]["handshake"] == "n/a"
    assert found["gnss"]["nmea"]["sentences"] > 0
    assert found["ok"] is True
    assert found["daemon"]["running"] is False
    human = diag.render_ports(report(cfg))
    assert "probe handshake: ok, serial TR-PROBE-3, firmware 1.4.2, protocol 2" in human
    # the receiver's position is never shown, in any form
    for text in ("44.06", "4404.1", "121.31", "12118.8", "440689"):
        assert text not in done.stdout
        assert text not in human
    assert tags.stop()["handshakes"] == 2  # the probes', and no event was acknowledged


def test_a_device_of_another_class_is_refused_as_the_daemon_would(
        tmp_path: Path, sims: list[Sim]) -> None:
    kiosk = Sim("kiosk", "--serial", "KI-WRONG-PORT")
    sims.append(kiosk)
    cfg = config(tmp_path, {"tags": ("tag_receiver", kiosk.path)})
    found = report(cfg)
    assert found["ok"] is False
    human = diag.render_ports(found)
    assert "handshake failed: refused (wrong class: a kiosk on a port configured for a " \
           "tag_receiver)" in human
    assert "serial KI-WRONG-PORT" in human


def test_a_port_the_running_gateway_holds_is_reported_from_its_state(
        tmp_path: Path, sims: list[Sim]) -> None:
    tags = Sim("tag")
    sims.append(tags)
    cfg = config(tmp_path, {"tags": ("tag_receiver", tags.path)})
    now_ms = time.time_ns() // 1_000_000
    write_state(tmp_path / "run", {
        "version": "0.1.0", "pid": os.getpid(), "gateway_id": "gw-ports-0001",
        "started_at_ms": now_ms - 60_000, "written_at_ms": now_ms,
        "devices": [{"name": "tags", "role": "tag_receiver", "port": tags.path,
                     "by_id": None, "held": True, "handshake": "ok", "serial": "TR-IN-STATE",
                     "firmware": "3.0.1", "frames": 1234, "errors": 2,
                     "last_heard_ms": now_ms - 1000}],
    })
    found = report(cfg)
    entry = found["tags"]
    assert entry["held_by_gateway"] is True
    assert (entry["source"], entry["serial"], entry["firmware"]) == \
        ("daemon", "TR-IN-STATE", "3.0.1")
    assert (entry["frames"], entry["errors"]) == (1234, 2)
    assert found["daemon"]["running"] is True
    assert found["daemon"]["pid"] == os.getpid()
    assert found["ok"] is True, found["problems"]
    human = diag.render_ports(found)
    assert "gateway: running (pid" in human
    assert "held by the gateway" in human
    assert "1234 frames, 2 errors" in human
    assert tags.stop()["handshakes"] == 0  # never opened: the gateway holds it


def test_a_stale_state_is_a_gateway_not_running(tmp_path: Path, sims: list[Sim]) -> None:
    tags = Sim("tag", "--serial", "TR-AFTER-CRASH")
    sims.append(tags)
    cfg = config(tmp_path, {"tags": ("tag_receiver", tags.path)})
    write_state(tmp_path / "run", {"pid": os.getpid(), "written_at_ms": 1, "devices": [
        {"name": "tags", "port": tags.path, "held": True, "handshake": "ok"}]})
    found = report(cfg)
    assert found["daemon"]["running"] is False
    assert "stale" in found["daemon"]["note"]
    assert (found["tags"]["source"], found["tags"]["serial"]) == ("probe", "TR-AFTER-CRASH")


def test_a_port_locked_by_another_program_is_not_probed(tmp_path: Path,
                                                       sims: list[Sim]) -> None:
    tags = Sim("tag")
    sims.append(tags)
    cfg = config(tmp_path, {"tags": ("tag_receiver", tags.path)})
    fd = os.open(tags.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the daemon's pyserial does
        done = diag_ports(cfg, "--json")
    finally:
        os.close(fd)
    assert done.returncode == 1
    found = json.loads(done.stdout)
    assert found["tags"]["source"] is None
    assert found["problems"][0].startswith("tags: held by another process")
    assert f"pid {os.getpid()}" in found["problems"][0]
    assert tags.stop()["handshakes"] == 0


def test_by_id_is_listed_with_roles_and_what_is_configured(tmp_path: Path,
                                                          sims: list[Sim]) -> None:
    tags = Sim("tag")
    sims.append(tags)
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    tag_link = by_id / "usb-SmartCorr_TagRx_0042-if00"
    tag_link.symlink_to(tags.path)
    # an adapter nothing uses (not /dev/null: the daemons of tests running beside this one
    # hold it as their stdin, and a port a daemon holds is listed so)
    (by_id / "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0").symlink_to("/dev/zero")
    (by_id / "usb-u-blox_AG_-_www.u-blox.com_u-blox_GNSS_receiver-if00").symlink_to(
        tmp_path / "unplugged")
    cfg = config(tmp_path, {"tags": ("tag_receiver", str(tag_link))})
    found = report(cfg, probe=False, by_id=by_id)
    assert found["ok"] is True, found["problems"]
    listed = {e["name"]: e for e in found["by_id"]}
    assert listed["usb-SmartCorr_TagRx_0042-if00"]["role_guess"] == "tag_receiver"
    assert listed["usb-SmartCorr_TagRx_0042-if00"]["configured_as"] == ["tags"]
    assert listed["usb-SmartCorr_TagRx_0042-if00"]["device"] == tags.path
    assert listed["usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"]["role_guess"] is None
    gnss = listed["usb-u-blox_AG_-_www.u-blox.com_u-blox_GNSS_receiver-if00"]
    assert (gnss["role_guess"], gnss["device"]) == ("gnss", None)
    assert found["tags"]["by_id"] == "usb-SmartCorr_TagRx_0042-if00"
    assert found["tags"]["source"] is None
    human = diag.render_ports(found)
    assert f"usb-SmartCorr_TagRx_0042-if00 -> {tags.path}  (looks like a tag receiver; " \
           "configured as tags)" in human
    assert "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0 -> /dev/zero  (role unknown; not " \
           "configured)" in human
    assert tags.stop()["handshakes"] == 0  # --no-probe


def test_a_flooding_port_is_read_at_most_a_bounded_amount(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    stop = threading.Event()

    def flood() -> None:  # garbage, as fast as the pty takes it
        chunk = bytes(range(1, 256)) * 64
        while not stop.is_set():
            with contextlib.suppress(BlockingIOError):
                os.write(master, chunk)

    os.set_blocking(master, False)
    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    try:
        start = time.monotonic()
        probe = probe_framed(os.ttyname(slave), 115200, None, timeout_s=30)
        took = time.monotonic() - start
    finally:
        stop.set()
        writer.join(5)
        os.close(master)
        os.close(slave)
    assert probe.handshake.startswith("failed: no answer")
    assert MAX_PROBE_BYTES <= probe.bytes < MAX_PROBE_BYTES + READ_CHUNK
    assert took < 10  # the bound, not the timeout, ended it
    assert "bytes but no valid frame" in (probe.hint or "")


def test_by_id_lists_a_bounded_number_of_links(tmp_path: Path) -> None:
    for n in range(MAX_BY_ID_ENTRIES + 6):
        (tmp_path / f"usb-adapter-{n:03d}-if00").symlink_to("/dev/null")
    listed = list_by_id(tmp_path)
    assert listed is not None
    assert len(listed) == MAX_BY_ID_ENTRIES
    assert listed[0].name == "usb-adapter-000-if00"
    assert list_by_id(tmp_path / "absent") is None  # no USB serial device plugged in
