"""``python -m lab.simulators NAME``: one simulated device in a process of its own.

For a bench or a test that runs the real gateway (``gateway.py run``) against devices
that are not there: each simulator serves a pseudo-terminal (``--pty``; the gateway opens
its path with pyserial exactly as ``/dev/ttyUSB0``) or a real serial port (``--port
/dev/ttyUSB1``: a USB-serial adapter cross-wired to the one the gateway opens), prints the
path it serves as the first line of its standard output, and runs until SIGINT or SIGTERM
(or ``--duration``). ``--json`` adds one JSON status object a line on standard output;
without it a short status line goes to standard error every ``--status-every`` seconds.

* ``tag``: a tag receiver with paired ankle tags beaconing (AES-CMAC under the key of
  ``--key-file``, as given to ``provision pair-tag --key-file``), with tamper, spoofed and
  replayed beacons on request;
* ``kiosk``: a check-in kiosk: check-ins and its case opened and closed;
* ``gnss``: a GNSS receiver: a fix at a fixed place, or a real receiver's capture replayed
  (``--replay ../shared/data/nmea/ublox-8.log``).

The GPIO inputs simulator (``lab/simulators/gpio.py``) stands in for the kernel's line
descriptor inside the gateway's own process: it has no process of its own. The flooding
device of the bench is ``python -m lab.simulators.flood``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import serial

from core.devices import tag_ref
from core.stopping import StopFlag, stop_on_signals
from drivers.kiosk import KEY_BYTES, Method, Result
from firmware_bridge.messages import PROTOCOL_VERSION, WINDOW_LIMIT
from lab.simulators.device import FramedDeviceSim
from lab.simulators.gnss import CaptureError, GnssReplaySim, GnssSim, capture_epochs
from lab.simulators.kiosk import KioskSim
from lab.simulators.pty import PtySim, SerialEnd
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.wire import Damage

PROG = "python -m lab.simulators"
EXIT_USAGE = 2
#: The lab's tag and kiosk key when no --key-file is given: 16 zero bytes (pair the
#: device with a file of 32 zeros).
LAB_KEY = bytes(16)
#: Events a simulated device keeps unacknowledged at most (its flash): beyond it no new
#: event is made (counted as ``not_made``), so a device nobody reads stays bounded.
DEFAULT_MAX_QUEUED = 10_000
#: Largest key file read.
MAX_KEY_FILE_BYTES = 4096
#: Status lines, seconds apart: with --json, and without (to stderr).
STATUS_EVERY_JSON_S = 1.0
STATUS_EVERY_TEXT_S = 10.0
#: Where a fix is when neither --lat nor --lon is given (lab/site.py's town, not a home).
DEFAULT_LAT, DEFAULT_LON = 46.81, -71.21


class UsageError(Exception):
    """Bad options or an unusable port: one line saying what and how to fix it (exit 2)."""


# -- options ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, description="One simulated device in a process of its own.",
        epilog=f"'{PROG} NAME --help' lists the options of each. The first line of standard "
               "output is the path served; SIGINT or SIGTERM stops the device.")
    sub = ap.add_subparsers(dest="sim", metavar="NAME", required=True)
    tag = sub.add_parser(
        "tag", help="a tag receiver with ankle tags beaconing",
        description="A tag receiver (framed protocol, docs/serial-protocol.md) with paired "
                    "ankle tags beaconing; every beacon is signed with the tag's key and a "
                    "rolling counter.")
    _where(tag, 115200)
    _framed(tag, "TR-0001")
    tag.add_argument("--tag", action="append", metavar="REF", dest="tags",
                     help="a tag that beacons: T00001000, 0x1000 or 4096 (repeat for more; "
                          "default T00001000)")
    tag.add_argument("--key-file", metavar="FILE",
                     help="the tags' AES-128 key, 32 hex digits (the file given to 'provision "
                          "pair-tag --key-file'); default: 16 zero bytes (the lab key)")
    tag.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                     help="each tag beacons every S seconds (default 1)")
    tag.add_argument("--rssi", type=_int_range(-128, 0), default=-60, metavar="DBM",
                     help="the signal strength the receiver reports (default -60 dBm)")
    tag.add_argument("--battery", type=_int_range(0, 100), default=90, metavar="PCT",
                     help="the tags' battery (default 90 %%)")
    tag.add_argument("--strap-open", action="store_true",
                     help="tamper: the tags report their strap open (a tag.tamper alarm)")
    tag.add_argument("--no-body-contact", action="store_true",
                     help="the tags report no body contact (taken off)")
    tag.add_argument("--spoof-every", type=_int_range(0, 1 << 30), default=0, metavar="N",
                     help="every Nth beacon is forged (the right tag id, a wrong key): a "
                          "tag.spoof alarm at the gateway (default 0: never)")
    tag.add_argument("--replay-every", type=_int_range(0, 1 << 30), default=0, metavar="N",
                     help="every Nth beacon is an old one sent again (a replayed radio frame): "
                          "a tag.spoof alarm (default 0: never)")

    kiosk = sub.add_parser(
        "kiosk", help="a check-in kiosk: check-ins, its case opened and closed",
        description="A check-in kiosk (framed protocol, docs/kiosk.md): signed check-ins "
                    "and status changes.")
    _where(kiosk, 115200)
    _framed(kiosk, "KI-0001")
    kiosk.add_argument("--key-file", metavar="FILE",
                       help="the kiosk's AES-128 key, 32 hex digits (the file given to "
                            "'provision pair-kiosk --key-file'); default: 16 zero bytes")
    kiosk.add_argument("--checkin-every", type=_non_negative, default=10.0, metavar="S",
                       help="a check-in every S seconds (default 10; 0: none)")
    kiosk.add_argument("--person", default="P-000001", metavar="REF",
                       help="the (made-up) person reference of the check-ins "
                            "(default P-000001)")
    kiosk.add_argument("--method", choices=[m.label for m in Method], default="fingerprint",
                       help="how the person is identified (default fingerprint)")
    kiosk.add_argument("--result", choices=[r.label for r in Result], default="match",
                       help="the check-ins' outcome (default match)")
    kiosk.add_argument("--score", type=_int_range(0, 1000), default=960, metavar="PERMILLE",
                       help="the match score in thousandths (default 960)")
    kiosk.add_argument("--battery", type=_int_range(0, 100), default=100, metavar="PCT",
                       help="the kiosk's battery (default 100 %%)")
    kiosk.add_argument("--tamper-at", type=_non_negative, default=None, metavar="S",
                       help="open the kiosk's case S seconds after start (a tamper alarm)")
    kiosk.add_argument("--tamper-clear-at", type=_non_negative, default=None, metavar="S",
                       help="close it again S seconds after start")

    gnss = sub.add_parser(
        "gnss", help="a GNSS receiver: a fixed position, or a capture replayed",
        description="A GNSS receiver speaking NMEA 0183: RMC and GGA at a fixed position, "
                    "or the epochs of a real receiver's capture, one every --interval.")
    _where(gnss, 9600)
    gnss.add_argument("--lat", type=_float_range(-90, 90), default=None,
                      help=f"latitude of the fix, degrees (default {DEFAULT_LAT})")
    gnss.add_argument("--lon", type=_float_range(-180, 180), default=None,
                      help=f"longitude of the fix, degrees (default {DEFAULT_LON})")
    gnss.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                      help="a fix (or a replayed epoch) every S seconds (default 1)")
    gnss.add_argument("--replay", type=Path, metavar="CAPTURE",
                      help="replay a capture (a raw dump or a gpsd .log, e.g. "
                           "../shared/data/nmea/ublox-8.log) instead of the fixed position")
    gnss.add_argument("--loop", action="store_true",
                      help="with --replay: start again at its end (default: fall silent)")
    return ap


def _where(parser: argparse.ArgumentParser, baud: int) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true",
                       help="serve a new pseudo-terminal (its path is the first line printed)")
    where.add_argument("--port", metavar="DEV",
                       help="serve a real serial port, e.g. /dev/ttyUSB1 cross-wired to the "
                            "gateway's (bench tests)")
    parser.add_argument("--link", type=Path, metavar="PATH",
                        help="with --pty: also make PATH a symbolic link to it (a stable "
                             "name, as /dev/serial/by-id gives); removed at exit")
    parser.add_argument("--baud", type=_int_range(50, 4_000_000), default=baud, metavar="N",
                        help=f"with --port: its speed (default {baud})")
    parser.add_argument("--duration", type=_positive, default=None, metavar="S",
                        help="stop after S seconds (default: run until SIGINT or SIGTERM)")
    parser.add_argument("--json", action="store_true",
                        help="status as one JSON object a line on standard output (after the "
                             "path), every --status-every seconds and at exit")
    parser.add_argument("--status-every", type=_positive, default=None, metavar="S",
                        help=f"status every S seconds (default {STATUS_EVERY_JSON_S:g} with "
                             f"--json, else {STATUS_EVERY_TEXT_S:g} on standard error)")
    faults = parser.add_argument_group("wire faults (towards the gateway)")
    faults.add_argument("--bit-error-rate", type=_rate, default=0.0, metavar="P",
                        help="probability that a byte has one bit flipped (default 0)")
    faults.add_argument("--drop-rate", type=_rate, default=0.0, metavar="P",
                        help="probability that a byte is lost (default 0)")
    faults.add_argument("--garbage-rate", type=_rate, default=0.0, metavar="P",
                        help="probability that a write is preceded by random bytes (default 0)")
    faults.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the faults' random source (default 0: replayable)")


def _framed(parser: argparse.ArgumentParser, serial_default: str) -> None:
    parser.add_argument("--serial", default=serial_default,
                        help=f"the serial number its HELLO says (default {serial_default})")
    parser.add_argument("--firmware", type=_version, default=(1, 0, 0), metavar="X.Y.Z",
                        help="the firmware version its HELLO says (default 1.0.0)")
    parser.add_argument("--protocol", type=int, choices=(1, 2), default=PROTOCOL_VERSION,
                        help="the serial protocol version its HELLO says (default "
                             f"{PROTOCOL_VERSION}; 1: a device of the first version)")
    parser.add_argument("--window", type=_int_range(0, WINDOW_LIMIT), default=0, metavar="N",
                        help="version 2: offer the WINDOW feature, N DATA frames "
                             "unacknowledged (default 0: stop-and-wait)")
    parser.add_argument("--max-queued", type=_int_range(1, 10_000_000),
                        default=DEFAULT_MAX_QUEUED, metavar="N",
                        help="events kept unacknowledged at most (its flash); beyond, no new "
                             f"event is made and it is counted (default {DEFAULT_MAX_QUEUED})")


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str
             ) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: give {what}")
        return value
    return parse


_positive = _checked(float, lambda v: 0 < v < 1e9, "a number of seconds above 0")
_non_negative = _checked(float, lambda v: 0 <= v < 1e9, "a number of seconds, 0 or more")
_rate = _checked(float, lambda v: 0 <= v <= 1, "a probability from 0 to 1")


def _int_range(low: int, high: int) -> Callable[[str], Any]:
    return _checked(int, lambda v: low <= v <= high, f"a whole number from {low} to {high}")


def _float_range(low: float, high: float) -> Callable[[str], Any]:
    return _checked(float, lambda v: low <= v <= high, f"a number from {low:g} to {high:g}")


def _version(text: str) -> tuple[int, int, int]:
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give three numbers 0-255, e.g. 1.2.0")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _key(path: str | None) -> bytes:
    if path is None:
        return LAB_KEY
    try:
        with Path(path).open(encoding="ascii") as file:
            text = file.read(MAX_KEY_FILE_BYTES)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--key-file {path}: cannot read it ({exc})") from None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise UsageError(f"--key-file {path}: give the key as {2 * KEY_BYTES} hex digits "
                         "(the file given to 'provision pair-tag --key-file')")
    return key


def _tag_id(text: str) -> int:
    value = text.strip().upper()
    try:
        if value.startswith("T") and len(value) == 9:
            number = int(value[1:], 16)
        elif value.startswith("0X"):
            number = int(value, 16)
        else:
            number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= 0xFFFF_FFFF:
        raise UsageError(f"--tag {text}: give T + 8 hex digits, 0x... or a number below 2^32")
    return number


# -- running ------------------------------------------------------------------------------------
class Runner:
    """One simulator, its schedule of events and its status lines."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out, self.err = out, err
        self.stop = StopFlag()  # SIGTERM sets it: no lock in the handler
        self.started = time.monotonic()
        self.made = 0  # events made (beacons, check-ins, statuses; fixes or epochs)
        self.not_made = 0  # events not made: the device's flash was full
        self.spoofed = 0
        self.replayed = 0
        self._tag_turn = 0
        self._tamper_done: set[str] = set()
        faults = Damage(args.bit_error_rate, args.drop_rate, args.garbage_rate, seed=args.seed)
        end = self._end()
        link = args.link if args.pty else None
        self.sim: PtySim
        if args.sim == "tag":
            key = _key(args.key_file)
            ids = [_tag_id(text) for text in (args.tags or ["T00001000"])]
            self.tags = [SimTag(tag_id, key, battery_pct=args.battery,
                                strap_closed=not args.strap_open,
                                body_contact=not args.no_body_contact) for tag_id in ids]
            self.sim = TagReceiverSim(args.serial, tags=self.tags, link=link, to_host=faults,
                                      firmware=args.firmware, end=end,
                                      protocol_version=args.protocol, window=args.window)
        elif args.sim == "kiosk":
            self.sim = KioskSim(args.serial, key=_key(args.key_file), link=link,
                                battery_pct=args.battery, to_host=faults,
                                firmware=args.firmware, end=end,
                                protocol_version=args.protocol, window=args.window)
        elif args.replay is not None:
            try:
                epochs = capture_epochs(args.replay)
            except CaptureError as exc:
                if end is not None:
                    end.close()
                raise UsageError(f"--replay {exc}") from None
            self.sim = GnssReplaySim(epochs, period_s=args.interval, loop=args.loop, link=link,
                                     faults=faults, end=end)
        else:
            lat = DEFAULT_LAT if args.lat is None else args.lat
            lon = DEFAULT_LON if args.lon is None else args.lon
            self.sim = GnssSim(lat, lon, period_s=args.interval, link=link, faults=faults,
                               end=end)

    def _end(self) -> SerialEnd | None:
        if self.args.port is None:
            return None
        try:
            return SerialEnd(self.args.port, self.args.baud)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise UsageError(f"--port {self.args.port}: cannot open it ({exc}): check the path "
                             "('ls -l /dev/serial/by-id/'), that nothing else holds it, and that "
                             "you may use it (group dialout)") from None

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        self.sim.start()
        print(self.sim.path, file=self.out, flush=True)
        status_every = args.status_every or (STATUS_EVERY_JSON_S if args.json
                                             else STATUS_EVERY_TEXT_S)
        deadline = None if args.duration is None else self.started + args.duration
        next_event = self.started + self._event_interval() if self._event_interval() else None
        next_status = self.started + status_every
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if next_event is not None and now >= next_event:
                    self._event()
                    next_event += self._event_interval()
                    if next_event < now:  # fell behind (a suspended process): no burst
                        next_event = now + self._event_interval()
                self._scheduled(now - self.started)
                if now >= next_status:
                    self._status()
                    next_status += status_every
                due = [t for t in (deadline, next_event, next_status) if t is not None]
                if self.stop.wait(max(0.0, min(due) - time.monotonic())):
                    break
        finally:
            self.sim.stop()
            self._status(final=True)
            if args.link is not None and args.pty:
                with contextlib.suppress(OSError):
                    if args.link.is_symlink():
                        args.link.unlink()
        return 0

    def _event_interval(self) -> float:
        """Seconds between two events made by this process (0: none)."""
        args = self.args
        if args.sim == "tag":
            return float(args.interval) / len(self.tags)
        if args.sim == "kiosk":
            return float(args.checkin_every)
        return 0.0  # the GNSS simulators keep their own pace

    def _full(self) -> bool:
        """The device's flash is full (no new event); counted."""
        if isinstance(self.sim, FramedDeviceSim) and self.sim.queued() >= self.args.max_queued:
            self.not_made += 1
            return True
        return False

    def _event(self) -> None:
        if self._full():
            return
        args = self.args
        if isinstance(self.sim, TagReceiverSim):
            tag = self.tags[self._tag_turn % len(self.tags)]
            self._tag_turn += 1
            turn = self._tag_turn
            if args.spoof_every and turn % args.spoof_every == 0:
                self.sim.send_forged(tag)
                self.spoofed += 1
            elif args.replay_every and turn % args.replay_every == 0 and tag.history:
                self.sim.send_replay(tag, 0)
                self.replayed += 1
            else:
                self.sim.send_beacon(tag, args.rssi)
        elif isinstance(self.sim, KioskSim):
            self.sim.checkin(args.person, args.method, args.score, args.result)
        self.made += 1

    def _scheduled(self, elapsed: float) -> None:
        """The kiosk's case opened and closed at their times."""
        if not isinstance(self.sim, KioskSim):
            return
        for name, at, open_ in (("open", self.args.tamper_at, True),
                                ("close", self.args.tamper_clear_at, False)):
            if at is not None and elapsed >= at and name not in self._tamper_done:
                self._tamper_done.add(name)
                if not self._full():
                    self.sim.set_status(tamper=open_)
                    self.made += 1

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sim": self.args.sim, "path": self.sim.path,
            "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }
        if isinstance(self.sim, FramedDeviceSim):
            stats = self.sim.device.stats
            out.update(serial=self.args.serial, up=self.sim.device.up,
                       handshakes=stats.handshakes, made=self.made, sent=stats.sent,
                       acked=stats.acked, queued=self.sim.queued(),
                       retransmits=stats.retransmits, naks=stats.naks,
                       rejected_by_host=stats.rejected_by_host, not_made=self.not_made)
            if isinstance(self.sim, TagReceiverSim):
                out.update(tags=[tag_ref(t.tag_id) for t in self.tags], spoofed=self.spoofed,
                           replayed=self.replayed)
            self.sim.forget_acked()  # counted in stats.acked; the ids are not kept
        elif isinstance(self.sim, GnssReplaySim):
            out.update(epochs_sent=self.sim.sent_epochs, epochs=len(self.sim.epochs),
                       bytes_sent=self.sim.bytes_sent, finished=self.sim.finished)
        elif isinstance(self.sim, GnssSim):
            out.update(sentences=self.sim.sentences)
        return out

    def _status(self, final: bool = False) -> None:
        status = self.status()
        if final:
            status["stopped"] = True
        if self.args.json:
            print(json.dumps(status, sort_keys=True), file=self.out, flush=True)
            return
        if isinstance(self.sim, FramedDeviceSim):
            text = (f"{'up' if status['up'] else 'down (no handshake)'}, {status['made']} "
                    f"made, {status['acked']} acked, {status['queued']} queued, "
                    f"{status['retransmits']} retransmits"
                    + (f", {status['not_made']} not made (queue full)"
                       if status["not_made"] else ""))
        elif isinstance(self.sim, GnssReplaySim):
            text = (f"{status['epochs_sent']} epochs of {status['epochs']} sent"
                    + (" (finished)" if status["finished"] else ""))
        else:
            text = f"{status['sentences']} sentences sent"
        print(f"{self.args.sim}{' stopped' if final else ''}: {text}", file=self.err,
              flush=True)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)  # exit 2 with the usage on bad options
    if args.link is not None and not args.pty:
        print(f"{PROG} {args.sim}: --link goes with --pty (a real port has its own name)",
              file=err)
        return EXIT_USAGE
    try:
        runner = Runner(args, out, err)
    except UsageError as exc:
        print(f"{PROG} {args.sim}: {exc}", file=err)
        return EXIT_USAGE

    stop_on_signals(runner.stop)
    return runner.run()
