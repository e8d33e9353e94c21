"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``), without a dependency.

The daemon says READY=1 once its pipeline runs, pings WATCHDOG=1 only while its
threads are alive (a wedged writer gets the unit restarted), and STOPPING=1 when
it drains. Its STATUS= (the ``Status:`` line of ``systemctl status``) says where the
uplink stands, updated at each change (:class:`ServiceStatus`): "running" alone hid
an uplink that had not sent a record for hours. Outside systemd (no
``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import threading


def notify(state: str) -> bool:
    """Send *state* (e.g. ``"READY=1"``) to the service manager; False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd set for us (ping at least that often), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class ServiceStatus:
    """The STATUS= systemd shows: ``gateway <id> running; uplink <state>``. The uplink's
    thread reports each change of its state, the daemon says READY=1 with the state of
    that moment; one lock keeps the last word the newest."""

    def __init__(self, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self._uplink = "starting"
        self._lock = threading.Lock()
        self._deferred = False  # STATUS= waits for READY=1 (:meth:`defer_until_ready`)

    def line(self) -> str:
        return f"gateway {self.gateway_id} running; uplink {self._uplink}"

    def uplink(self, state: str) -> None:
        """The uplink in words (``connected``, ``down since 14:02 (TLS: unknown CA), 1,234
        queued``: app/state.py ``uplink_words``); sent when it changed."""
        with self._lock:
            if state == self._uplink:
                return
            self._uplink = state
            if not self._deferred:
                notify(f"STATUS={self.line()}")

    def ready(self) -> None:
        """READY=1, with the status as it stands."""
        with self._lock:
            notify(f"READY=1\nSTATUS={self.line()}")
            self._deferred = False

    def defer_until_ready(self) -> None:
        """Send no STATUS= before READY=1 (the daemon: READY comes first, with the state
        of that moment)."""
        with self._lock:
            self._deferred = True
