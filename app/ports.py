"""The serial ports as a technician finds them (``gateway.py diag ports``): what
``/dev/serial/by-id`` lists, what each configured path is (present, a tty, ours to open),
who holds it open, and, for a port nobody holds, what the device behind it says.

The probe is short and leaves the device as it was: for a framed device (tag receiver,
kiosk) it opens the port exclusively (as the daemon does, so a daemon starting meanwhile
waits for it), sends HELLO_REQ, answers the HELLO through the gateway's own
:class:`~firmware_bridge.link.HostLink` (a device of the wrong class is refused as the
daemon would), and closes: it never acknowledges an event, so the device keeps every
reading for the daemon. For a GNSS receiver it listens for NMEA sentences through the
daemon's :class:`~drivers.nmea.NmeaReader`. Nothing here reports a position: whether there
is a fix, how many satellites, never where.

A port the running daemon holds is never probed (two readers would split its bytes):
``app/diag.py`` reports it from the daemon's state file instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import serial

from app.state import BY_ID_DIR
from drivers.nmea import Fix, NmeaReader
from firmware_bridge.link import DeviceRejected, DeviceUp, HostLink
from firmware_bridge.messages import DeviceClass, Hello

#: How long a probe waits for the device: a device answers HELLO_REQ at once and says
#: HELLO again every second while its link is down (docs/serial-protocol.md, 8.1); a GNSS
#: receiver talks once a second.
PROBE_TIMEOUT_S = 2.5
#: Bytes a probe reads at most (a device flooding the port cannot hold it longer).
MAX_PROBE_BYTES = 256 * 1024
#: The first bytes of an unanswered probe kept to say what talks there (NMEA?).
SNIFF_BYTES = 4096
#: Entries of /dev/serial/by-id listed at most.
MAX_BY_ID_ENTRIES = 64
#: Processes named per port at most as holding it open.
MAX_HOLDERS = 8
READ_CHUNK = 4096
#: Roles guessed from a by-id name (the USB vendor and product strings), first match wins.
ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("tag_receiver", re.compile(r"tag.?(rx|receiver)|ankle", re.IGNORECASE)),
    ("kiosk", re.compile(r"kiosk|check.?in", re.IGNORECASE)),
    ("gnss", re.compile(r"gnss|gps|u-?blox|nmea|sirf|quectel|glonass|mediatek|skytraq"
                        r"|teseo|garmin|globalsat", re.IGNORECASE)),
)
#: The pty multiplexer: a process holding it holds the master side of a pty.
PTMX = "/dev/ptmx"
#: Words of a command line that make a process the gateway's daemon.
_DAEMON_WORDS = ("gateway.py", "run")


@dataclass(frozen=True, slots=True)
class ByIdEntry:
    """One link of /dev/serial/by-id: its name, the device it points to (None: dangling)
    and the role its name suggests (None: a generic adapter, say which in the config)."""

    name: str
    device: str | None
    role: str | None


def guess_role(name: str) -> str | None:
    """``tag_receiver``, ``kiosk`` or ``gnss`` when the by-id *name* says so, else None."""
    for role, pattern in ROLE_PATTERNS:
        if pattern.search(name):
            return role
    return None


def list_by_id(directory: Path = BY_ID_DIR) -> list[ByIdEntry] | None:
    """The entries of *directory* sorted by name (at most :data:`MAX_BY_ID_ENTRIES`); None
    when it does not exist (no USB serial device is plugged in: udev makes it for the
    first one)."""
    try:
        with os.scandir(directory) as scan:
            names = sorted(entry.name for entry in scan)[:MAX_BY_ID_ENTRIES]
    except FileNotFoundError:
        return None
    except OSError:
        return []
    out = []
    for name in names:
        try:
            device: str | None = str((directory / name).resolve(strict=True))
        except (OSError, RuntimeError):
            device = None
        out.append(ByIdEntry(name, device, guess_role(name)))
    return out


@dataclass(frozen=True, slots=True)
class Access:
    """What a configured path is, without talking to the device. ``problem`` says what
    keeps the gateway from using it (None: nothing seen); ``locked``: another process
    holds the port's exclusive lock (as the daemon does)."""

    exists: bool
    device: str | None = None
    char_device: bool | None = None
    tty: bool | None = None
    read_write: bool | None = None
    locked: bool | None = None
    problem: str | None = None
    hint: str | None = None


