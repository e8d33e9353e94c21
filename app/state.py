"""The running daemon's state, published for ``gateway.py status`` (and ``provision check``,
``diag ports``, ``provision range-test``): one JSON file, ``state.json``, rewritten once a
second in a runtime directory on tmpfs (``[paths] runtime_dir``, default
:data:`DEFAULT_RUNTIME_DIR`, systemd's ``RuntimeDirectory=smartcorr``), never on the SD
card. docs/status.md lists its keys (every key present, null when unknown; consumers
tolerate missing keys of older daemons).

- :func:`write_state`: atomic (a temporary file in the same directory, then a rename; no
  fsync: tmpfs, and a torn state is rewritten a second later), mode 0600.
- :func:`read_state`: None when there is no file; a :class:`StateError` saying what to do
  when it cannot be read.
- :func:`daemon_alive`: the pid exists and the state is at most :data:`STALE_AFTER_MS` old.
  A daemon killed (SIGKILL, power) leaves its last state behind: stale, so not running.
- :class:`StatePublisher`: the thread that writes it; it removes the file when the daemon
  stops cleanly. It reads the other threads' plain counters as they stand (no lock of
  theirs, no store query): what it costs is measured in :attr:`StatePublisher.stats`.
- :class:`UplinkTracker` and :func:`uplink_words`: the uplink's state with since when, in
  the words systemd's STATUS= and the view show: ``down since 14:02 (TLS: unknown CA),
  1,234 queued``.

No personal data: tags appear by the id they were paired with (as in ``list-tags``), the
GNSS position only as a distance from the installed one, alarms without their body.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.kinds import Priority
from core.record import SealedRecord
from uplink.failures import label

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_MODE = 0o600
#: The environment variable that moves the default runtime directory (a test session, a
#: second gateway on one machine); ``[paths] runtime_dir`` in the config wins over both.
RUNTIME_DIR_ENV = "SMARTCORR_RUNTIME_DIR"
DEFAULT_RUNTIME_DIR = Path(os.environ.get(RUNTIME_DIR_ENV) or "/run/smartcorr")
#: How often the state is written, seconds.
WRITE_INTERVAL_S = 1.0
#: A state older than this is a daemon that is not running (or wedged), ms.
STALE_AFTER_MS = 5000
#: Larger state files are refused when read (a tag list is bounded well below).
MAX_STATE_BYTES = 1 << 20
#: The last alarms kept (``last_alarms``).
MAX_ALARMS = 10
#: Records of the alarm class that are no alarm (``key.session``, ``key.rotate``,
#: ``key.encryption``...): they go first for the chain's and the keys' sake.
NOT_ALARMS_PREFIX = "key."
#: At most this many tags are listed (``tags_total`` counts them all).
MAX_TAGS = 64
#: Entries of /dev/serial/by-id looked at to name a port (a few per gateway).
MAX_BY_ID_ENTRIES = 64
BY_ID_DIR = Path("/dev/serial/by-id")
#: The uplink's states in which records do not leave.
DOWN_STATES = frozenset({"retrying", "refused"})
_NS_PER_MS = 1_000_000


class StateError(UserError):
    """The state file exists but cannot be used; the message says why and what to do."""


def wall_ms() -> int:
    return time.time_ns() // _NS_PER_MS


# -- the file -----------------------------------------------------------------------------
def write_state(runtime_dir: Path, state: Mapping[str, Any]) -> None:
    """Write *state* as ``runtime_dir/state.json`` atomically, mode 0600."""
    data = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    tmp = runtime_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 STATE_MODE)
    try:
        os.fchmod(fd, STATE_MODE)  # whatever the umask, or a left-over file's mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    tmp.replace(runtime_dir / STATE_FILE)


def read_state(runtime_dir: Path) -> dict[str, Any] | None:
    """The state in *runtime_dir*, or None when there is none."""
    path = runtime_dir / STATE_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise StateError(f"cannot read {path} (permission denied): it is the gateway's "
                         "alone (mode 600); run this as the gateway's user (sudo -u "
                         "smartcorr ...) or as root") from None
    except OSError as exc:
        raise StateError(f"cannot read {path} ({exc.strerror or exc})") from None
    try:
        data = os.read(fd, MAX_STATE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_STATE_BYTES:
        raise StateError(f"{path} is larger than {MAX_STATE_BYTES} bytes: not the gateway's "
                         "state file")
    try:
        state = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{path} is not valid JSON ({exc}): not the gateway's state file, "
                         "or the disk is full") from None
    if not isinstance(state, dict):
        raise StateError(f"{path} does not hold a JSON object: not the gateway's state file")
    return state


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (the gateway's, seen by a technician)
    except (OSError, OverflowError, ValueError):
        return False
    return True


def state_age_ms(state: Mapping[str, Any], now_ms: int | None = None) -> int | None:
    written = state.get("written_at_ms")
    if not isinstance(written, int) or isinstance(written, bool):
        return None
    return (wall_ms() if now_ms is None else now_ms) - written


def daemon_alive(state: Mapping[str, Any], now_ms: int | None = None) -> bool:
    """The daemon that wrote *state* runs: its pid exists and the state is at most
    :data:`STALE_AFTER_MS` old."""
    pid = state.get("pid")
    age = state_age_ms(state, now_ms)
    return (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
            and age is not None and age <= STALE_AFTER_MS and pid_exists(pid))


def remove_state(runtime_dir: Path, pid: int | None = None) -> bool:
    """Remove the state file, only if it is *pid*'s (default: this process's): another
    daemon's state is never removed. True when removed."""
    pid = os.getpid() if pid is None else pid
    try:
        state = read_state(runtime_dir)
    except StateError:
        return False
    if state is None or state.get("pid") != pid:
        return False
    with contextlib.suppress(FileNotFoundError):
        (runtime_dir / STATE_FILE).unlink()
    return True


