"""``gateway.py status``: the running daemon's state (app/state.py) for people, in an 80x24
SSH terminal: once, or live with ``--watch``.

The view is made of plain ASCII lines cut to the terminal's width; when the terminal is
short, the devices keep their rows and the tags and the last alarms share what is left,
each ending with "... N more" (``status --json`` has them all). ``--watch`` redraws it in
place with curses: it repaints only what changed (no flicker over a slow SSH link), learns
of a resize from the terminal (KEY_RESIZE), reads keys without echo (q quits) and puts the
terminal back as it was on any exit, Ctrl-C included. (Plain ANSI would mean redoing each
of these by hand: raw mode with termios, SIGWINCH, the alternate screen.) A daemon that
goes away is shown as such, and the view comes back when it does.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.state import (
    STALE_AFTER_MS,
    StateError,
    clock_time,
    daemon_alive,
    pid_exists,
    read_state,
    size_text,
    state_age_ms,
    wall_ms,
)
from uplink.failures import duration

#: ``gateway.py status`` exits with this when no daemon runs (systemd's "program is not
#: running" status, as ``systemctl status`` uses it).
EXIT_NOT_RUNNING = 3
DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.2, 60.0
UNIT = "smartcorr-gateway"
#: The width and height the view is made for.
WIDTH, HEIGHT = 80, 24
LABEL = 9  # the width of the left-hand labels ("Uplink   ")
#: The clock's sources in words; an offset from the system clock is shown from this, ms.
SOURCES = {"ntp": "NTP", "gnss": "GNSS", "rtc": "RTC"}
SHOW_OFFSET_MS = 50
#: The delivery classes, highest first (core.kinds.Priority).
CLASSES = ("alarm", "checkin", "status", "position", "heartbeat")


# -- not running --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NotRunning:
    """Why no daemon is shown: ``no_state``, ``stale`` (its process is gone) or ``wedged``
    (its process is there, its state is not rewritten)."""

    reason: str
    message: str
    written_at_ms: int | None = None
    pid: int | None = None

    def as_json(self, runtime_dir: Path) -> dict[str, Any]:
        return {"running": False, "reason": self.reason, "message": self.message,
                "runtime_dir": str(runtime_dir), "written_at_ms": self.written_at_ms,
                "pid": self.pid}


def not_running(state: dict[str, Any] | None, runtime_dir: Path,
                now_ms: int | None = None) -> NotRunning | None:
    """None when the daemon that wrote *state* runs; else why not, in one sentence."""
    now_ms = wall_ms() if now_ms is None else now_ms
    hint = f"systemctl status {UNIT}"
    if state is None:
        return NotRunning("no_state", f"the daemon is not running (no state in {runtime_dir}; "
                                      f"{hint})")
    if daemon_alive(state, now_ms):
        return None
    pid = state.get("pid") if isinstance(state.get("pid"), int) else None
    written = state.get("written_at_ms") if isinstance(state.get("written_at_ms"), int) \
        else None
    age = state_age_ms(state, now_ms)
    since = ("an unknown time" if written is None or age is None else
             f"{clock_time(written, seconds=True, now_ms=now_ms)} "
             f"({duration(max(0, age) * 1_000_000)} ago)")
    if pid is not None and pid > 0 and pid_exists(pid) and written is not None:
        return NotRunning("wedged", f"the daemon (process {pid}) has not written its state in "
                                    f"{runtime_dir} since {since}; it should every second: "
                                    f"it may be wedged; {hint}", written, pid)
    who = f", by process {pid}, which is gone" if pid is not None else ""
    return NotRunning("stale", f"the daemon is not running (its last state in {runtime_dir} "
                               f"was written at {since}{who}: it stopped without cleaning "
                               f"up, e.g. killed or a power cut; {hint})", written, pid)


# -- the view -----------------------------------------------------------------------------
def _get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, None where a key is missing (an older daemon) or not a dict."""
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _dict(state: dict[str, Any], key: str) -> dict[str, Any]:
    value = state.get(key)
    return value if isinstance(value, dict) else {}


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else "?"


def ago(ms: Any, now_ms: int) -> str:
    """``4s ago``, ``12m ago``, ``3h ago``, ``2d ago``; ``never`` for None."""
    if not isinstance(ms, int):
        return "never"
    s = max(0, (now_ms - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 3)] + "..."


def _line(label: str, text: str) -> str:
    return f"{label:<{LABEL}}{text}"