def check_access(path: str, *, open_it: bool = True) -> Access:  # noqa: PLR0911 - one per case
    """Is *path* a serial port this process may open? With *open_it* (no daemon holds it)
    it is opened without becoming the controlling terminal and without blocking, to ask
    whether it is a tty and whether another process holds its lock; closed at once."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        broken = p.is_symlink()
        hint = ("check the cable and `ls -l /dev/serial/by-id/` (the name carries the "
                "device's serial number)" if "/by-id/" in path else "check the cable")
        return Access(False, problem="missing" + (" (a link to nothing)" if broken else ""),
                      hint=f"not present: {hint}")
    except OSError as exc:
        return Access(False, problem=f"cannot look at it ({exc.strerror or exc})")
    device = os.path.realpath(path)
    char = stat.S_ISCHR(mode)
    read_write = os.access(path, os.R_OK | os.W_OK)
    if not char:
        return Access(True, device, False, False, read_write, problem="not a tty",
                      hint="not a character device: give the serial port's path, e.g. "
                           "/dev/serial/by-id/usb-... or /dev/ttyUSB0")
    if not open_it:
        return Access(True, device, True, None, read_write)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        return Access(True, device, True, None, False, problem="permission denied",
                      hint=f"the gateway's user needs read and write access: `ls -l "
                           f"{device}` (usually group dialout)")
    except OSError as exc:
        return Access(True, device, True, None, read_write,
                      problem=f"cannot open it ({exc.strerror or exc})")
    try:
        if not os.isatty(fd):
            return Access(True, device, True, False, read_write, problem="not a tty",
                          hint="a character device but no serial port (e.g. /dev/null): "
                               "give the serial port's path")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = False
        except BlockingIOError:
            locked = True
        except OSError:
            locked = None
        return Access(True, device, True, True, read_write, locked)
    finally:
        os.close(fd)  # the lock, if taken, goes with it


@dataclass(frozen=True, slots=True)
class Holder:
    """A process with the port open: its pid, its name (``comm``; never its arguments,
    which may say anything) and whether it is the gateway's daemon."""

    pid: int
    name: str
    gateway: bool
    #: it also holds a pty master (/dev/ptmx): on a pty, the other end (a lab simulator)
    pty_master: bool = False


def holders_of(devices: Iterable[str], proc: Path = Path("/proc")) -> dict[str, list[Holder]]:
    """Which processes hold each of *devices* (real paths) open, from ``/proc/PID/fd``.
    Another user's processes are seen only by root: an empty list is not a proof."""
    wanted: dict[str, list[Holder]] = {d: [] for d in devices}
    if not wanted:
        return wanted
    me = os.getpid()
    try:
        pids = [int(e.name) for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return wanted
    for pid in pids:
        if pid == me:
            continue
        try:
            with os.scandir(proc / str(pid) / "fd") as fds:
                targets = {_readlink(fd.path) for fd in fds}
        except OSError:
            continue  # gone, or another user's
        hits = [d for d in wanted if d in targets and len(wanted[d]) < MAX_HOLDERS]
        if hits:
            holder = _holder(proc, pid, pty_master=PTMX in targets)
            for device in hits:
                wanted[device].append(holder)
    return wanted


def _readlink(path: str) -> str | None:
    try:
        return str(Path(path).readlink())
    except OSError:
        return None


def _holder(proc: Path, pid: int, *, pty_master: bool) -> Holder:
    try:
        name = (proc / str(pid) / "comm").read_text(errors="replace").strip()
    except OSError:
        name = "?"
    try:
        words = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        words = []
    texts = [w.decode(errors="replace") for w in words]
    gateway = (any(t.endswith(_DAEMON_WORDS[0]) for t in texts)
               and _DAEMON_WORDS[1] in texts)
    return Holder(pid, name, gateway, pty_master)


@dataclass
class Probe:
    """What the device behind a port said. ``handshake``: ``ok``, ``failed: <why>`` or
    ``n/a`` (a GNSS receiver has none); ``frames``/``errors``: valid and damaged frames
    (sentences and checksum errors for NMEA); ``nmea``: what a GNSS receiver sent."""

    handshake: str
    serial: str | None = None
    firmware: str | None = None
    protocol: int | None = None
    device_class: str | None = None
    frames: int = 0
    errors: int = 0
    bytes: int = 0
    nmea: dict[str, object] | None = None
    hint: str | None = None
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)


