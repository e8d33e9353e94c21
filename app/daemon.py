"""``gateway.py run``: the daemon, under systemd (``Type=notify``, ``WatchdogSec=``).

READY=1 once the pipeline runs; WATCHDOG=1 only while every pipeline thread
lives (a wedged thread gets the unit restarted); STOPPING=1 on SIGTERM, then
the queue is forwarded for a few seconds and every thread stopped.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

from app import systemd
from app.assembly import Gateway
from app.config import load_config
from provisioning.identity import load_identity

log = logging.getLogger("gateway")
#: How often the daemon logs its status line, seconds.
STATUS_INTERVAL_S = 60.0
#: How long a stopping daemon keeps forwarding what is queued, seconds.
STOP_DRAIN_S = 5.0


def run(config_path: Path) -> int:
    cfg = load_config(config_path)
    identity = load_identity(cfg.identity_path)
    gateway = Gateway(cfg, identity)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    gateway.start()
    log.warning("gateway %s running", identity.gateway_id)
    systemd.notify(f"READY=1\nSTATUS=gateway {identity.gateway_id} running")
    ping = systemd.watchdog_interval_s()
    next_status = 0.0
    while not stop.wait(min(ping or STATUS_INTERVAL_S, STATUS_INTERVAL_S)):
        if ping is not None and gateway.alive():
            systemd.notify("WATCHDOG=1")  # withheld if a thread died: systemd restarts us
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + STATUS_INTERVAL_S
            log.info("status %s", json.dumps(gateway.status()))
    systemd.notify("STOPPING=1\nSTATUS=draining")
    gateway.stop(drain_s=STOP_DRAIN_S)
    return 0