def _uplink(state: dict[str, Any], now_ms: int) -> str:
    up = _dict(state, "uplink")
    name = up.get("state") or "unknown"
    since = up.get("since_ms")
    queued = f", {_count(up.get('queued'))} queued" if up.get("queued") is not None else ""
    ack = f", last ack {ago(up['last_ack_ms'], now_ms)}" if up.get("last_ack_ms") else ""
    at = f" since {clock_time(since, now_ms=now_ms)}" if isinstance(since, int) else ""
    if name in ("retrying", "refused"):
        why = f" ({up['reason']})" if up.get("reason") else ""
        return _line("Uplink", f"DOWN{at}{why}{queued}{ack}")
    target = f" to {up['target']}" if up.get("target") else ""
    tls = "" if up.get("tls") is not False else " PLAINTEXT"
    return _line("Uplink", f"{name}{target}{tls}{at}{queued}{ack}")


def _queue(state: dict[str, Any]) -> str:
    by_class = _get(state, "uplink", "queued_by_class")
    if not isinstance(by_class, dict):
        return _line("Queue", "unknown")
    order = [k for k in CLASSES if k in by_class] + [k for k in by_class if k not in CLASSES]
    text = "  ".join(f"{k} {_count(by_class[k])}" for k in order)
    held, linger = _get(state, "uplink", "held"), _get(state, "uplink", "linger_s")
    if isinstance(held, int) and held > 0 and isinstance(linger, int | float):
        text += f"; {_count(held)} held up to {linger:g} s"  # waiting to share a message
    return _line("Queue", text)


def _clock_disk(state: dict[str, Any]) -> str:
    clock = _dict(state, "clock")
    source = clock.get("source")
    offset = clock.get("offset_ms")
    off = f", {offset:+,} ms" if isinstance(offset, int) and abs(offset) >= SHOW_OFFSET_MS \
        else ""
    text = (f"{SOURCES.get(str(source), str(source))}{off}" if clock.get("trusted") else
            "NOT synchronised" if source in ("none", None) else f"{source} (NOT trusted)")
    disk = _dict(state, "disk")
    store = disk.get("store_bytes")
    if isinstance(store, int):
        quota = disk.get("quota_bytes")
        free = disk.get("free_bytes")
        text = (f"{text:<28}Store {size_text(store)}"
                + (f" of {size_text(quota)}" if isinstance(quota, int) else "")
                + (f", {size_text(free)} free" if isinstance(free, int) else ""))
    return _line("Clock", text)


def _gnss(state: dict[str, Any], now_ms: int) -> str:
    gnss = state.get("gnss")
    if not isinstance(gnss, dict) or gnss.get("configured") is False:
        return _line("GNSS", "not configured")
    parts = ["fix" if gnss.get("fix") else "NO FIX"]
    if gnss.get("sats") is not None:
        parts.append(f"{gnss['sats']} sats")
    if gnss.get("hdop") is not None:
        parts.append(f"HDOP {gnss['hdop']:.1f}")
    if gnss.get("distance_from_installed_m") is not None:
        moved = " (MOVED)" if gnss.get("moved") else ""
        parts.append(f"{_count(gnss['distance_from_installed_m'])} m from installed{moved}")
    parts.append(f"last fix {ago(gnss.get('last_fix_ms'), now_ms)}")
    return _line("GNSS", ", ".join(parts))


#: The columns of the device rows (80 wide in all).
DEVICE_HEADER = (f"{'DEVICE':<13}{'PORT':<14}{'LINK':<10}{'SERIAL':<14}{'FW':<7}{'FRAMES':>7}"
                 f"{'ERR':>5} HEARD")


def _port_name(device: dict[str, Any], width: int = 13) -> str:
    """The configured port, short: ``ttyUSB0``; a /dev/serial/by-id name without its
    ``usb-`` and ``-if00-port0``, its end kept (the serial number): ``...TagRx_0001``."""
    port = device.get("port")
    if not isinstance(port, str):
        return "?"
    name = re.sub(r"-if\d+(-port\d+)?$", "", Path(port).name.removeprefix("usb-"))
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _device_row(device: dict[str, Any], now_ms: int) -> str:
    link = "closed" if device.get("held") is False else str(device.get("handshake") or "?")
    return (f"{_cut(str(device.get('role') or device.get('name') or '?'), 12):<13}"
            f"{_cut(_port_name(device), 13):<14}{_cut(link, 9):<10}"
            f"{_cut(str(device.get('serial') or '-'), 13):<14}"
            f"{_cut(str(device.get('firmware') or '-'), 6):<7}"
            f"{_cut(_count(device.get('frames')), 7):>7}{_cut(_count(device.get('errors')), 4):>5}"
            f" {ago(device.get('last_heard_ms'), now_ms)}")