def prepare_runtime_dir(runtime_dir: Path) -> None:
    """Create *runtime_dir* when missing (0700; systemd creates /run/smartcorr itself)."""
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


# -- what goes in it ----------------------------------------------------------------------
def wall_of(mono_ns: int | None, now_mono_ns: int, now_ms: int) -> int | None:
    """The wall-clock time (ms) of an instant given on the monotonic clock."""
    if mono_ns is None:
        return None
    return now_ms - (now_mono_ns - mono_ns) // _NS_PER_MS


def serial_by_id(path: str) -> str | None:
    """The /dev/serial/by-id name of the serial port *path* (itself such a link, or the
    device one points to), or None when there is none (not plugged in, not USB)."""
    port = Path(path)
    try:
        real = port.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if port.parent == BY_ID_DIR:
        return port.name
    try:
        with os.scandir(BY_ID_DIR) as entries:
            for count, entry in enumerate(entries):
                if count >= MAX_BY_ID_ENTRIES:
                    break
                with contextlib.suppress(OSError, RuntimeError):
                    if Path(entry.path).resolve(strict=True) == real:
                        return entry.name
    except OSError:
        return None
    return None


class AlarmLog:
    """The last :data:`MAX_ALARMS` alarm-class records committed: seq, kind and time,
    never the body. Fed on the store writer's thread (a deque append), read by the state
    thread; the time is read from the record there, at most once each."""

    def __init__(self, maxlen: int = MAX_ALARMS) -> None:
        self._records: deque[SealedRecord] = deque(maxlen=maxlen)
        self._times: dict[int, int | None] = {}  # seq -> t, for what _records holds

    def committed(self, records: list[SealedRecord]) -> None:
        """A group was committed (``StoreWriter.on_commit``): keep its alarms (the deque
        keeps the last of them)."""
        for rec in records:
            if rec.priority is Priority.ALARM and not rec.kind.startswith(NOT_ALARMS_PREFIX):
                self._records.append(rec)

    def entries(self) -> list[dict[str, Any]]:
        """Newest first."""
        records = list(self._records)
        times = {}
        for rec in records:
            if rec.seq not in self._times:
                self._times[rec.seq] = _record_time(rec.data)
            times[rec.seq] = self._times[rec.seq]
        self._times = times  # bounded by what the deque holds
        return [{"seq": r.seq, "kind": r.kind, "t_ms": times[r.seq]} for r in reversed(records)]


def _record_time(data: bytes) -> int | None:
    try:
        t = json.loads(data).get("t")
    except (ValueError, AttributeError):
        return None
    return t if isinstance(t, int) else None


# -- the uplink in words ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UplinkNow:
    """The uplink's state: ``connected``, ``connecting``, ``retrying``, ``refused`` or
    ``disabled``; the reason's code (``broker_untrusted``, or a refusal's codes) and words
    (``TLS: unknown CA``); since when (wall ms) it is in this state (down: since it went
    down, whatever the reasons meanwhile)."""

    state: str
    code: str | None
    reason: str | None
    since_ms: int


class UplinkTracker:
    """Fed the forwarder's state (``connected``, ``retrying: dns``, ``refused: expired``...,
    on its thread); read by the state thread and the health record."""

    def __init__(self, now_ms: Callable[[], int] = wall_ms) -> None:
        self._now_ms = now_ms
        self._lock = threading.Lock()
        self._now = UplinkNow("connecting", None, None, now_ms())

    def update(self, text: str) -> UplinkNow:
        name, _, code = text.partition(": ")
        name = "connecting" if name == "starting" else name
        with self._lock:
            old = self._now
            connected, was = name == "connected", old.state == "connected"
            since = old.since_ms if connected == was else self._now_ms()
            self._now = UplinkNow(name, code or None, label(code) if code else None, since)
            return self._now

    @property
    def now(self) -> UplinkNow:
        return self._now


