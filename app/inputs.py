"""The enclosure switch and mains power, read from GPIO lines on a thread of their own.

:class:`InputsWorker` owns the line-request descriptor (``drivers/gpio.py``) and the
sans-IO core (``drivers/inputs.py``). It waits with ``select`` on the descriptor and a
wake pipe, with the core's next debounce or budget deadline as the only timeout: no
polling. Readings go to ``submit`` (the store writer's); when the core decides the
gateway must power off, ``on_shutdown`` is called once, after the ``power.shutdown``
reading was submitted. :class:`PowerOff` is that callable for the gateway: it commits
what is queued, stops the gateway, and runs the shutdown command.

A chip that cannot be opened, or a descriptor that fails, is reopened with backoff; the
levels read on reopening are fed to the core as changes, so nothing is reported twice.
Bounded: the reader keeps less than one event of partial input, the core one state per
line; the kernel buffers :data:`drivers.gpio.EVENT_BUFFER_SIZE` events.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from app.config import DEFAULT_SHUTDOWN_COMMAND
from core.record import JSON, Reading
from drivers.gpio import EventReader, GpioError, read_levels, request_lines
from drivers.inputs import InputsCore, LineSpec

log = logging.getLogger(__name__)

REOPEN_MIN_S = 1.0
REOPEN_MAX_S = 30.0
JOIN_TIMEOUT_S = 5.0
#: How long the shutdown command may take before we stop waiting for it, seconds.
COMMAND_TIMEOUT_S = 60.0


@dataclass
class OpenedLines:
    """A line-request descriptor, the line name of each offset, and the levels read when
    it was opened (physical, 0/1). The worker closes *fd* when done with it."""

    fd: int
    names: Mapping[int, str]
    levels: Mapping[str, int]


def open_gpio(chip: str, lines: Mapping[str, LineSpec]) -> OpenedLines:
    """Request *lines* of *chip* (both edges, kernel debounce) and read their levels."""
    names = list(lines)
    fd = request_lines(chip, [lines[name].offset for name in names])
    try:
        levels = read_levels(fd, len(names))
    except GpioError:
        os.close(fd)
        raise
    return OpenedLines(fd, {lines[name].offset: name for name in names},
                       dict(zip(names, levels, strict=True)))


@dataclass
class WorkerStats:
    opens: int = 0
    open_failures: int = 0
    losses: int = 0  # the descriptor ended or failed and was reopened
    errors: int = 0  # exceptions of the core or of a callback (logged)
    unknown_event_ids: int = 0


class InputsWorker:
    """A thread that feeds the inputs core from GPIO lines (or from the lab's pipe)."""

    def __init__(self, core: InputsCore, open_lines: Callable[[], OpenedLines],
                 submit: Callable[[Reading], None], on_shutdown: Callable[[], None], *,
                 now_ns: Callable[[], int] = time.monotonic_ns,
                 reopen_min_s: float = REOPEN_MIN_S, reopen_max_s: float = REOPEN_MAX_S) -> None:
        self.core = core
        self._open_lines = open_lines
        self._submit = submit
        self._on_shutdown = on_shutdown
        self._now_ns = now_ns
        self._reopen = (reopen_min_s, reopen_max_s)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._shutdown_called = False
        self.stats = WorkerStats()
        self.opened = threading.Event()  # set while the lines are open
        self._thread = threading.Thread(target=self._run, name="inputs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Stop reading and close the lines (callable from any thread, its own included)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\x00")
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def health(self) -> dict[str, JSON]:
        """Counters and the debounced state, for the health record (read as they stand)."""
        out: dict[str, JSON] = dict(self.core.stats.as_dict())
        out.update(opens=self.stats.opens, open_failures=self.stats.open_failures,
                   losses=self.stats.losses, errors=self.stats.errors,
                   unknown_event_ids=self.stats.unknown_event_ids)
        out["state"] = dict(self.core.state())
        return out

    # -- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        delay, reported = self._reopen[0], False
        while not self._stop.is_set():
            try:
                lines = self._open_lines()
            except (OSError, ValueError) as exc:
                self.stats.open_failures += 1
                if not reported:
                    log.warning("inputs: cannot open the lines (%s); retrying with backoff", exc)
                    reported = True
                self._stop.wait(delay)
                delay = min(delay * 2, self._reopen[1])
                continue
            delay, reported = self._reopen[0], False
            self.stats.opens += 1
            self.opened.set()
            try:
                reason = self._serve(lines)
            finally:
                self.opened.clear()
                with contextlib.suppress(OSError):
                    os.close(lines.fd)
            if reason is not None:
                self.stats.losses += 1
                log.warning("inputs: %s; reopening", reason)
                self._stop.wait(delay)

    def _serve(self, lines: OpenedLines) -> str | None:
        """Feed the core until stopped (None) or the descriptor fails (the reason)."""
        now = self._now_ns()
        if self.stats.opens == 1:
            self._step(lambda: self.core.start(lines.levels, now))
        else:  # reopened: what changed meanwhile is a change like any other
            for name, level in lines.levels.items():
                self._step(functools.partial(self.core.on_level, name, level, now))
        reader = EventReader(lines.fd)
        while not self._stop.is_set():
            deadline = self.core.next_deadline_ns()
            timeout = None if deadline is None else max(0, deadline - self._now_ns()) / 1e9
            readable, _, _ = select.select([lines.fd, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            if lines.fd in readable:
                try:
                    events, ended = reader.read()
                except BlockingIOError:
                    events, ended = [], False
                except OSError as exc:
                    return f"reading the lines failed: {exc}"
                self.stats.unknown_event_ids = reader.unknown_ids
                for ev in events:
                    name = lines.names.get(ev.offset, f"offset:{ev.offset}")
                    self._step(functools.partial(self.core.on_level, name, ev.level,
                                                 ev.timestamp_ns))
                if ended:
                    return "the line descriptor ended"
            self._step(lambda: self.core.poll(self._now_ns()))
        return None

    def _step(self, fn: Callable[[], list[Reading]]) -> None:
        """Run one call of the core and pass on its readings; a failure of the core or of
        a callback is logged and counted, and reading goes on."""
        try:
            for reading in fn():
                self._submit(reading)
            if self.core.shutdown is not None and not self._shutdown_called:
                self._shutdown_called = True
                self._on_shutdown()
        except Exception:
            self.stats.errors += 1
            log.exception("inputs: error handling the lines")


class PowerOff:
    """The worker's ``on_shutdown``: on a thread of its own (the worker is among what it
    stops), wait until everything submitted (the ``power.shutdown`` record too) is
    committed, stop the gateway, then run the shutdown command (an argv list, never a
    shell). Runs once."""

    def __init__(self, flush: Callable[[], bool], stop_gateway: Callable[[], object],
                 command: Sequence[str] = DEFAULT_SHUTDOWN_COMMAND, *,
                 run: Callable[[list[str]], int] | None = None) -> None:
        self._flush = flush
        self._stop_gateway = stop_gateway
        self.command = list(command)
        self._run_command = run or _run
        self._started = threading.Lock()
        self.done = threading.Event()
        self.returncode: int | None = None

    def __call__(self) -> None:
        if self._started.acquire(blocking=False):
            threading.Thread(target=self._sequence, name="poweroff", daemon=True).start()

    def _sequence(self) -> None:
        try:
            if not self._flush():
                log.error("power off: the store did not confirm its last commits in time")
            self._stop_gateway()
            log.warning("power off: gateway stopped; running %s", self.command)
            self.returncode = self._run_command(self.command)
            if self.returncode != 0:
                log.error("power off: %s exited with %s: the gateway is stopped but the "
                          "system stays up", self.command, self.returncode)
        finally:
            self.done.set()


def _run(command: list[str]) -> int:
    try:
        return subprocess.run(command, check=False, timeout=COMMAND_TIMEOUT_S).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("power off: cannot run %s: %s", command, exc)  # noqa: TRY400 - no traceback
        return -1