def _tag_row(tag: dict[str, Any], now_ms: int) -> str:
    present = {True: "present", False: "ABSENT", None: "not heard"}.get(tag.get("present"), "?")
    rssi = f"{tag['rssi_dbm']} dBm" if isinstance(tag.get("rssi_dbm"), int) else "-"
    last = ago(tag.get("last_beacon_ms"), now_ms)
    return (f"{_cut(str(tag.get('tag') or '?'), 13):<14}{present:<10}{rssi:>8}"
            f"{_count(tag.get('beacons')):>10}  {last}")


def _alarm_row(alarm: dict[str, Any], now_ms: int) -> str:
    t = alarm.get("t_ms")
    when = clock_time(t, seconds=True, now_ms=now_ms) if isinstance(t, int) else "?"
    return f"{'#' + str(alarm.get('seq', '?')):<14}{_cut(str(alarm.get('kind')), 29):<30}{when}"


@dataclass
class Section:
    """A heading and rows; the rows that do not fit end with "... N more"."""

    heading: str | None
    rows: list[str]
    first: bool = False  # served before the others share what is left


def _fit(head: list[str], sections: list[Section], height: int | None) -> list[str]:
    """*head* then the sections, within *height* lines: the ``first`` sections take what
    they need, the others share what is left, one row each in turn."""
    headings = [s.heading for s in sections if s.heading is not None]
    if height is None:
        return head + [line for s in sections for line in
                       ([s.heading] if s.heading is not None else []) + s.rows]
    lines = head[:height]
    room = height - len(lines) - len(headings)
    if room < 0:
        return lines + headings[:max(0, height - len(lines))]
    shown = {id(s): 0 for s in sections}
    for s in sections:
        if s.first:
            shown[id(s)] = min(len(s.rows), room)
            room -= shown[id(s)]
    others = [s for s in sections if not s.first]
    while room > 0 and any(shown[id(s)] < len(s.rows) for s in others):
        for s in others:
            if room > 0 and shown[id(s)] < len(s.rows):
                shown[id(s)] += 1
                room -= 1
    for s in sections:
        if s.heading is not None:
            lines.append(s.heading)
        n = shown[id(s)]
        rows = s.rows[:n]
        if n < len(s.rows) and n > 0:
            rows[-1] = f"... {len(s.rows) - n + 1} more (status --json lists them)"
        lines.extend(rows)
    return lines


def render(state: dict[str, Any], *, width: int = WIDTH, height: int | None = HEIGHT,
           now_ms: int | None = None) -> list[str]:
    """The view of a running daemon's *state*: lines at most *width* long, at most *height*
    of them (None: as many as it takes)."""
    now_ms = wall_ms() if now_ms is None else now_ms
    started = state.get("started_at_ms")
    up = f"up {duration((now_ms - started) * 1_000_000)}" if isinstance(started, int) else ""
    phase = state.get("phase") or "running"
    title = (f"SmartCorr gateway {state.get('gateway_id') or '?'}  {phase}  pid "
             f"{state.get('pid') or '?'}  {up}  v{state.get('version') or '?'}")
    written = state.get("written_at_ms")
    stamp = clock_time(written, seconds=True, now_ms=now_ms) if isinstance(written, int) else ""
    title = f"{_cut(title, width - len(stamp) - 1):<{width - len(stamp)}}{stamp}"
    records = _dict(state, "records")
    head = [
        title,
        _uplink(state, now_ms),
        _queue(state),
        _line("Records", f"{_count(records.get('sealed'))} sealed, "
                         f"{_count(records.get('forwarded'))} forwarded since start"),
        _clock_disk(state),
        _gnss(state, now_ms),
    ]
    devices = [d for d in state.get("devices") or [] if isinstance(d, dict)]
    tags = [t for t in state.get("tags") or [] if isinstance(t, dict)]
    total = state.get("tags_total") if isinstance(state.get("tags_total"), int) else len(tags)
    present = sum(1 for t in tags if t.get("present") is True)
    absent = sum(1 for t in tags if t.get("present") is False)
    alarms = [a for a in state.get("last_alarms") or [] if isinstance(a, dict)]
    sections = [
        Section(DEVICE_HEADER, [_device_row(d, now_ms) for d in devices] or
                ["no device configured"], first=True),
        Section(f"{'TAG':<14}{'STATE':<10}{'RSSI':>8}{'BEACONS':>10}  LAST    "
                f"[{present}/{total} present, {absent} absent]",
                [_tag_row(t, now_ms) for t in tags] or ["no tag paired"]),
        Section(f"{'ALARM':<14}{'KIND':<30}TIME   (the last, newest first)",
                [_alarm_row(a, now_ms) for a in alarms] or ["none since the start"]),
    ]
    return [_cut(line, width).rstrip() for line in _fit(head, sections, height)]