def uplink_words(now: UplinkNow, queued: int | None) -> str:
    """The uplink for people: ``connected``, ``connecting``, ``down since 14:02 (TLS:
    unknown CA), 1,234 queued`` (local time; with the date when not today)."""
    if now.state not in DOWN_STATES:
        return now.state
    why = f" ({now.reason})" if now.reason else ""
    count = "" if queued is None else f", {queued:,} queued"
    return f"down since {clock_time(now.since_ms)}{why}{count}"


def size_text(n: int) -> str:
    """Bytes for people: ``512 B``, ``12.3 kB``, ``1.2 MB``, ``3.4 GB``."""
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            return f"{n} B" if n < 1000 else f"{value:.1f} {unit}"
    return f"{n} B"  # pragma: no cover


def clock_time(ms: int, *, seconds: bool = False, now_ms: int | None = None) -> str:
    """*ms* as local time: ``14:02`` (``14:02:07`` with *seconds*); ``3 Mar 14:02`` when not
    today."""
    when = time.localtime(ms / 1000)
    today = time.localtime((wall_ms() if now_ms is None else now_ms) / 1000)
    text = time.strftime("%H:%M:%S" if seconds else "%H:%M", when)
    if (when.tm_year, when.tm_yday) != (today.tm_year, today.tm_yday):
        text = f"{when.tm_mday} {time.strftime('%b', when)} {text}"
    return text


# -- the writer thread ----------------------------------------------------------------------
@dataclass
class PublisherStats:
    """Counters of the state thread (plain values): what publishing costs."""

    writes: int = 0
    failures: int = 0
    last_us: int = 0  # the last snapshot and write, microseconds
    max_us: int = 0
    total_us: int = 0


class StatePublisher:
    """Writes ``snapshot()`` to ``runtime_dir/state.json`` every *interval_s* on its own
    thread, then calls *after* (e.g. systemd's STATUS=, refreshed with the queue); removes
    the file at :meth:`stop`. A failure to write is said once per cause (the pipeline goes
    on: the state is for people, the records are not in it)."""

    def __init__(self, runtime_dir: Path, snapshot: Callable[[], dict[str, Any]], *,
                 interval_s: float | None = None,
                 after: Callable[[], None] | None = None) -> None:
        self.runtime_dir = runtime_dir
        self._snapshot = snapshot
        self._interval_s = interval_s or WRITE_INTERVAL_S  # read here: tests scale it
        self._after = after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state", daemon=True)
        self._said: set[str] = set()  # causes of failure said (bounded: errno names)
        self.stats = PublisherStats()

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, *, remove: bool = True) -> None:
        """Stop writing; remove the file (if it is this process's) unless *remove* is false."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5.0)
        if remove:
            remove_state(self.runtime_dir)

    def publish(self) -> bool:
        """One snapshot written now; False when it could not be."""
        start = time.perf_counter_ns()
        try:
            state = self._snapshot()
            prepare_runtime_dir(self.runtime_dir)
            write_state(self.runtime_dir, state)
        except OSError as exc:
            self.stats.failures += 1
            cause = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            if cause not in self._said:
                self._said.add(cause)
                log.warning("cannot write the state for 'gateway.py status' in %s (%s): give "
                            "[paths] runtime_dir a directory on tmpfs the gateway may write "
                            "(systemd: RuntimeDirectory=smartcorr); the gateway goes on",
                            self.runtime_dir, exc.strerror or exc)
            return False
        except Exception:  # a bug in the snapshot must not stop the thread, nor flood
            self.stats.failures += 1
            if "snapshot" not in self._said:
                self._said.add("snapshot")
                log.exception("the state for 'gateway.py status' could not be made")
            return False
        spent = (time.perf_counter_ns() - start) // 1000
        stats = self.stats
        stats.writes += 1
        stats.last_us, stats.total_us = spent, stats.total_us + spent
        stats.max_us = max(stats.max_us, spent)
        if self._said:
            log.info("the state for 'gateway.py status' is written again in %s",
                     self.runtime_dir)
            self._said.clear()
        return True

    def _run(self) -> None:
        deadline = time.monotonic()
        while True:
            self.publish()
            if self._after is not None:
                try:
                    self._after()
                except Exception:
                    log.exception("after publishing the state")
            deadline = max(deadline + self._interval_s, time.monotonic())
            if self._stop.wait(max(0.0, deadline - time.monotonic())):
                return