class ProbeError(Exception):
    """The port could not be opened for the probe (the message says why)."""


def _open(path: str, baudrate: int) -> serial.Serial:
    try:
        return serial.Serial(path, baudrate, timeout=0, exclusive=True)
    except (serial.SerialException, OSError, ValueError) as exc:
        text = str(exc)
        if "exclusively lock" in text or isinstance(exc, BlockingIOError) or \
                getattr(exc, "errno", None) == errno.EWOULDBLOCK:
            raise ProbeError("held by another process (its lock is taken)") from None
        raise ProbeError(f"cannot open it ({text})") from None


def probe_framed(path: str, baudrate: int, expected: DeviceClass | None, *,
                 timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Ask the device on *path* who it is (HELLO_REQ, HELLO, HELLO_ACK) as the daemon would,
    within *timeout_s*. Raises :class:`ProbeError` when the port cannot be opened."""
    start = time.monotonic()
    port = _open(path, baudrate)
    link = HostLink(lambda _serial: None, expected_class=expected)  # never ACKs an event
    sniffed = bytearray()
    received = 0
    outcome: Probe | None = None
    try:
        fd = port.fileno()
        link.connection_made(start)
        port.write(link.data_to_send())
        deadline = start + timeout_s
        while outcome is None and received < MAX_PROBE_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                break  # the device went away
            received += len(data)
            if len(sniffed) < SNIFF_BYTES:
                sniffed += data[: SNIFF_BYTES - len(sniffed)]
            events = link.receive_data(data, time.monotonic())
            answer = link.data_to_send()
            if answer:
                port.write(answer)  # HELLO_ACK (or a NAK of a damaged frame)
            for event in events:
                if isinstance(event, DeviceUp):
                    outcome = _hello_probe("ok", event.hello)
                elif isinstance(event, DeviceRejected):
                    outcome = _hello_probe(f"failed: refused ({_refusal(event, expected)})",
                                           event.hello)
                if outcome is not None:
                    break
        port.flush()
    except (serial.SerialException, OSError) as exc:
        outcome = Probe(f"failed: the port failed ({exc})")
    finally:
        with contextlib.suppress(serial.SerialException, OSError):
            port.close()
    if outcome is None:
        outcome = Probe(f"failed: no answer in {timeout_s:g} s ({received} bytes received)",
                        hint=_silence_hint(bytes(sniffed), received, baudrate))
    outcome.frames, outcome.errors = link.stats.frames_in, link.stats.bad_frames
    outcome.bytes = received
    outcome.elapsed_s = round(time.monotonic() - start, 2)
    return outcome


def _hello_probe(handshake: str, hello: Hello) -> Probe:
    try:
        label: str | None = DeviceClass(hello.device_class).label
    except ValueError:
        label = f"unknown class {hello.device_class}"
    return Probe(handshake, hello.serial, hello.firmware_text, hello.protocol_version, label)


def _refusal(event: DeviceRejected, expected: DeviceClass | None) -> str:
    result = event.result.name.lower().replace("_", " ")
    if expected is not None and event.result.name in ("WRONG_CLASS", "UNKNOWN_CLASS"):
        try:
            said = DeviceClass(event.hello.device_class).label
        except ValueError:
            said = f"class {event.hello.device_class}"
        return f"{result}: a {said} on a port configured for a {expected.label}"
    return result


def _silence_hint(sniffed: bytes, received: int, baudrate: int) -> str:
    if b"$GP" in sniffed or b"$GN" in sniffed or b"$GL" in sniffed:
        return ("it talks NMEA: a GNSS receiver is on this port; give its path to [gnss] "
                "and the device's to this entry")
    if received:
        return (f"bytes but no valid frame: check the speed (baudrate {baudrate}, the "
                "device's is usually 115200) and that this is a SmartCorr device")
    return ("silent: check that the device is powered and cabled, and that no other "
            "program reads the port")


def probe_nmea(path: str, baudrate: int, *, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Listen to the GNSS receiver on *path* until it gives a fix or *timeout_s* passes.
    What it reports: sentence counts, the fix's quality, satellites and HDOP; never the
    position. Raises :class:`ProbeError` when the port cannot be opened."""
    start = time.monotonic()
    port = _open(path, baudrate)
    reader = NmeaReader()
    received = 0
    fix: Fix | None = None
    try:
        fd = port.fileno()
        deadline = start + timeout_s
        while fix is None and received < MAX_PROBE_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                break
            received += len(data)
            for event in reader.feed(data, time.monotonic_ns()):
                if isinstance(event, Fix):
                    fix = event
    except (serial.SerialException, OSError) as exc:
        return Probe(f"failed: the port failed ({exc})", bytes=received)
    finally:
        with contextlib.suppress(serial.SerialException, OSError):
            port.close()
    stats = reader.stats
    nmea: dict[str, object] = {
        "sentences": stats.sentences_ok, "checksum_errors": stats.checksum_errors,
        "talkers": sorted(stats.by_talker), "types": sorted(stats.by_type),
        "fix": fix is not None,
        "sats": None if fix is None else fix.sats,
        "hdop": None if fix is None or fix.hdop_c is None else fix.hdop_c / 100,
    }
    out = Probe("n/a", frames=stats.sentences_ok,
                errors=stats.checksum_errors + stats.rejected, bytes=received, nmea=nmea,
                elapsed_s=round(time.monotonic() - start, 2))
    if not stats.sentences_ok:
        out.problems.append(f"no NMEA sentence in {timeout_s:g} s ({received} bytes received)")
        out.hint = (f"check the speed (baudrate {baudrate}; receivers use 9600 or 38400 or "
                    "more) and the cable" if received else
                    "silent: check that the receiver is powered and cabled")
    elif fix is None:
        out.hint = "no fix yet: the antenna may need a view of the sky (a fix is not needed " \
                   "to run, but the gateway.moved check waits for one)"
    return out


# -- the report of `diag ports` -------------------------------------------------------------------
#: Keys of the ports report that are not a configured port's name.
REPORT_KEYS = frozenset({"daemon", "by_id", "ok", "problems", "warnings"})


@dataclass(frozen=True, slots=True)
class Configured:
    """A port of the configuration: its name (``[[devices]] name``, or ``gnss``), its role,
    path and speed, and the device class a framed device must say it is."""

    name: str
    role: str
    path: str
    baudrate: int
    expected: DeviceClass | None


@dataclass(frozen=True, slots=True)
class DaemonView:
    """What the daemon's state file says: running (None: the state could not be read), a
    summary for the report, and its ``devices`` rows."""

    running: bool | None
    summary: dict[str, object]
    devices: list[dict[str, object]]
    #: the state's ``gnss`` section (fix, satellites, HDOP; never a position)
    gnss: dict[str, object] = field(default_factory=dict)

    def device(self, port: Configured) -> dict[str, object] | None:
        """The running daemon's row for *port*: by name, else by path (older daemons)."""
        if not self.running:
            return None
        for row in self.devices:
            if row.get("name") == port.name:
                return row
        return next((row for row in self.devices if row.get("port") == port.path), None)


@dataclass
class PortEntry:
    """One configured port in the report (:meth:`to_json`)."""

    port: Configured
    access: Access
    holders: list[Holder]
    by_id: str | None = None
    held_by_gateway: bool = False
    source: str | None = None  # "daemon" (its state), "probe", or None
    handshake: object = None
    serial: object = None
    firmware: object = None
    frames: object = None
    errors: object = None
    last_heard_ms: object = None
    probe: Probe | None = None
    nmea: dict[str, object] | None = None
    hint: str | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wants_probe: bool = False

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "role": self.port.role, "path": self.port.path, "exists": self.access.exists,
            "device": self.access.device, "by_id": self.by_id,
            # a port the gateway holds is a tty: it configured it
            "tty": True if self.access.tty is None and self.held_by_gateway else self.access.tty,
            "read_write": self.access.read_write, "held_by_gateway": self.held_by_gateway,
            "open_by": [_holder_text(self, h) for h in self.holders],
            "source": self.source, "handshake": self.handshake, "serial": self.serial,
            "firmware": self.firmware, "frames": self.frames, "errors": self.errors,
            "last_heard_ms": self.last_heard_ms,
        }
        if self.probe is not None:
            out.update(protocol=self.probe.protocol, device_class=self.probe.device_class,
                       bytes=self.probe.bytes, probe_s=self.probe.elapsed_s)
        if self.nmea is not None:
            out["nmea"] = self.nmea
        if self.hint:
            out["hint"] = self.hint
        out["problems"], out["warnings"] = self.problems, self.warnings
        return out


