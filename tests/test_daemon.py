"""The daemon under a service manager: READY, watchdog pings, a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.identity import create_identity
from tests.helpers import plaintext_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_notify_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    create_identity(tmp_path / "identity", "gw-daemon-0001")
    cfg = plaintext_config(tmp_path, tmp_path / "identity", port=9)
    sock_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "gateway.py"), "run", "--config",
                             str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        messages = [server.recv(4096).decode()]
        assert messages[0].startswith("READY=1")
        messages.append(server.recv(4096).decode())
        while messages[-1].startswith("STATUS="):  # the uplink's state, at each change
            messages.append(server.recv(4096).decode())
        assert messages[-1] == "WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(server.recv(4096).decode())
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        server.close()
