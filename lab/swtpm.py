"""A software TPM 2.0 (swtpm) on loopback, for tests, the bench and the demo.

``Swtpm(state_dir)`` starts ``swtpm socket --tpm2`` with its state (seeds, NV) in
*state_dir*: the same directory is the same TPM after a restart (a reboot of the
gateway), another directory is another TPM (another gateway). The TCTI's control
channel is the command port + 1, as tpm2-tss's ``swtpm`` TCTI expects.

    python -m lab.swtpm --state /tmp/tpm     # runs one in the foreground, prints its TCTI
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from core.errors import UserError

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 10.0
#: How long one wait between connection attempts lasts (a wait on the process, so an
#: early exit is seen at once).
POLL_S = 0.005
STOP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 5


class SwtpmError(UserError):
    """swtpm is missing or did not start; the message says why and what to do."""


def swtpm_binary() -> str:
    found = shutil.which("swtpm")
    if found is None:
        raise SwtpmError("swtpm is not installed: 'bash scripts/setup.sh --test' installs it "
                         "(Debian packages swtpm, swtpm-tools)")
    return found


def free_port_pair() -> int:
    """A port P with P and P + 1 both free on loopback now (swtpm may still lose the race:
    :meth:`Swtpm.start` retries)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((HOST, 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((HOST, port + 1))
                except OSError:
                    continue
                return port
    raise SwtpmError("found no two adjacent free TCP ports on 127.0.0.1")


class Swtpm:
    """A running swtpm; a context manager: started on enter, stopped on exit."""

    def __init__(self, state_dir: Path, *, port: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self._fixed_port = port
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def tcti(self) -> str:
        """The TCTI string for tpm2-tss / :func:`provisioning.tpm.open_tpm`."""
        if self._process is None:
            raise SwtpmError("this swtpm is not running: start it first")
        return f"swtpm:host={HOST},port={self.port}"

    def start(self) -> Swtpm:
        """Start swtpm and return once it accepts connections (polled, with a deadline)."""
        binary = swtpm_binary()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        why = ""
        for _ in range(PORT_ATTEMPTS if self._fixed_port is None else 1):
            port = self._fixed_port or free_port_pair()
            why = self._try_start(binary, port)
            if not why:
                return self
            if "in use" not in why.lower():
                break
        raise SwtpmError(f"swtpm did not start (state {self.state_dir}): {why}")

    def _try_start(self, binary: str, port: int) -> str:
        """Start on *port*; '' once it answers, else why it did not (process reaped)."""
        log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open while swtpm runs
        process = subprocess.Popen(
            [binary, "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
             "--server", f"type=tcp,port={port},bindaddr={HOST}",
             "--ctrl", f"type=tcp,port={port + 1},bindaddr={HOST}",
             "--flags", "not-need-init,startup-clear"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                with socket.create_connection((HOST, port), timeout=POLL_S * 20):
                    pass
            except OSError:
                pass
            else:
                if process.poll() is None:
                    self._process, self._log, self.port = process, log, port
                    return ""
            try:
                process.wait(POLL_S)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    _stop(process)
                    log.close()
                    return f"no answer on port {port} within {STARTUP_TIMEOUT_S:.0f} s"
                continue
            log.seek(0)
            output = log.read().decode(errors="replace").strip()
            log.close()
            return f"exit status {process.returncode}: {output or 'no output'}"

    def stop(self) -> None:
        """Stop swtpm (terminate, wait; kill if it hangs); its state stays in state_dir."""
        if self._process is not None:
            _stop(self._process)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait(self) -> int:
        """Block until swtpm exits (the foreground command)."""
        if self._process is None:
            raise SwtpmError("this swtpm is not running")
        return self._process.wait()

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.swtpm",
        description="Run a software TPM 2.0 (swtpm) on 127.0.0.1 in the foreground and print "
                    "its TCTI (for provisioning.tpm.open_tpm or tpm2-tools' -T). The same "
                    "--state directory is the same TPM after a restart. Ctrl-C stops it.")
    parser.add_argument("--state", type=Path, required=True,
                        help="directory of the TPM's state (created if missing)")
    parser.add_argument("--port", type=int, default=None,
                        help="command port (control is port + 1); default: a free one")
    args = parser.parse_args(argv)
    # SIGTERM (systemd, kill) and SIGINT both stop swtpm through the context manager
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        with Swtpm(args.state, port=args.port) as tpm:
            print(tpm.tcti, flush=True)
            try:
                return tpm.wait()
            except KeyboardInterrupt:
                return 0
    except SwtpmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