def _holder_text(entry: PortEntry, holder: Holder) -> str:
    what = ("the gateway" if holder.gateway else
            "the pty's other end" if _other_end(entry, holder) else None)
    return f"pid {holder.pid} ({holder.name}{', ' + what if what else ''})"


def ports_report(ports: list[Configured], daemon: DaemonView, *, probe: bool,
                 timeout_s: float = PROBE_TIMEOUT_S,
                 by_id_dir: Path = BY_ID_DIR) -> dict[str, object]:
    """Every configured port (under its name), the ``by_id`` listing, the ``daemon``, and
    ``problems`` (what keeps the gateway from a device: ``diag ports`` exits 1) and
    ``warnings``. With *probe*, a port that no process holds locked is probed (all at once)."""
    by_id = list_by_id(by_id_dir)
    rows = {p.name: daemon.device(p) for p in ports}
    access = {p.name: check_access(p.path, open_it=not _held(rows[p.name])) for p in ports}
    devices = {a.device for a in access.values() if a.device and a.tty is not False}
    devices |= {e.device for e in by_id or [] if e.device}
    held = holders_of(devices)
    entries = {p.name: _entry(PortEntry(p, access[p.name], held.get(access[p.name].device or "",
                                                                     [])), rows[p.name], daemon)
               for p in ports}
    for entry in entries.values():
        entry.by_id = next((e.name for e in by_id or [] if entry.access.device
                            and e.device == entry.access.device), None)
    chosen = [e for e in entries.values() if e.wants_probe] if probe else []
    for entry, result in zip(chosen, _probe_all([e.port for e in chosen], timeout_s),
                             strict=True):
        _add_probe(entry, result)
    out: dict[str, object] = {
        (name if name not in REPORT_KEYS else f"{name} (port)"): entry.to_json()
        for name, entry in entries.items()}
    problems = [f"{n}: {p}" for n, e in entries.items() for p in e.problems]
    out["daemon"] = daemon.summary
    out["by_id"] = None if by_id is None else [
        _by_id_json(e, list(entries.values()), held) for e in by_id]
    out["ok"] = not problems
    out["problems"] = problems
    out["warnings"] = [f"{n}: {w}" for n, e in entries.items() for w in e.warnings]
    return out


