"""The simulators run on their own (``python -m lab.simulators NAME``), and every
``python -m`` entry point the documentation names answers --help and refuses bad usage."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import serial

from core.devices import PairedKiosk, PairedTag
from drivers.kiosk import KioskDriver
from drivers.nmea import Fix, NmeaReader
from drivers.tag_receiver import TagReceiverDriver
from firmware_bridge.framed import LedgerOnly
from firmware_bridge.link import DeviceUp, HostLink, Message
from firmware_bridge.messages import DeviceClass, Hello
from lab.simulators import cli
from lab.simulators.tag import HISTORY_KEPT, SimTag

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO.parent / "shared" / "data" / "nmea"
KEY = bytes(range(16))
S = 1_000_000_000


def python_m(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=REPO)


def documented_entry_points() -> list[str]:
    """Every ``python -m MODULE`` of this repository named in README.md, docs/ or a
    module's docstring."""
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "lab").rglob("*.py"))]
    found: set[str] = set()
    for path in texts:
        for module in re.findall(r"python3? -m ([a-z_][\w.]*)", path.read_text()):
            if (REPO / module.split(".")[0]).is_dir():
                found.add(module.rstrip("."))
    return sorted(found)


def test_the_documentation_names_the_simulators_and_the_platform() -> None:
    found = documented_entry_points()
    assert {"lab.simulators", "central"} <= set(found)


def needs_arguments(usage: str) -> bool:
    """Whether a usage text names an argument that is not optional ([...] groups are)."""
    rest = usage.split("\n\n", 1)[0].removeprefix("usage: ")
    words = rest.split(None, 3)  # "python", "-m", the module, the rest
    rest = words[3] if len(words) > 3 else ""
    while re.search(r"\[[^\[\]]*\]", rest):
        rest = re.sub(r"\[[^\[\]]*\]", "", rest)
    return bool(rest.strip())


