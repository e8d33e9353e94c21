"""A process that keeps running while a lab run goes on (a daemon, the broker, a
simulator): its output lines kept as they come, awaited by pattern. Shared by
lab/installer_flow.py and lab/technician_guide.py, which show real runs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

#: How long a wait for a line or an end lasts by default, seconds.
WAIT_S = 20.0


def isolated_env() -> dict[str, str]:
    """The environment of every command of a lab run: this one's, without what would
    reach outside it (a TPM, the machine's operator file, systemd's notify socket, an
    enclosing tmux, a PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SMARTCORR_TPM", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                        "PYTHONPATH", "TMUX")}
    env["SMARTCORR_OPERATOR_FILE"] = "/nonexistent/smartcorr-operator.json"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Background:
    """*argv* running in *cwd* (its own session), stdout and stderr read line by line."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: Path,
                 stdin: int | None = subprocess.DEVNULL) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(list(argv), stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                     start_new_session=True)
        self.lines: list[tuple[float, str, str]] = []  # (monotonic, stream, line)
        self._changed = threading.Condition()
        self._pumps = [threading.Thread(target=self._pump, args=(stream, name), daemon=True)
                       for stream, name in ((self.proc.stdout, "stdout"),
                                            (self.proc.stderr, "stderr"))]
        for pump in self._pumps:
            pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self, stream: TextIO | None, name: str) -> None:
        for line in stream or ():
            with self._changed:
                self.lines.append((time.monotonic(), name, line.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def mark(self) -> int:
        """Where the lines are now (a *since* for the next wait)."""
        with self._changed:
            return len(self.lines)

    def text(self, stream: str | None = None, since: int = 0) -> list[str]:
        with self._changed:
            return [line for _, s, line in self.lines[since:] if stream in (None, s)]

    def wait_line(self, pattern: str, timeout: float = WAIT_S, *, since: int = 0
                  ) -> tuple[float, str] | None:
        """The first line from *since* matching *pattern* (a regex) and when it came, or
        None once *timeout* passed or the process ended without it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for t, _, line in self.lines[since:]:
                    if rx.search(line):
                        return t, line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None
                                 and not any(p.is_alive() for p in self._pumps)):
                    return None
                self._changed.wait(min(left, 0.5))

    def wait_text(self, pattern: str, timeout: float = WAIT_S, *, since: int = 0
                  ) -> str | None:
        """:meth:`wait_line`'s line alone."""
        found = self.wait_line(pattern, timeout, since=since)
        return None if found is None else found[1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = WAIT_S) -> int:
        """Signal it (SIGKILL after *timeout*), wait for its end: its exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return self.ended(code)

    def ended(self, code: int | None = None) -> int:
        """The process ended (by itself, or :meth:`stop`): its output read to the end, its
        pipes closed; its exit code."""
        if code is None:
            code = self.proc.wait(WAIT_S)
        for pump in self._pumps:
            pump.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code
