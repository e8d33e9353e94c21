"""The technician's guide (issue 13), written from a real run of every command it shows.

``python -m lab.technician_guide --out docs/technician-guide.md`` sets up, in a temporary
directory on loopback, a gateway as a technician finds it on site, then runs each
technician command exactly as typed, each in a process of its own, and writes the guide:
for each task (is it recording? is the uplink up? which port is which? is the tag in
range? what do I send to support?) the command, its real standard output and error, its
exit status, and what to do next.

* **The site**: an identity (``provision init --no-tpm``: this machine has no TPM), the
  TLS certificate of the gateway signed by a lab CA (:mod:`provisioning.pki`, in place of
  enrolment), a real mosquitto with TLS and the province's ACL (:mod:`lab.mosquitto`),
  the tag receiver, the kiosk and the GNSS receiver as simulators on pseudo-terminals
  (``python -m lab.simulators … --pty`` processes, under ``/dev/serial/by-id``-like
  names; the GNSS one replays a real receiver's capture from ``../shared/data``, read
  where it lies), a configuration from ``provision config``, the tag and the kiosk
  paired, and the daemon (``gateway.py run``).
* **What a technician meets**: the broker down (mosquitto stopped: the uplink's line,
  ``status`` with the queue growing, ``provision check`` failing), the GNSS receiver
  unplugged (its simulator stopped: ``diag ports`` failing), ``status --watch`` in a real
  terminal (tmux, its screen captured), ``provision range-test``, ``diag bundle`` (its
  files listed; a search for the tag's id in it finds nothing), and the unit leaving the
  home (``provision decommission``).

What needs real hardware (a Raspberry Pi installed from a fresh Pi OS, a walk through a
real home, a real USB adapter, a TPM) is marked so in the guide, with what ran here
instead. Before writing, the guide is searched for the run's keys (in every form), the
installed position and the capture's coordinates, person references, NMEA sentences and
hex dumps (the detectors of :mod:`app.diag`'s bundle redaction): anything found, and
nothing is written (exit 1).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from app.config import load_config
from app.diag import PERSONAL_PATTERNS, Personal
from app.nmea_replay import capture_chunks
from core.clock import kernel_clock_synced
from core.errors import UserError
from drivers.nmea import Fix, NmeaReader
from lab import background
from lab.markdown import Cut, fence, keep_dir_problem, write_private
from lab.mosquitto import (
    Mosquitto,
    Pki,
    make_pki,
    mosquitto_binary,
    records_sink,
    start_mosquitto,
)
from provisioning.identity import atomic_write
from provisioning.pki import issue_custom

REPO = Path(__file__).resolve().parents[1]
#: The GNSS capture the receiver's simulator replays (read where it lies, never copied).
CAPTURE = REPO.parent / "shared" / "data" / "nmea" / "ublox-8.log"
GATEWAY_ID = "gw-qc-0042"
TAG = "T00001000"
TAG_RX_SERIAL, KIOSK_SERIAL = "TR-0042", "KI-0042"
TECHNICIAN = "Tom Technician"
#: The by-id names the simulators are linked under (as udev names the real devices).
BY_ID = {"tags": "usb-SmartCorr_TagRx_0042-if00",
         "kiosk": "usb-SmartCorr_Kiosk_0042-if00",
         "gnss": "usb-u-blox_AG_-_www.u-blox.com_u-blox_GNSS_receiver-if00"}
#: The kiosk simulator's made-up person reference (its default: never on a command line).
KIOSK_PERSON = "P-000001"
#: How often the tag beacons, seconds (a real tag: every few seconds), and its RSSI.
BEACON_INTERVAL_S = 0.5
TAG_RSSI_DBM = -67
#: How long the range test walks, seconds (on site: 300, through every room).
RANGE_TEST_S = 6
#: Bounds on what is awaited (events are awaited, never slept on), seconds.
STEP_TIMEOUT_S = 60.0
WAIT_S = 20.0
#: Output longer than 30 lines is shown as its head and tail, with a visible "…"; lines
#: longer than 320 characters are cut.
CUT = Cut(lines=30, chars=320, head=18, tail=8)
#: What ``$SITE`` stands for in the guide: the run's temporary directory.
SITE_VAR = "$SITE"

#: The tasks, in order: (key, heading, what the section answers).
SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("site", "The gateway as found on site (how this run made it)",
     "What an installer left behind, made here the way the installer made it. On a "
     "unit all of this exists already: skip to the next section."),
    ("recording", "Is it recording?",
     "Three commands answer it: `status` (the running daemon, now), `diag buffer` (what "
     "waits in the store) and `provision check` (the whole installation, one line per "
     "item)."),
    ("uplink", "Is the uplink up?",
     "The `Uplink` line of `status` says it. Readings are sealed and kept in the store "
     "while the uplink is down, and go out, alarms first, once it is back: an uplink down "
     "loses nothing, but the platform sees nothing either. Here the broker is stopped "
     "(on site: the network is down, or the platform's broker), then started again."),
    ("ports", "Which port is which?",
     "`diag ports` lists the serial ports by their stable names (`/dev/serial/by-id`), "
     "which device each one is, whether the daemon holds it, and the device's serial and "
     "firmware. Here the GNSS receiver is unplugged, then plugged in again."),
    ("range", "Is the tag in range?",
     "`status` shows each paired tag (present, its RSSI, its last beacon); `provision "
     "range-test` measures the coverage while you walk the home with the tag."),
    ("support", "What do I send to support?",
     "A support bundle: versions, the daemon and uplink state, certificate dates, the "
     "reports of `diag buffer`, `diag keys` and `diag ports`, and recent logs. It holds no "
     "key and no personal data (unless the support desk asks for it, with "
     "`--include-personal`, which is written down with your name)."),
    ("leaves", "The unit leaves the home",
     "When the unit is taken out (the order ends, the unit is replaced): `provision "
     "decommission` sends the gateway's final record, then destroys its keys."),
)


class GuideError(UserError):
    """A command did not do what the guide says it does (or the guide holds personal data);
    :attr:`guide` holds the steps so far."""

    def __init__(self, message: str, guide: Guide) -> None:
        super().__init__(message)
        self.guide = guide


@dataclass
class Step:
    """One thing the guide shows: a command as typed, a daemon's log line, a screen."""

    section: str
    title: str
    command: str  # as typed ($SITE for the run's directory); "" for a log line
    kind: str = "command"  # command | background | screen | log
    note: str = ""  # said before it
    next: str = ""  # what to do next
    hardware: str = ""  # "needs hardware": what a unit needs, and what ran here instead
    expected: int | None = 0
    returncode: int | None = None
    output: str = ""  # standard output and error as a terminal shows them, interleaved
    elapsed_s: float | None = None
    whole: bool = False  # shown whole, however long