def _held(row: dict[str, object] | None) -> bool:
    return bool(row and row.get("held"))


def _entry(entry: PortEntry, row: dict[str, object] | None, daemon: DaemonView) -> PortEntry:
    """What is known of a port without probing it: its access, and the daemon's view."""
    access = entry.access
    entry.hint = access.hint
    if access.problem:
        entry.problems.append(access.problem + (f": {access.hint}" if access.hint else ""))
    if daemon.running:
        entry.source = "daemon"
        if row is None:
            entry.warnings.append("the running gateway does not report this port (an older "
                                  "version, or another configuration): not probed")
            return entry
        entry.held_by_gateway = bool(row.get("held"))
        entry.handshake, entry.serial = row.get("handshake"), row.get("serial")
        entry.firmware, entry.frames = row.get("firmware"), row.get("frames")
        entry.errors, entry.last_heard_ms = row.get("errors"), row.get("last_heard_ms")
        if entry.port.role == "gnss" and daemon.gnss:
            entry.nmea = {k: daemon.gnss.get(k) for k in ("fix", "sats", "hdop")} | {
                "sentences": row.get("frames")}
        handshake = str(row.get("handshake") or "")
        if not access.exists:
            pass  # said above; the daemon keeps retrying
        elif handshake.startswith("failed"):
            entry.problems.append(f"handshake {handshake}")
        elif not row.get("held"):
            entry.warnings.append("the running gateway has not opened it yet (it retries "
                                  "with backoff): its log says why")
        elif handshake == "pending":
            entry.warnings.append("the device has not answered the gateway's handshake yet")
        return entry
    if not access.exists or access.problem:
        return entry
    gateways = [h for h in entry.holders if h.gateway]
    others = [h for h in entry.holders if not h.gateway and not _other_end(entry, h)]
    if gateways:
        entry.held_by_gateway = True
        entry.warnings.append(f"held by a gateway process (pid {gateways[0].pid}) that writes "
                              "no state here (another configuration's runtime_dir, or an "
                              "older version): not probed")
    elif access.locked and daemon.running is None:
        entry.warnings.append("held locked by a process: the gateway's, if it runs (its "
                              "state could not be read): not probed" + _open_in(others))
    elif access.locked:
        entry.problems.append("held by another process (its lock is taken): the gateway "
                              "cannot open it while it is" + _open_in(others))
    else:
        entry.wants_probe = True
        if others:
            entry.warnings.append(f"also open in {_names(others)}: a program reading it "
                                  "takes bytes from the gateway")
    return entry