def render_not_running(why: NotRunning, *, width: int = WIDTH) -> list[str]:
    words = why.message.split()
    lines, line = [], ""
    for word in words:  # wrapped to the width
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line, "", "waiting for it to start (q quits)"]


# -- the commands ---------------------------------------------------------------------------
def snapshot(runtime_dir: Path, now_ms: int | None = None
             ) -> tuple[dict[str, Any] | None, NotRunning | None]:
    """(the state, None) of a running daemon, or (what there is, why it is not running)."""
    state = read_state(runtime_dir)
    return state, not_running(state, runtime_dir, now_ms)


def screen(runtime_dir: Path, width: int, height: int,
           interval_s: float = DEFAULT_INTERVAL_S) -> list[str]:
    """What ``--watch`` shows now, in *width* x *height*."""
    try:
        state, why = snapshot(runtime_dir)
    except StateError as exc:
        return render_not_running(NotRunning("unreadable", str(exc)), width=width)[:height]
    if why is not None:
        return render_not_running(why, width=width)[:height]
    if state is None:  # pragma: no cover - not_running says so first
        return []
    footer = f"every {interval_s:g} s; q quits"
    lines = render(state, width=width, height=max(1, height - 1))
    return [*lines, *[""] * (height - 1 - len(lines)), footer]  # the footer at the bottom


def watch(runtime_dir: Path, interval_s: float) -> int:
    """Redraw the view every *interval_s* until q or Ctrl-C (exit 0)."""
    import curses

    def loop(scr: Any) -> None:
        with contextlib.suppress(curses.error):  # a terminal that cannot hide the cursor
            curses.curs_set(0)
        scr.timeout(max(1, int(interval_s * 1000)))
        repaint = True  # all of it: at the start, and after a resize (the terminal may
        while True:     # show again what it held in the area it gives back)
            height, width = scr.getmaxyx()
            # the last column is left alone (writing the bottom-right cell would scroll)
            lines = screen(runtime_dir, max(1, width - 1), height, interval_s)
            if repaint:
                scr.clear()
                repaint = False
            else:
                scr.erase()  # only what changed is sent
            for y, text in enumerate(lines[:height]):
                with contextlib.suppress(curses.error):
                    scr.addnstr(y, 0, text, max(0, width - 1))
            scr.refresh()
            key = scr.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == curses.KEY_RESIZE:
                curses.update_lines_cols()
                repaint = True

    # the size from the terminal itself, at each resize: LINES and COLUMNS in the
    # environment would hold the view at a size the terminal left
    for name in ("LINES", "COLUMNS"):
        os.environ.pop(name, None)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the terminal is put back
        curses.wrapper(loop)
    return 0


def check_interval(interval_s: float) -> str | None:
    """Why *interval_s* is not a usable ``--interval`` (None: it is)."""
    if not MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S:
        return (f"--interval {interval_s:g}: give {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} "
                "seconds (the daemon writes its state every second)")
    return None


def stale_note(state: dict[str, Any] | None) -> str | None:
    """A note when the state is older than a second or two but not yet stale."""
    age = None if state is None else state_age_ms(state)
    if age is not None and 2500 < age <= STALE_AFTER_MS:
        return f"the state is {age / 1000:.1f} s old (the daemon writes it every second)"
    return None


def lines_for_terminal(state: dict[str, Any], size: Sequence[int] | None) -> list[str]:
    """The one-shot view: cut to the terminal (*size*: columns, lines), or 80 columns and
    every line when the output is not a terminal."""
    if size is None:
        return render(state, width=WIDTH, height=None)
    columns, rows = size
    return render(state, width=max(40, columns), height=max(8, rows - 1))


__all__ = ["EXIT_NOT_RUNNING", "NotRunning", "check_interval", "lines_for_terminal",
           "not_running", "render", "render_not_running", "screen", "snapshot", "watch"]