@dataclass
class Guide:
    root: Path
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    elapsed_s: float = 0.0
    error: str | None = None
    #: What the guide must not hold: (what it is, its text).
    forbidden: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and all(s.returncode == s.expected for s in self.steps
                                          if s.expected is not None)

    def markdown(self) -> str:
        return render(self)


class Background(background.Background):
    """A process that keeps running (a simulator, the daemon), in the repository."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        super().__init__(argv, env, REPO)


_env = background.isolated_env




def first_fix(capture: Path) -> Fix:
    """The capture's first position fix, read with the gateway's own NMEA reader: where
    this run's unit is installed (so the GNSS check has a distance to show)."""
    reader = NmeaReader()
    with capture.open("rb") as stream:
        for chunk in capture_chunks(stream):
            for event in reader.feed(chunk, 0):
                if isinstance(event, Fix):
                    return event
    raise UserError(f"{capture}: no position fix in it: give a capture of a receiver "
                    "with a fix")


# -- personal data and keys: what the guide must not hold ---------------------------------

def key_forms(data: bytes) -> list[str]:
    """A key file's content in every textual form a command could print: its PEM body
    lines, the DER or raw bytes in hex and base64."""
    forms: list[str] = []
    raws = [data]
    if b"-----BEGIN" in data:
        body = b"".join(line for line in data.splitlines() if not line.startswith(b"-----"))
        forms += [line.decode() for line in data.splitlines()
                  if not line.startswith(b"-----") and len(line) > 16]
        with contextlib.suppress(ValueError):
            raws.append(base64.b64decode(body))
    else:
        text = data.decode(errors="replace").strip()
        if re.fullmatch(r"[0-9a-fA-F]{32,}", text):  # a key file of hex digits
            raws.append(bytes.fromhex(text))
    for raw in raws:
        forms += [raw.hex(), base64.b64encode(raw).decode(),
                  base64.urlsafe_b64encode(raw).decode().rstrip("=")]
    return [f for f in forms if len(f) >= 16]


def position_forms(lat_e7: int, lon_e7: int) -> list[str]:
    """A position's forms beyond those of :class:`app.diag.Personal`: as NMEA writes it
    (ddmm.mmmm), to three decimals of minutes and more."""
    forms: list[str] = []
    for e7 in (lat_e7, lon_e7):
        degrees = abs(e7) / 1e7
        whole = int(degrees)
        nmea = whole * 100 + (degrees - whole) * 60
        forms += [f"{nmea:.{n}f}" for n in range(2, 6)]
    return forms


def personal_findings(text: str, forbidden: Sequence[tuple[str, str]]) -> list[str]:
    """What of *text* is a key, a position or a person reference: the forbidden texts
    found, and the matches of the bundle redaction's detectors (app/diag.py), tag ids
    excepted (the guide names the lab's tag: a technician types it)."""
    found = [f"{what} ({needle[:12]}…)" for what, needle in forbidden
             if needle and needle.lower() in text.lower()]
    for what, pattern in PERSONAL_PATTERNS.items():
        if what == "tag id":
            continue
        found += [f"{what}: {m.group(0)[:40]!r}" for m in pattern.finditer(text)]
    return found


# -- the run ---------------------------------------------------------------------------

