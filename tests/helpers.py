"""Small helpers for tests that watch other threads and processes."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

_tick = threading.Event()


def stop_daemon(proc: subprocess.Popen[str], timeout: float, err: list[str],
                pump: threading.Thread) -> int:
    """SIGTERM *proc* and its exit status within *timeout* (then *pump*, the thread that
    collects its stderr into *err*, is joined); if it does not stop, SIGABRT (a process
    started with ``PYTHONFAULTHANDLER=1`` writes every thread's stack on its stderr), then
    SIGKILL, and fail with what it said: a daemon that hangs at its stop is reaped here
    instead of outliving its test and failing the next ones on that worker
    (ResourceWarning), and says where it hung."""
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        pump.join(5)  # its stderr's last lines: the stacks
        raise AssertionError(f"the daemon did not stop within {timeout:.0f} s of SIGTERM; "
                             "its last stderr lines (stacks after SIGABRT):\n"
                             + "".join(err[-80:])) from None
    pump.join(5)
    return status


def wait_for(condition: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    """Wait until *condition()* holds (state of another thread or process), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        _tick.wait(0.02)


def stored_records(db: Path, storage_key: bytes) -> list[bytes]:
    """Every record queued in the store *db*, decrypted, in delivery order."""
    from buffer.store import StoreReader
    from core.kinds import Priority

    reader = StoreReader(db, storage_key)
    out: list[bytes] = []
    cursors: dict[Priority, int] = {}
    try:
        while (batch := reader.next_batch(cursors, 1000, 1 << 30)) is not None:
            cursors[batch[0]] = batch[1][-1][0]
            out.extend(data for _, data in batch[1])
    finally:
        reader.close()
    return out


def plaintext_config(directory: Path, identity_dir: Path, *, host: str = "127.0.0.1",
                     port: int | None = None, extra: str = "") -> Path:
    """``directory/gateway.toml``: a gateway with *identity_dir*, ``directory/data``, its
    state in ``directory/run`` (never the machine's /run/smartcorr) and a plain-MQTT broker
    (a test bench: no broker need answer), then *extra* TOML."""
    cfg = directory / "gateway.toml"
    port_line = "" if port is None else f"port = {port}\n"
    cfg.write_text(f"""
[gateway]
identity_dir = "{identity_dir}"
data_dir = "{directory / 'data'}"
[paths]
runtime_dir = "{directory / 'run'}"
[broker]
host = "{host}"
{port_line}tls = false
insecure_plaintext = true
{extra}""")
    return cfg