@pytest.mark.parametrize("module", documented_entry_points())
def test_every_documented_entry_point_helps_and_refuses_bad_usage(module: str) -> None:
    helped = python_m(module, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: python -m {module} "), helped.stdout[:200]
    bad = python_m(module, "--no-such-option")
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert bad.stderr.startswith("usage:")
    if needs_arguments(helped.stdout):  # else a bare run is an action of its own
        bare = python_m(module)
        assert bare.returncode == 2, (bare.stdout, bare.stderr)
        assert bare.stderr.startswith("usage:")
        assert "error:" in bare.stderr


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The simulators' command in this process: its exit status, stdout and stderr."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help (0) and bad options (2)
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("name", ["tag", "kiosk", "gnss"])
def test_each_simulator_has_its_help_and_its_own_module(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, helped, _ = run_cli(capsys, name, "--help")
    assert status == 0
    assert "--pty" in helped
    assert "--port DEV" in helped
    same = python_m(f"lab.simulators.{name}", "--help")
    assert same.returncode == 0
    assert same.stdout == helped


def test_bad_options_are_refused_with_the_reason(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(capsys, "tag", "--pty", "--interval", "-1")
    assert status == 2
    assert "--interval" in err
    status, _, err = run_cli(capsys, "tag", "--pty", "--port", "/dev/ttyUSB9")
    assert status == 2
    assert "not allowed with argument --pty" in err
    status, _, err = run_cli(capsys, "tag", "--port", str(tmp_path / "ttyUSB9"))
    assert status == 2
    assert "cannot open it" in err
    key = tmp_path / "key"
    key.write_text("not hex\n")
    status, _, err = run_cli(capsys, "kiosk", "--pty", "--key-file", str(key))
    assert status == 2
    assert "32 hex digits" in err
    assert "not hex" not in err
    capture = tmp_path / "empty.log"
    capture.write_text("# nothing\n")
    status, _, err = run_cli(capsys, "gnss", "--pty", "--replay", str(capture))
    assert status == 2
    assert "no NMEA sentence" in err


class Served:
    """A simulator in its own process: the path it printed first, its later stdout lines."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "lab.simulators", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=REPO)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 20)
        assert ready, "the simulator printed no path"
        self.path = self.process.stdout.readline().strip()
        self.lines: list[str] = []  # stdout lines read before the stop

    def status_until(self, done: Callable[[dict[str, Any]], bool], timeout: float = 15) -> None:
        """Read its JSON status lines until one satisfies *done* (the device's own count:
        an ACK written by the host is counted once the device has read it)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if not ready:
                continue
            line = self.process.stdout.readline()
            self.lines.append(line.rstrip("\n"))
            if line.startswith("{") and done(json.loads(line)):
                return
        raise AssertionError(f"no status line satisfied the test within {timeout} s")

    def stop(self) -> tuple[int, list[str]]:
        """SIGTERM; its exit status and the stdout lines after the path."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=10)
        return self.process.returncode, self.lines + out.splitlines()


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for sim in started:
        if sim.process.poll() is None:
            sim.process.kill()
            sim.process.communicate(timeout=10)


def host_messages(path: str, expected: DeviceClass, count: int,
                  timeout: float = 15) -> tuple[Hello, list[Message]]:
    """Handshake with the device on *path* as the gateway does and take *count* events,
    each acknowledged once taken (stop-and-wait: the device then sends the next)."""
    port = serial.Serial(path, 115200, timeout=0)
    link = HostLink(lambda _serial: None, expected_class=expected)
    hello: Hello | None = None
    messages: list[Message] = []
    try:
        link.connection_made(time.monotonic())
        port.write(link.data_to_send())
        deadline = time.monotonic() + timeout
        while len(messages) < count and time.monotonic() < deadline:
            readable, _, _ = select.select([port.fileno()], [], [], 0.2)
            if not readable:
                continue
            for event in link.receive_data(port.read(4096), time.monotonic()):
                if isinstance(event, DeviceUp):
                    hello = event.hello
                elif isinstance(event, Message):
                    messages.append(event)
                    link.committed(event.event_id)
            port.write(link.data_to_send())
    finally:
        port.close()
    assert hello is not None, "no handshake"
    return hello, messages


def test_a_tag_receiver_on_a_pty_sends_beacons_the_real_driver_accepts(
        tmp_path: Path, served: list[Served]) -> None:
    key_file = tmp_path / "tag.key"
    key_file.write_text(KEY.hex() + "\n")
    sim = Served("tag", "--pty", "--tag", "T00001000", "--tag", "0x1001", "--key-file",
                 str(key_file), "--interval", "0.1", "--serial", "TR-BENCH-7",
                 "--firmware", "2.3.4", "--json", "--status-every", "0.2")
    served.append(sim)
    assert sim.path.startswith("/dev/pts/")
    hello, messages = host_messages(sim.path, DeviceClass.TAG_RECEIVER, 4)
    assert (hello.serial, hello.firmware_text) == ("TR-BENCH-7", "2.3.4")
    tags = {t: PairedTag(t, KEY, 600, 0) for t in ("T00001000", "T00001001")}
    driver = TagReceiverDriver(tags, lambda _key: None)
    made = [driver.on_message(m, hello, 1 * S) for m in messages]
    # four genuine beacons, each extending its tag's presence interval: no record
    assert all(isinstance(out, LedgerOnly) for out in made)
    assert driver.stats.accepted == 4
    sim.status_until(lambda s: s.get("acked", 0) >= 4)  # the last ACK read by the device
    status, lines = sim.stop()
    assert status == 0
    statuses = [json.loads(line) for line in lines]
    last = statuses[-1]
    assert last["stopped"] is True
    assert last["acked"] >= 4
    assert last["tags"] == ["T00001000", "T00001001"]


def test_a_spoofing_tag_and_a_kiosk_tamper_are_what_they_say(
        tmp_path: Path, served: list[Served]) -> None:
    spoofer = Served("tag", "--pty", "--interval", "0.05", "--spoof-every", "2")
    served.append(spoofer)
    hello, messages = host_messages(spoofer.path, DeviceClass.TAG_RECEIVER, 4)
    driver = TagReceiverDriver({"T00001000": PairedTag("T00001000", bytes(16), 600, 0)},
                               lambda _key: None)
    made = [driver.on_message(m, hello, 1 * S) for m in messages]
    kinds = [r.kind for out in made if not isinstance(out, LedgerOnly) for r in out]
    assert kinds == ["tag.interval", "tag.spoof"] * 2  # each spoof seals the interval first
    assert driver.stats.accepted == 2
    key_file = tmp_path / "kiosk.key"
    key_file.write_text(KEY.hex())
    kiosk = Served("kiosk", "--pty", "--serial", "KI-7", "--key-file", str(key_file),
                   "--checkin-every", "0.1", "--tamper-at", "0")
    served.append(kiosk)
    hello, messages = host_messages(kiosk.path, DeviceClass.KIOSK, 3)
    drv = KioskDriver({"KI-7": PairedKiosk("KI-7", KEY, 0)})
    kinds = [r.kind for m in messages for r in drv.on_message(m, hello, 1 * S)]
    assert "kiosk.tamper" in kinds
    assert kinds.count("checkin") == 2
    assert kiosk.stop()[0] == 0


def test_a_gnss_capture_replayed_on_a_pty_gives_the_readers_fixes(
        served: list[Served]) -> None:
    capture = CAPTURES / "ublox-8.log"
    sim = Served("gnss", "--pty", "--replay", str(capture), "--interval", "0.05")
    served.append(sim)
    reader = NmeaReader()
    fixes: list[Fix] = []
    with serial.Serial(sim.path, 9600, timeout=0) as port:
        deadline = time.monotonic() + 15
        while len(fixes) < 3 and time.monotonic() < deadline:
            readable, _, _ = select.select([port.fileno()], [], [], 0.2)
            if readable:
                fixes += [e for e in reader.feed(port.read(4096), time.monotonic_ns())
                          if isinstance(e, Fix)]
    assert len(fixes) >= 3
    assert reader.stats.checksum_errors == 0
    assert abs(fixes[0].lat_e7 - 440_689_000) < 1_000_000  # Bend, OR: where it was captured
    assert sim.stop()[0] == 0


def test_a_device_nobody_reads_keeps_at_most_its_flash(served: list[Served]) -> None:
    sim = Served("tag", "--pty", "--interval", "0.01", "--max-queued", "5", "--json",
                 "--status-every", "0.1")
    served.append(sim)
    assert sim.process.stdout is not None
    status: dict[str, Any] = {}
    deadline = time.monotonic() + 15
    while not status.get("not_made") and time.monotonic() < deadline:
        status = json.loads(sim.process.stdout.readline())
    assert status["queued"] == 5  # the bound: no new event beyond it ...
    assert status["not_made"] > 0  # ... and each one not made is counted
    assert status["made"] == 5
    assert sim.stop()[0] == 0


def test_a_simulated_tag_remembers_a_bounded_history() -> None:
    tag = SimTag(0x1000, KEY)
    beacons = [tag.beacon() for _ in range(HISTORY_KEPT + 5)]
    assert len(tag.history) == HISTORY_KEPT
    assert tag.history[0] == beacons[5]  # the oldest are forgotten
    assert tag.history[-1] == beacons[-1]


def test_port_serves_a_real_serial_port(served: list[Served]) -> None:
    """--port: the simulator opens a serial port (here a pty's slave side, as a USB-serial
    adapter's /dev/ttyUSB1) and the host talks to it from the other end."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.close(slave)  # the simulator opens it by its path
    try:
        sim = Served("tag", "--port", path, "--serial", "TR-LOOP-1", "--interval", "0.05")
        served.append(sim)
        assert sim.path == path
        link = HostLink(lambda _serial: None, expected_class=DeviceClass.TAG_RECEIVER)
        link.connection_made(time.monotonic())
        os.write(master, link.data_to_send())
        hello = None
        messages: list[Message] = []
        deadline = time.monotonic() + 15
        while len(messages) < 2 and time.monotonic() < deadline:
            readable, _, _ = select.select([master], [], [], 0.2)
            if not readable:
                continue
            for event in link.receive_data(os.read(master, 4096), time.monotonic()):
                if isinstance(event, DeviceUp):
                    hello = event.hello
                elif isinstance(event, Message):
                    messages.append(event)
                    link.committed(event.event_id)
            os.write(master, link.data_to_send())
        assert hello is not None
        assert hello.serial == "TR-LOOP-1"
        assert len(messages) == 2
        assert sim.stop()[0] == 0
    finally:
        os.close(master)