class Run:
    """The site and the technician's commands, in *root*; :meth:`run` returns the guide."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.g = Guide(root)
        self.env = _env()
        self.section = "site"
        self.background: list[Background] = []
        self.broker: Mosquitto | None = None
        self.sink: contextlib.AbstractContextManager[list[int]] | None = None
        self.pki: Pki | None = None
        self.sims: dict[str, Background] = {}
        self.daemon: Background | None = None
        self.daemons: list[Background] = []  # every daemon started, in order

    # -- how a step runs ---------------------------------------------------------------------

    def shown(self, argv: Sequence[str]) -> str:
        return shlex.join(argv).replace(str(self.root), SITE_VAR)

    def fail(self, message: str) -> GuideError:
        self.g.error = message
        return GuideError(message, self.g)

    def add(self, step: Step) -> Step:
        self.g.steps.append(step)
        return step

    def cmd(self, title: str, shown: str | Sequence[str], real: Sequence[str], *,
            expect: int | None = 0, note: str = "", next: str = "",  # noqa: A002
            hardware: str = "", timeout: float = STEP_TIMEOUT_S, whole: bool = False) -> Step:
        """Run a command to its end (its standard output and error in one pipe, in the
        order a terminal shows them); GuideError unless it exits with *expect*."""
        typed = shown.replace(str(self.root), SITE_VAR) if isinstance(shown, str) \
            else self.shown(shown)
        step = self.add(Step(self.section, title, typed, note=note, next=next,
                             hardware=hardware, expected=expect, whole=whole))
        started = time.monotonic()
        try:
            done = subprocess.run(list(real), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, env=self.env, cwd=REPO,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise self.fail(f"{title}: no end within {timeout:g} s") from None
        step.elapsed_s = time.monotonic() - started
        step.returncode, step.output = done.returncode, done.stdout
        if expect is not None and done.returncode != expect:
            raise self.fail(f"{title}: exit status {done.returncode}, expected {expect}:\n"
                            f"{done.stdout}")
        return step

    def gw(self, title: str, *args: str, **kw: Any) -> Step:
        """``python gateway.py ARGS``, as typed."""
        return self.cmd(title, ["python", "gateway.py", *args],
                        [sys.executable, str(REPO / "gateway.py"), *args], **kw)

    def start(self, title: str, shown: Sequence[str], real: Sequence[str], *, ready: str,
              note: str = "", hardware: str = "", show: int = 1) -> Background:
        """Start a process that keeps running; wait for its line matching *ready*; the
        guide shows its first *show* lines."""
        step = self.add(Step(self.section, title, self.shown(shown), kind="background",
                             note=note, hardware=hardware, expected=None))
        proc = Background(real, self.env)
        self.background.append(proc)
        if proc.wait_line(ready) is None:
            proc.stop()
            raise self.fail(f"{title}: it did not say {ready!r} within {WAIT_S:g} s:\n"
                            + "\n".join(proc.text()))
        step.output = "\n".join(proc.text()[:show])
        return proc

    def log(self, title: str, line: str, *, note: str = "", next: str = "") -> Step:  # noqa: A002
        """A line of the daemon's log (journalctl -u smartcorr-gateway on a unit)."""
        return self.add(Step(self.section, title, "", kind="log", note=note, next=next,
                             expected=None, output=line))

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = WAIT_S) -> float:
        """Wait until *condition()* holds (another process's state); seconds it took."""
        started = time.monotonic()
        tick = threading.Event()
        while not condition():
            if time.monotonic() - started > timeout:
                raise self.fail(f"timed out after {timeout:g} s waiting for {what}")
            tick.wait(0.1)
        return time.monotonic() - started

    def state(self) -> dict[str, Any]:
        """The daemon's state file as it stands ({} when there is none)."""
        try:
            value = json.loads((self.root / "run" / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def device(self, role: str) -> dict[str, Any]:
        return next((d for d in self.state().get("devices") or [] if d.get("role") == role),
                    {})

    def stop_all(self) -> None:
        for proc in reversed(self.background):
            proc.stop()
        if self.sink is not None:
            self.sink.__exit__(None, None, None)
        if self.broker is not None:
            self.broker.stop()

    # -- the whole run -----------------------------------------------------------------------

    def run(self) -> Guide:
        started = time.monotonic()
        try:
            self.site()
            self.recording()
            self.uplink()
            self.ports()
            self.range_test()
            self.support()
            self.leaves()
        except UserError:
            raise
        except Exception as exc:  # the guide so far says where it stopped
            raise self.fail(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.stop_all()
            self.g.elapsed_s = time.monotonic() - started
        return self.g

    @property
    def config(self) -> str:
        return str(self.root / "gateway.toml")

    def site(self) -> None:
        self.section = "site"
        root = self.root
        identity = root / "identity"
        self.gw("make the gateway's identity", "provision", "init", "--identity-dir",
                str(identity), "--gateway-id", GATEWAY_ID, "--no-tpm",
                note="`--no-tpm`: this machine has no TPM, so the identity key and the "
                     "store's key are files (the warning says what that costs). A unit "
                     "makes its identity key in its TPM 2.0, where it never leaves.",
                hardware="a unit's TPM 2.0 (`--tpm device:/dev/tpmrm0`, found by default); "
                         "here `--no-tpm` (the TPM itself is tested with a software TPM, "
                         "swtpm, by tests/test_tpm_identity.py)")
        # enrolment's stand-in: the lab CA signs the identity's own TLS key
        self.pki = make_pki(root / "pki")
        key = load_pem_private_key((identity / "tls.key").read_bytes(), None)
        _, cert = issue_custom(self.pki.ca, GATEWAY_ID, key=key)  # type: ignore[arg-type]
        atomic_write(identity / "tls.crt", cert.public_bytes(Encoding.PEM), 0o644)
        shutil.copy(self.pki.ca_file, identity / "ca.crt")
        self.broker = start_mosquitto(root / "broker", self.pki)
        self.g.facts["broker_port"] = self.broker.port
        # the platform's side, subscribed (it reconnects when the broker comes back)
        self.sink = records_sink(self.broker, self.pki)
        self.sink.__enter__()

        # the keys the tag and the kiosk came with
        write_private(root / "tag.key", secrets.token_bytes(16).hex() + "\n")
        write_private(root / "kiosk.key", secrets.token_bytes(16).hex() + "\n")
        by_id = root / "by-id"
        by_id.mkdir()
        self.sims["tags"] = self.simulator(
            "plug in the tag receiver", "tag", "--key-file", str(root / "tag.key"), "--tag",
            TAG, "--serial", TAG_RX_SERIAL, "--interval", str(BEACON_INTERVAL_S), "--rssi",
            str(TAG_RSSI_DBM),
            note=f"The tag receiver with its tag {TAG} beaconing every "
                 f"{BEACON_INTERVAL_S:g} s, each beacon signed under the tag's key (the file "
                 "`$SITE/tag.key`, mode 600, as it came with the tag).")
        self.sims["kiosk"] = self.simulator(
            "plug in the kiosk", "kiosk", "--key-file", str(root / "kiosk.key"), "--serial",
            KIOSK_SERIAL, "--checkin-every", "10",
            note="The check-in kiosk, a check-in every 10 s.")
        fix = first_fix(CAPTURE)
        self.sims["gnss"] = self.simulator(
            "plug in the GNSS receiver", "gnss", "--replay",
            os.path.relpath(CAPTURE, REPO), "--loop",
            note="The GNSS receiver replays a real u-blox 8 receiver's capture (from the "
                 "shared data, read where it lies), one epoch a second.")
        self.gw("write the configuration", "provision", "config", "--out", self.config,
                "--identity-dir", str(identity), "--data-dir", str(root / "data"),
                "--broker", f"127.0.0.1:{self.broker.port}", "--by-id", str(by_id),
                note="`--by-id`: where this run's ports are named (on a unit, "
                     "/dev/serial/by-id, the default). The template found the three "
                     "devices by their names. Then a few things are filled in by hand, as "
                     "an installer does: the installed position (`[gnss] installed_lat`, "
                     "`installed_lon`: here the capture's first fix; personal data, never "
                     "shown), and `[paths] runtime_dir` (this machine has no "
                     "/run/smartcorr); `[tags] interval_max_s = 10` (the least: the "
                     "tag's presence goes out as an interval every 10 s instead of 300, so "
                     "that this run sees it); and, this bench having no platform to "
                     "authorise the tag, `[supervision] require_authorisation = false` (on "
                     "a unit the platform's set-authorisation command authorises it: "
                     "docs/supervision.md).")
        text = Path(self.config).read_text()
        lat, lon = fix.lat_e7 / 1e7, fix.lon_e7 / 1e7
        text, n = re.subn(r"^#\s*installed_lat\s*=.*$", f"installed_lat = {lat:.7f}", text,
                          flags=re.MULTILINE)
        text, m = re.subn(r"^#\s*installed_lon\s*=.*$", f"installed_lon = {lon:.7f}", text,
                          flags=re.MULTILINE)
        if (n, m) != (1, 1) or not re.search(r"^\[gnss\]$", text, re.MULTILINE):
            raise self.fail("provision config wrote no [gnss] table with installed_lat and "
                            "installed_lon to fill in")
        # no platform sends this bench's tag an authorisation (on a unit, its
        # set-authorisation command does): its presence is recorded without one
        text, k = re.subn(r"^#\s*\[supervision\]\s*$", "[supervision]", text,
                          flags=re.MULTILINE)
        text, j = re.subn(r"^#\s*require_authorisation\s*=.*$",
                          "require_authorisation = false", text, flags=re.MULTILINE)
        if (k, j) != (1, 1):
            raise self.fail("provision config wrote no [supervision] require_authorisation "
                            "to set")
        (root / "run").mkdir(mode=0o700)
        text += f'\n[paths]\nruntime_dir = "{root / "run"}"\n\n[tags]\ninterval_max_s = 10\n'
        atomic_write(Path(self.config), text.encode())
        self.gw("pair the tag", "provision", "pair-tag", "--identity-dir", str(identity),
                "--tag", TAG, "--key-file", str(root / "tag.key"), "--operator", TECHNICIAN)
        self.gw("pair the kiosk", "provision", "pair-kiosk", "--identity-dir", str(identity),
                "--serial", KIOSK_SERIAL, "--key-file", str(root / "kiosk.key"), "--operator",
                TECHNICIAN)
        self.forbid(fix)
        self.start_daemon("start the gateway", "The daemon; on a unit systemd runs it "
                          "(`systemctl start smartcorr-gateway`) and its lines go to the "
                          "journal (`journalctl -u smartcorr-gateway`). Its first line says "
                          "what it runs with.")

    def simulator(self, title: str, name: str, *args: str, note: str) -> Background:
        link = self.root / "by-id" / BY_ID[name if name != "tag" else "tags"]
        argv = ["-m", "lab.simulators", name, "--pty", "--link", str(link), *args]
        return self.start(title, ["python", *argv], [sys.executable, *argv], ready=r"^/",
                          note=note + " The first line it prints is the pseudo-terminal "
                          "it serves, linked under the by-id name.",
                          hardware="the real device on a USB port; here its simulator on a "
                                   "pseudo-terminal, speaking the documented protocol")

    def start_daemon(self, title: str, note: str, before: Sequence[str] = ()) -> None:
        """Start ``gateway.py run``; the guide shows *before* (the last lines of the daemon
        it replaces) and its start line."""
        self.daemon = self.start(
            title, ["python", "gateway.py", "run", "--config", self.config],
            [sys.executable, str(REPO / "gateway.py"), "run", "--config", self.config],
            ready=r"running \(version", note=note)
        self.daemons.append(self.daemon)
        self.g.steps[-1].output = "\n".join(
            [*before, self.daemon.wait_text(r"running \(version") or ""])
        pid = self.daemon.proc.pid
        self.wait("the devices' handshakes, the uplink, the tag and a GNSS fix", lambda: (
            self.state().get("pid") == pid
            and self.state().get("uplink", {}).get("state") == "connected"
            and all(self.device(r).get("handshake") == "ok" for r in ("tag_receiver", "kiosk"))
            and bool((self.state().get("gnss") or {}).get("fix"))
            and any(t.get("present") for t in self.state().get("tags") or [])), 30)

    def forbid(self, fix: Fix) -> None:
        """Everything of this run the guide must not hold (read now: decommissioning
        destroys the key files at the end)."""
        forbidden = self.g.forbidden
        key_files = [p for p in (self.root / "identity").iterdir()
                     if p.suffix == ".key" or p.name in ("tags.json", "kiosks.json")]
        key_files += [self.root / "tag.key", self.root / "kiosk.key",
                      *(self.root / "pki").glob("*.key")]
        for path in key_files:
            forbidden += [(f"key {path.name}", form) for form in key_forms(path.read_bytes())]
        assert self.pki is not None  # noqa: S101 (made in site())
        ca_der = self.pki.ca.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8,
                                               NoEncryption())
        forbidden += [("the lab CA's key", form) for form in key_forms(ca_der)]
        tag_forms = {TAG.lower(), TAG[1:].lower(), f"0x{int(TAG[1:], 16):x}"}
        personal = Personal.of(load_config(Path(self.config)))
        forbidden += [("the installed position", text) for text in personal.texts
                      if text.lower() not in tag_forms and len(text) >= 4]
        forbidden += [("the installed position", text)
                      for text in position_forms(fix.lat_e7, fix.lon_e7)]
        forbidden.append(("a person reference", KIOSK_PERSON))

    # -- the tasks ---------------------------------------------------------------------------

    def recording(self) -> None:
        self.section = "recording"
        cfg = self.config
        self.gw("the running gateway, now", "status", "--config", cfg,
                note="On a unit: `sudo smartcorr status` (the configuration is "
                     "/etc/smartcorr/gateway.toml, the default).",
                next="`running` on the first line, the devices `ok` and heard seconds ago, "
                     "the uplink `connected` and the queue near 0: it records and delivers. "
                     "Exit status 3 means the daemon does not run: `systemctl status "
                     "smartcorr-gateway`, then `journalctl -u smartcorr-gateway -n 50` for "
                     "why.")
        self.watch()
        self.gw("what waits in the store", "diag", "buffer", "--config", cfg,
                next="A queue that only grows while the uplink is `connected` means the "
                     "broker refuses the records: see the next section. `integrity` other "
                     "than `ok`: make a support bundle (last section) and call support.")
        synced = kernel_clock_synced()
        self.g.facts["clock_synced"] = synced
        step = self.gw("check the whole installation", "provision", "check", "--config", cfg,
                       "--skip-hardening", whole=True, expect=0 if synced else 1,
                       note="`--skip-hardening`: this machine is not a unit set up by "
                            "packaging/install.sh (on a unit, leave it out: the unit's "
                            "hardening is checked too, docs/hardening.md)." + ("" if synced
                            else " This machine's clock is not synchronised (no NTP here), "
                            "and the replayed capture dates from 2017, before this "
                            "software's release: the gateway refuses such a GNSS time (a "
                            "receiver's default, or a spoofed one), so the `clock` line "
                            "fails here, as it would on a unit with neither NTP nor a GNSS "
                            "antenna that sees the sky."),
                       next="Exit status 0: nothing failed (the `WARN` lines, `!` on a "
                            "terminal, are warnings, each with what to do: here the keys "
                            "are files and no command keys are installed, since this run "
                            "has neither a TPM nor the platform's enrolment). Exit status "
                            "1: the `FAIL` lines (`✘`) say what failed, and the `->` line "
                            "(`→`) under each what to do (docs/provision-check.md).")
        failed = _failed_items(step.output)
        self.g.facts["check_failed"] = failed
        if failed != ([] if synced else ["clock"]):
            raise self.fail(f"provision check failed on {failed}:\n{step.output}")

    def watch(self) -> None:
        """``status --watch`` in a real 80x24 terminal (tmux), its screen captured."""
        if shutil.which("tmux") is None:
            raise self.fail("tmux is not installed: 'sudo apt-get install tmux' (scripts/"
                            "setup.sh --test installs it)")
        argv = ["python", "gateway.py", "status", "--config", self.config, "--watch"]
        step = self.add(Step(self.section, "the live view", self.shown(argv), kind="screen",
                             note="In an SSH terminal of 80x24 (here a tmux pane of that "
                                  "size, its screen captured after two seconds). It redraws "
                                  "every second; `q` quits.",
                             next="Leave it open while you work: a device unplugged, the "
                                  "uplink lost, a tag going quiet show within a second. "
                                  "`q` or Ctrl-C quits and leaves the terminal as it was.",
                             expected=0))
        sock = self.root / "tmux.sock"
        server = ["tmux", "-S", str(sock), "-f", "/dev/null"]
        real = shlex.join([sys.executable, str(REPO / "gateway.py"), *argv[2:]])
        started = time.monotonic()

        def tmux(*args: str) -> str:
            return subprocess.run([*server, *args], capture_output=True, text=True,
                                  check=True, timeout=10, env=self.env).stdout

        tmux("new-session", "-d", "-x", "80", "-y", "24", "-s", "w",
             f"{real}; echo EXITED $?; sleep 30")
        try:
            screen: list[str] = []

            def drawn() -> bool:
                nonlocal screen
                screen = tmux("capture-pane", "-p", "-t", "w").splitlines()
                return (len(screen) == 24 and screen[-1].startswith("every ")
                        and any(line.startswith("Uplink   connected") for line in screen)
                        and any(line.startswith(TAG) for line in screen))

            self.wait("the live view in tmux", drawn, 15)
            self.wait("the next redraw", lambda: time.monotonic() - started > 2, 5)
            self.wait("the live view in tmux", drawn, 5)
            step.output = "\n".join(line.rstrip() for line in screen)
            tmux("send-keys", "-t", "w", "q")
            ended: list[str] = []

            def quit_() -> bool:
                nonlocal ended
                ended = [line for line in tmux("capture-pane", "-p", "-t", "w").splitlines()
                         if line.startswith("EXITED ")]
                return bool(ended)

            self.wait("q to quit the live view", quit_, 10)
            step.returncode = int(ended[0].split()[1])
            step.elapsed_s = time.monotonic() - started
        finally:
            subprocess.run([*server, "kill-server"], capture_output=True, check=False,
                           timeout=10)
        if step.returncode != 0:
            raise self.fail(f"status --watch: exit status {step.returncode} after q")

    def uplink(self) -> None:
        self.section = "uplink"
        cfg = self.config
        assert self.daemon is not None  # noqa: S101 (started in site())
        assert self.broker is not None  # noqa: S101
        assert self.pki is not None  # noqa: S101
        self.gw("the uplink, connected", "status", "--config", cfg,
                next="`Uplink   connected to …`, with the last acknowledgement seconds ago: "
                     "records reach the platform.")
        since = self.daemon.mark()
        port = self.broker.port
        self.broker.stop()  # the platform's broker goes away (or the network)
        line = self.daemon.wait_text(r"uplink cannot connect", WAIT_S, since=since)
        if line is None:
            raise self.fail("the broker stopped, and the uplink did not say it cannot connect "
                            f"within {WAIT_S:g} s:\n"
                            + "\n".join(self.daemon.text(since=since)))
        said = self.daemon.text("stderr", since)
        upto = next(i for i, text in enumerate(said) if text == line)
        self.log("the broker goes away: the daemon's log says it at once",
                 "\n".join(said[:upto + 1]),
            note="The broker is stopped here (mosquitto, SIGTERM). On a unit these lines "
                 "are in `journalctl -u smartcorr-gateway`; the same reason is on the "
                 "`Status:` line of `systemctl status smartcorr-gateway`.",
            next="The line names the cause and what to do "
                 "(docs/uplink-troubleshooting.md has each one). While the same problem "
                 "lasts it is said again at most once a minute.")
        self.wait("the state file to say the uplink is down", lambda: (
            self.state().get("uplink") or {}).get("state") not in (None, "connected"))
        first = self.gw("the uplink, down", "status", "--config", cfg,
                        next="`Uplink   DOWN since …`, the reason in brackets, and the "
                             "records queued.")
        queued = (self.state().get("uplink") or {}).get("queued") or 0
        self.wait("more records queued (the tag's next presence interval)", lambda: (
            (self.state().get("uplink") or {}).get("queued") or 0) >= queued + 1,
            timeout=2 * WAIT_S)
        second = self.gw("a few seconds later", "status", "--config", cfg,
                         next="The queue grows: the readings are recorded and kept. They "
                              "go out when the uplink is back; nothing to do on the unit "
                              "unless the cause is here (the network cable, the router).")
        self.g.facts["queued_while_down"] = [_queued(first.output), _queued(second.output)]
        if not (_queued(second.output) > _queued(first.output) >= 0
                and "Uplink   DOWN since" in first.output):
            raise self.fail("status did not show the uplink down with the queue growing:\n"
                            f"{first.output}\n{second.output}")
        self.gw("check the installation, the broker down", "provision", "check", "--config",
                cfg, "--skip-hardening", "--timeout", "3", expect=1, whole=True,
                next="Exit status 1: the broker lines say where it breaks (DNS, TCP, TLS, "
                     "the broker's answer). Refused or timed out: the network, or the "
                     "platform's broker (call the platform's operator). A TLS or "
                     "authentication failure: the certificate or the broker's setup "
                     "(docs/uplink-troubleshooting.md).")
        since = self.daemon.mark()
        self.broker = start_mosquitto(self.root / "broker", self.pki, port=port)
        back = self.daemon.wait_text(r"uplink connected again", 30, since=since)
        if back is None:
            raise self.fail("the broker is back, and the uplink did not say so within 30 s:"
                            "\n" + "\n".join(self.daemon.text(since=since)))
        said = self.daemon.text("stderr", since)
        self.log("the broker is back", "\n".join(said[:said.index(back) + 1]),
                 next="How long it was without the broker, and the backlog that goes out "
                      "now (alarms first).")
        self.wait("the backlog delivered", lambda: (
            (self.state().get("uplink") or {}).get("queued") or 0) < 5, 30)
        self.gw("the uplink, connected again", "status", "--config", cfg,
                next="The queue is back near 0.")

    def ports(self) -> None:
        self.section = "ports"
        cfg = self.config
        assert self.daemon is not None  # noqa: S101
        self.gw("the ports and their devices", "diag", "ports", "--config", cfg, "--by-id",
                str(self.root / "by-id"),
                note="`--by-id`: this run's by-id names (on a unit, leave it out: "
                     "/dev/serial/by-id).",
                hardware="real USB devices; here simulators on pseudo-terminals (the "
                         "simulators also drive a real USB-serial adapter for a bench "
                         "test: `python -m lab.simulators tag --port /dev/ttyUSB1`, cross-"
                         "wired to the gateway's)",
                next="Each configured port: present and a tty, held by the gateway, the "
                     "handshake `ok` with the device's serial and firmware. The "
                     "`/dev/serial/by-id` list says which device each name is. Exit "
                     "status 0: every configured port is usable.")
        since = self.daemon.mark()
        pid = self.sims["gnss"].proc.pid
        self.cmd("unplug the GNSS receiver", ["kill", "-TERM", str(pid)],
                 ["kill", "-TERM", str(pid)],
                 note="Its simulator is stopped: its pseudo-terminal and its by-id name go, "
                      "as when a USB cable is pulled.",
                 hardware="pulling a real USB cable; here the simulator stops")
        self.sims["gnss"].stop()  # reaped: its link is gone with it
        self.wait("the daemon to lose the GNSS port",
                  lambda: self.device("gnss").get("held") is False, WAIT_S)
        lost = self.daemon.text("stderr", since)
        if lost:
            self.log("the daemon's log", "\n".join(lost[:3]))
        self.gw("the ports, the GNSS receiver unplugged", "diag", "ports", "--config", cfg,
                "--by-id", str(self.root / "by-id"), expect=1,
                next="Exit status 1, and `PROBLEMS:` names the port: plug the device in "
                     "(check the cable); a by-id name carries the device's serial number, "
                     "so a replaced device has another name: `provision config --out -` "
                     "prints the names found, to put in gateway.toml.")
        self.gw("status, the GNSS receiver unplugged", "status", "--config", cfg,
                next="Its row says `closed`; the other devices go on recording (one dead "
                     "port never stops the others).")
        self.sims["gnss"] = self.simulator(
            "plug the GNSS receiver in again", "gnss", "--replay",
            os.path.relpath(CAPTURE, REPO), "--loop", note="The same receiver, back.")
        took = self.wait("the daemon to reopen the GNSS port",
                         lambda: self.device("gnss").get("held") is True, 30)
        self.g.facts["gnss_reopened_s"] = round(took, 1)
        self.gw("the ports, the GNSS receiver back", "diag", "ports", "--config", cfg,
                "--by-id", str(self.root / "by-id"),
                next=f"The daemon reopened it by itself (here {took:.0f} s after it came "
                     "back; it retries with backoff): no restart needed.")

    def range_test(self) -> None:
        self.section = "range"
        walk = self.gw("walk the home with the tag", "provision", "range-test", "--config",
                self.config, "--tag", TAG, "--duration", str(RANGE_TEST_S), "--operator",
                TECHNICIAN,
                note=f"`--duration {RANGE_TEST_S}`: this run's walk is short; on site give "
                     "the default (300 s) and walk through every room, the garden, and "
                     "wherever the person sleeps; `q` ends it sooner. On a terminal a live "
                     "line shows the beacons and RSSI every second (without one, every "
                     "10 s: here once, at the start).",
                hardware="walking a real home with the tag on; here the tag's simulator "
                         f"beacons every {BEACON_INTERVAL_S:g} s at {TAG_RSSI_DBM} dBm",
                next="The verdict, and the absence threshold to use (below). `poor`: move "
                     "the receiver nearer the middle of the home (or add one) and walk "
                     "again: a higher threshold only hides the gaps. The result is a record "
                     "the platform receives.")
        found = re.search(r"--absent-after (\d+)", walk.output)
        if found is None:
            raise self.fail(f"range-test recommended no threshold:\n{walk.output}")
        self.gw("apply the recommended threshold", "provision", "pair-tag", "--identity-dir",
                str(self.root / "identity"), "--tag", TAG, "--replace", "--key-file",
                str(self.root / "tag.key"), "--absent-after", found.group(1), "--operator",
                TECHNICIAN,
                note="`--replace` with the key file the tag came with: the tag keeps its key, "
                     "its absence threshold changes. The pairings are read at start: restart "
                     "the gateway.",
                next="The record names the old and the new key ids (here the same key).")
        assert self.daemon is not None  # noqa: S101
        if self.daemon.stop() != 0:
            raise self.fail("the daemon did not stop cleanly (exit status other than 0)")
        self.start_daemon("restart the gateway", "On a unit: `systemctl restart "
                          "smartcorr-gateway`. The stopping daemon's last line says what it "
                          "sealed, forwarded and left queued; the new one's first line "
                          "follows.", before=self.daemon.text("stderr")[-1:])

    def support(self) -> None:
        self.section = "support"
        cfg = self.config
        self.gw("identity, keys and certificate", "diag", "keys", "--config", cfg,
                next="Key ids and fingerprints only, never a key. Exit status 1 names a key "
                     "or certificate problem and what to do.")
        bundle = self.root / "support.tar.gz"
        assert self.daemon is not None  # noqa: S101
        (self.root / "daemon.log").write_text("".join(
            f"{line}\n" for daemon in self.daemons for line in daemon.text("stderr")))
        self.gw("make the support bundle", "diag", "bundle", "--config", cfg, "--out",
                str(bundle), "--log-file", str(self.root / "daemon.log"),
                note="`--log-file`: here the daemon's output was saved to a file; on a unit "
                     "leave it out (the logs come from the journal: run it as root or a "
                     "member of `systemd-journal`).",
                next="Send the file (mode 600) to the support desk as they say (never by "
                     "plain e-mail). Only if they ask for personal data: "
                     "`--include-personal --operator NAME`, which is written down.")
        self.cmd("what it holds", ["tar", "-tzvf", str(bundle)],
                 ["tar", "-tzvf", str(bundle)])
        self.cmd("the tag's id is not in it", f"tar -xzOf {bundle} | grep -c {TAG}",
                 ["sh", "-c", f"tar -xzOf {shlex.quote(str(bundle))} | grep -c {TAG}"],
                 expect=1,
                 next="`0` and exit status 1: grep found nothing. Tag ids, person "
                      "references, positions, NMEA sentences and raw serial traces are "
                      "replaced in the logs (`<tag>`, `<position>`…).")
        with tarfile.open(bundle) as tar:
            members = {m.name: f.read() for m in tar.getmembers()
                       if (f := tar.extractfile(m)) is not None}
        self.g.facts["bundle_members"] = sorted(members)
        blob = b"".join(members.values()).decode(errors="replace")
        # the forbidden texts anywhere; the redaction's detectors on what it redacts, the logs
        found = [f"{what} ({needle[:12]}…)" for what, needle in self.g.forbidden
                 if needle.lower() in blob.lower()]
        found += personal_findings(members.get("logs.txt", b"").decode(errors="replace"), ())
        if TAG in blob or found:
            raise self.fail(f"the support bundle holds personal data or a key: {found}")

    def leaves(self) -> None:
        self.section = "leaves"
        assert self.daemon is not None  # noqa: S101
        step = self.gw("decommission the gateway", "provision", "decommission", "--config",
                       self.config, "--operator", TECHNICIAN, "--yes", "--timeout", "30",
                       note="`--yes` answers the question a terminal would ask (type the "
                            "gateway id). The daemon runs: it seals the final record, "
                            "delivers it and everything before it, and the command then "
                            "destroys the keys.",
                       next="Once it says the keys are destroyed, the unit can be unplugged "
                            "and reset (`provision init` makes a new identity). Exit "
                            "status 1: the final record was not delivered within "
                            "`--timeout`; the keys are kept: run it again once the uplink "
                            "is back (`--force` destroys them anyway, and the platform must "
                            "then be told).")
        code = self.daemon.proc.wait(WAIT_S)
        self.g.facts["daemon_exit"] = code
        if code != 3:
            raise self.fail(f"the daemon exited with {code} after the decommission, not 3")
        self.g.facts["decommission"] = [line for line in step.output.splitlines()
                                        if " decommissioned: " in line]
        self.gw("status afterwards", "status", "--config", self.config, expect=3,
                next="Exit status 3: no daemon runs (it stopped by itself with status 3, "
                     "which keeps systemd from restarting it).")


def _failed_items(check: str) -> list[str]:
    """The items ``provision check`` failed (its human output, marks or plain words)."""
    return [m.group(1) for m in re.finditer(r"^(?:✘|FAIL) +(\S+(?: \S+)?)  ", check,
                                            re.MULTILINE)]


def _queued(status: str) -> int:
    """The records queued on ``status``'s Uplink line (-1 when it says none)."""
    m = re.search(r"^Uplink .*?([\d,]+) queued", status, re.MULTILINE)
    return int(m.group(1).replace(",", "")) if m else -1


# -- the guide -------------------------------------------------------------------------





HARDWARE = (
    ("Installing a unit from a fresh Raspberry Pi OS",
     "[installing.md](installing.md): `packaging/install.sh` was run here into a directory "
     "tree (`--root`), its output shown there; tests/test_packaging.py runs it"),
    ("A range test walking a real home with the tag on",
     "`provision range-test` against the tag receiver's simulator (above)"),
    ("The devices on real USB ports",
     "simulators on pseudo-terminals under by-id names; `python -m lab.simulators tag "
     "--port /dev/ttyUSB1` drives a real USB-serial adapter for a bench test"),
    ("A TPM 2.0 holding the identity key",
     "`provision init --no-tpm` (key files); tests/test_tpm_identity.py uses a software "
     "TPM (swtpm)"),
    ("The platform's enrolment service (`provision enrol`, `provision renew`)",
     "a lab CA signed the gateway's TLS key here; [installer-transcript.md]"
     "(installer-transcript.md) runs enrolment and `provision renew` for real"),
)


def render(g: Guide) -> str:
    when = g.started.strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Technician's guide: the commands on site, with their real output",
        "",
        f"Written by `python -m lab.technician_guide --out docs/technician-guide.md` on "
        f"{when}, in {g.elapsed_s:.0f} s; `tests/test_technician_guide.py` runs it again "
        "and checks that each command exits as shown here. Every command below ran as "
        "shown, in a process of its own, against a real gateway daemon, a real mosquitto "
        "with TLS and the province's ACL, and the devices' simulators on "
        "pseudo-terminals; what follows each command is its real output (standard output, "
        "then standard error; long outputs cut where `…` says so) and its exit status. "
        "Times are this machine's; ids, serials and fingerprints are the run's.",
        "",
        f"`{SITE_VAR}` is the run's temporary directory. On a unit, "
        "`python gateway.py` is `sudo smartcorr` (packaging/install.sh installs it: the "
        "same commands, run as the service's user) and the configuration is "
        "`/etc/smartcorr/gateway.toml`. Steps marked **needs hardware** say what a unit or "
        "a home needs and what ran here instead.",
        "",
        "Exit statuses, for every command: 0 all is well; 1 a check found a problem (the "
        "output says which and what to do); 2 a usage or configuration error (one line "
        "naming the option, the file or the key); 3 (`status`) no daemon runs.",
        "",
    ]
    if g.error:
        out += [f"**The run stopped: {g.error}**", ""]
    out += ["| task | commands |", "| --- | --- |"]
    for key, heading, _ in SECTIONS[1:]:
        commands = []
        for s in g.steps:
            if s.section == key and s.kind in ("command", "screen") and s.command.startswith(
                    "python gateway.py"):
                words = s.command.split()[2:]
                name = " ".join(w for w in words[:2] if not w.startswith("-"))
                name += " --watch" if "--watch" in words else ""
                if f"`{name}`" not in commands:
                    commands.append(f"`{name}`")
        anchor = re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        out.append(f"| [{heading}](#{anchor}) | {', '.join(commands)} |")
    out.append("")
    for key, heading, intro in SECTIONS:
        steps = [s for s in g.steps if s.section == key]
        if not steps:
            continue
        out += [f"## {heading}", "", intro, ""]
        for step in steps:
            out += _step(g, step)
    out += ["## Needs hardware", "",
            "What this run could not do on one machine, and what it ran instead:", "",
            "| on a unit, in a home | here |", "| --- | --- |"]
    out += [f"| {what} | {instead} |" for what, instead in HARDWARE]
    shown = [s for s in g.steps if s.kind in ("command", "screen")]
    out += ["", "## This run", "",
            f"{len(shown)} commands, each exited as shown; {g.elapsed_s:.0f} s in all. "
            "Before the guide was written it was searched for the run's keys (every key "
            "file, the tag's and the kiosk's keys, the lab CA's, in PEM, hex and base64), "
            "the installed position and the GNSS capture's coordinates in their textual "
            "forms, person references, NMEA sentences and hex dumps (the detectors of "
            "`app/diag.py`'s bundle redaction): none is in it.", ""]
    return "\n".join(out).replace("\n\n\n", "\n\n")


def _step(g: Guide, step: Step) -> list[str]:
    out = [f"### {step.title}", ""]
    if step.note:
        out += [step.note, ""]
    if step.hardware:
        out += [f"**Needs hardware**: {step.hardware}.", ""]
    if step.kind == "log":
        out += ["The daemon's log:", "", fence(CUT.apply(step.output)), ""]
    else:
        out += [fence(f"$ {step.command}", "console"), ""]
        text = CUT.apply(step.output, whole=step.whole).replace(str(g.root), SITE_VAR)
        if step.kind == "screen":
            out += ["The terminal:", "", fence(text), ""]
        elif text:
            out += [fence(text), ""]
        if step.kind == "background":
            out += ["It keeps running (here until the end of the run).", ""]
        elif step.returncode is not None:
            took = f" ({step.elapsed_s:.1f} s)" if step.elapsed_s is not None else ""
            out += [f"Exit status {step.returncode}{took}.", ""]
    if step.next:
        out += [f"**Next**: {step.next}", ""]
    return [line.replace(str(g.root), SITE_VAR) for line in out]


def checked_markdown(guide: Guide) -> str:
    """The guide's Markdown once searched for what it must not hold (:func:`personal_findings`
    with the run's keys, positions and person reference); GuideError when anything is
    found: then nothing may be written."""
    text = guide.markdown()
    found = personal_findings(text, guide.forbidden)
    if found:
        raise GuideError(f"the guide holds personal data or a key, not written: "
                         f"{'; '.join(found[:5])}", guide)
    return text


def shape(markdown: str) -> list[str]:
    """The guide's shape: its headings and commands in order, numbers and the run's
    directory left out (what a run changes)."""
    out = []
    for line in markdown.splitlines():
        if line.startswith(("## ", "### ", "$ ")):
            out.append(re.sub(r"\d+", "N", line))
    return out


def run_guide(root: Path | None = None) -> Guide:
    """Run everything in *root* (a new temporary directory if None, removed after)."""
    mosquitto_binary()  # missing: a clear error before anything starts
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        return Run(root).run()
    with tempfile.TemporaryDirectory(prefix="technician-guide-") as tmp:
        return Run(Path(tmp)).run()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lab.technician_guide",
        description="Run every technician command against a gateway set up in a temporary "
                    "directory (a real daemon, a real mosquitto, the devices' simulators) "
                    "and write the technician's guide (Markdown) with their real output.",
        epilog="example: python -m lab.technician_guide --out docs/technician-guide.md")
    ap.add_argument("--out", type=Path, metavar="FILE",
                    help="write the guide to FILE instead of standard output (only when "
                         "every command did what the guide says and the guide holds no key "
                         "and no personal data)")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="run in DIR (kept afterwards) instead of a temporary directory")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (ok, error, elapsed_s, steps: each section, "
                         "title, command, exit and expected exit) on standard output")
    args = ap.parse_args(argv)
    problem = keep_dir_problem(args.keep)
    if problem is not None:
        print(f"{ap.prog}: {problem}", file=sys.stderr)
        return 2
    text: str | None = None
    try:
        guide = run_guide(args.keep)
        text = checked_markdown(guide)
    except GuideError as exc:  # a step failed, or the guide holds what it must not
        guide = exc.guide
        guide.error = str(exc)
    except UserError as exc:
        print(f"{ap.prog}: {exc}", file=sys.stderr)
        return 2
    ok = text is not None and guide.ok
    if ok and args.out is not None:
        args.out.write_text(text or "")
    if args.json:
        print(json.dumps({
            "ok": ok, "error": guide.error, "elapsed_s": round(guide.elapsed_s, 1),
            "steps": [{"section": s.section, "title": s.title, "command": s.command,
                       "kind": s.kind, "exit": s.returncode, "expected": s.expected}
                      for s in guide.steps],
            "facts": guide.facts}, default=str))
    elif ok and args.out is None:
        print(text)
    if not ok:
        print(f"{ap.prog}: FAILED, nothing written: {guide.error}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