def _other_end(entry: PortEntry, holder: Holder) -> bool:
    """*holder* is the pty's other end (a simulator holds both sides of its pty)."""
    return holder.pty_master and (entry.access.device or "").startswith("/dev/pts/")


def _names(holders: list[Holder]) -> str:
    return ", ".join(f"pid {h.pid} ({h.name})" for h in holders)


def _open_in(holders: list[Holder]) -> str:
    return f"; open in {_names(holders)}" if holders else ""


def _probe_all(ports: list[Configured], timeout_s: float) -> list[Probe | ProbeError]:
    """Probe *ports* at once, a thread each (a few ports, a few seconds at most)."""
    results: list[Probe | ProbeError] = [ProbeError("not probed")] * len(ports)

    def run(index: int, port: Configured) -> None:
        try:
            if port.role == "gnss":
                results[index] = probe_nmea(port.path, port.baudrate, timeout_s=timeout_s)
            else:
                results[index] = probe_framed(port.path, port.baudrate, port.expected,
                                              timeout_s=timeout_s)
        except ProbeError as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, p), name=f"probe-{p.name}", daemon=True)
               for i, p in enumerate(ports)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 5.0)
    return results


def _add_probe(entry: PortEntry, result: Probe | ProbeError) -> None:
    entry.source = "probe"
    if isinstance(result, ProbeError):
        entry.handshake = f"failed: {result}"
        entry.problems.append(str(result))
        return
    entry.probe, entry.nmea = result, result.nmea
    entry.handshake, entry.serial, entry.firmware = (result.handshake, result.serial,
                                                      result.firmware)
    entry.frames, entry.errors = result.frames, result.errors
    entry.hint = result.hint or entry.hint
    why = f": {result.hint}" if result.hint else ""
    if result.handshake.startswith("failed"):
        entry.problems.append(f"handshake {result.handshake}{why}")
    entry.problems.extend(p + why for p in result.problems)


def _by_id_json(link: ByIdEntry, entries: list[PortEntry], held: dict[str, list[Holder]]
                ) -> dict[str, object]:
    mine = [e for e in entries if link.device and e.access.device == link.device]
    holders = held.get(link.device or "", [])
    return {
        "name": link.name, "device": link.device, "role_guess": link.role,
        "configured_as": [e.port.name for e in mine],
        "held_by_gateway": any(e.held_by_gateway for e in mine) or any(h.gateway
                                                                       for h in holders),
        "open_by": [f"pid {h.pid} ({h.name})" for h in holders],
    }
