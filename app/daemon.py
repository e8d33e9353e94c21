"""``gateway.py run``: the daemon, under systemd (``Type=notify``, ``WatchdogSec=``).

READY=1 once the pipeline runs; WATCHDOG=1 only while every pipeline thread
lives (a wedged thread gets the unit restarted); STOPPING=1 on SIGTERM, then
the queue is forwarded for a few seconds and every thread stopped.

Before anything starts it checks what it can on its own: its umask (077: the store
and its -wal/-shm are the gateway's alone, whatever the service manager set), the
permissions of every key file (group or others may not read one: the start is
refused, as ssh refuses such a key), the data directory (created durably when
missing), the identity (an interrupted key rotation is completed or rolled back), and
the broker's host name (resolved once, a warning when it does not resolve; the uplink
keeps retrying). Plaintext MQTT (``insecure_plaintext = true``) is warned about loudly.

One daemon per configuration: before the identity or the store is touched it holds an
exclusive lock on ``data_dir/gateway.lock`` (``flock``, for its whole life; the file holds
its pid). A second daemon on the same data directory exits at once: two daemons would
seal two histories for the same seqs on one chain, which the platform counts as forgery.
The kernel drops the lock with the process (a crash, SIGKILL), so it is never stale.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from app import systemd
from app.assembly import VERSION, Gateway
from app.config import Config, ConfigError, load_config
from app.state import size_text
from core import durable
from core.errors import UserError
from core.stopping import StopFlag, stop_on_signals
from provisioning.decommission import EXIT_DECOMMISSIONED, check_not_decommissioned
from provisioning.identity import KEY, NEXT_KEY, STORAGE, load_identity, recover_identity
from provisioning.registry import REGISTRY_FILE, open_registry
from uplink.failures import duration

log = logging.getLogger("gateway")
#: The start and stop lines: INFO, and shown at the default verbosity too (see :func:`run`).
lifecycle = logging.getLogger("gateway.lifecycle")
#: How often the daemon logs its status line, seconds.
STATUS_INTERVAL_S = 60.0
#: How long a stopping daemon keeps forwarding what is queued, seconds.
STOP_DRAIN_S = 5.0
#: The daemon's own umask: what it creates (the store, its -wal/-shm) is its alone.
UMASK = 0o077
#: Permission bits a secret file must not have.
NOT_PRIVATE = stat.S_IRWXG | stat.S_IRWXO
#: Files of the identity directory holding secrets or personal data.
PRIVATE_IDENTITY_FILES = (KEY, STORAGE, NEXT_KEY, REGISTRY_FILE)
#: The daemon's lock in data_dir: held (flock) for the daemon's life, holding its pid.
LOCK_FILE = "gateway.lock"
LOCK_MODE = 0o600
#: The lock's file descriptor, kept open (never closed) while this process runs.
_held_lock: list[int] = []


class KeyFileError(UserError):
    """A key file is readable by others; the message names it and the fix."""


def check_private_files(cfg: Config) -> None:
    """Refuse to start when group or others may read a key (or the tag registry)."""
    paths = [cfg.identity_path / name for name in PRIVATE_IDENTITY_FILES]
    if cfg.broker.key_file is not None:
        paths.append(Path(cfg.broker.key_file))
    for path in paths:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue  # optional, or reported by whoever needs it
        if mode & NOT_PRIVATE:
            raise KeyFileError(
                f"{path} is readable by group or others (mode {stat.S_IMODE(mode):04o}): "
                f"'chmod 600 {path}' (and check who may have copied it)")


def prepare_data_dir(cfg: Config) -> None:
    """Create the data directory when missing, durably (its parent fsynced)."""
    try:
        durable.make_dirs(cfg.data_dir, 0o700)
    except OSError as exc:
        raise ConfigError(f"{cfg.source or 'configuration'}: [gateway] data_dir: cannot "
                          f"create {cfg.data_dir} ({exc.strerror or exc}): create it for the "
                          "gateway's user or give another directory") from None


class DataDirInUseError(UserError):
    """Another gateway daemon holds this data directory."""


def lock_data_dir(data_dir: Path) -> int:
    """Take the daemon's exclusive lock on *data_dir* (non-blocking) and write our pid in
    it; DataDirInUseError when another process holds it. The file descriptor is returned
    open: the lock lasts while it (or the process) lives."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOCK_MODE)
    except OSError as exc:
        raise ConfigError(f"data_dir {data_dir}: cannot open the lock file {path} "
                          f"({exc.strerror or exc}): give the gateway's user a data directory "
                          "it owns") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise DataDirInUseError(
                f"data_dir {data_dir} is in use by the gateway {who} (a second daemon would "
                "fork the record chain): stop it first") from None
        os.fchmod(fd, LOCK_MODE)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def warn_plaintext(cfg: Config) -> None:
    if not cfg.broker.tls:
        log.warning("PLAINTEXT MQTT: records cross the network unencrypted and the broker "
                    "is not authenticated (%s: [broker] insecure_plaintext = true); for "
                    "test benches only", cfg.source or "configuration")


def check_broker_host(cfg: Config) -> None:
    """Resolve the broker's host once and say so when it does not resolve."""
    host, port = cfg.broker.host, cfg.broker.port
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        log.warning("%s: [broker] host %r does not resolve (%s): check the name and the "
                    "DNS; records wait in the store and the uplink keeps retrying",
                    cfg.source or "configuration", host, exc)
        return
    log.info("broker %s resolves to %s", host, sorted({a[4][0] for a in addresses}))


def prepare(config_path: Path, on_decommissioned: Callable[[], None] | None = None) -> Gateway:
    """Everything the daemon checks and sets up before the pipeline starts.
    *on_decommissioned* is called once a decommission's final record is delivered."""
    os.umask(UMASK)
    try:
        cfg = load_config(config_path)
    except ConfigError:
        _check_tombstone(config_path)  # a decommission destroyed the TLS key it names
        raise
    check_not_decommissioned(cfg.identity_path)  # its keys are gone: status 3, no restart
    prepare_data_dir(cfg)
    if not _held_lock:  # one daemon per data_dir, before the identity or the store
        _held_lock.append(lock_data_dir(cfg.data_dir))
    for change in recover_identity(cfg.identity_path):
        log.warning("identity %s: %s", cfg.identity_path, change)
    identity = load_identity(cfg.identity_path)
    check_private_files(cfg)
    registry = open_registry(identity)  # a damaged registry is an error before anything runs
    try:
        registry.snapshot()
    finally:
        registry.close()
    warn_plaintext(cfg)
    threading.Thread(target=check_broker_host, args=(cfg,), name="resolve-broker",
                     daemon=True).start()
    return Gateway(cfg, identity, on_decommissioned=on_decommissioned)


def _check_tombstone(config_path: Path) -> None:
    """DecommissionedError when the configuration's identity directory holds a tombstone
    (read from the TOML alone: the files a decommission destroyed fail the full check)."""
    try:
        with config_path.open("rb") as file:
            identity_dir = tomllib.load(file)["gateway"]["identity_dir"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return
    if isinstance(identity_dir, str) and identity_dir:
        check_not_decommissioned(Path(identity_dir))


def start_line(gateway: Gateway) -> str:
    """One line on start: the gateway, its ports, the uplink's target, the store."""
    cfg = gateway.config
    ports = ", ".join(f"{w.name}={w.path}" for w in gateway.ports) or "no device"
    broker = cfg.broker
    store = gateway.pipeline.store
    quota = f" of {size_text(store.quota_bytes)} quota" if store.quota_bytes else ""
    state = f"; state in {cfg.runtime_dir}" if cfg.runtime_dir is not None else ""
    return (f"gateway {gateway.identity.gateway_id} running (version {VERSION}): ports "
            f"{ports}; uplink {broker.host}:{broker.port} "
            f"({'TLS' if broker.tls else 'PLAINTEXT'}); store {gateway.queued():,} records "
            f"queued, {size_text(store.used_bytes)}{quota}{state}")


def stop_line(gateway: Gateway, uptime_s: float, drained: bool) -> str:
    """One line on stop: what this run sealed and forwarded, what stays queued, how long."""
    queued = gateway.queued()
    left = "" if drained or not queued else " (not all forwarded: they go out at the next start)"
    return (f"gateway {gateway.identity.gateway_id} stopped after "
            f"{duration(int(uptime_s * 1e9))}: {gateway.writer.stats.committed:,} records "
            f"sealed, {gateway.forwarder.stats.records_acked:,} forwarded, {queued:,} queued"
            f"{left}")


def run(config_path: Path) -> int:
    started = time.monotonic()
    if lifecycle.getEffectiveLevel() > logging.INFO:  # journalctl shows starts and stops
        lifecycle.setLevel(logging.INFO)
    stop = StopFlag()  # set by SIGTERM/SIGINT: no lock in the handler (core/stopping.py)
    gateway = prepare(config_path, on_decommissioned=stop.set)
    identity = gateway.identity
    stop_on_signals(stop)
    gateway.service.defer_until_ready()  # READY=1 first, then the uplink's changes
    gateway.start()
    lifecycle.info("%s", start_line(gateway))
    gateway.service.ready()  # READY=1; STATUS= says the uplink's state, at each change
    ping = systemd.watchdog_interval_s()
    next_status = 0.0
    while not stop.wait(min(ping or STATUS_INTERVAL_S, STATUS_INTERVAL_S)):
        if ping is not None and gateway.alive():
            systemd.notify("WATCHDOG=1")  # withheld if a thread died: systemd restarts us
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + STATUS_INTERVAL_S
            log.info("status %s", json.dumps(gateway.status()))
    systemd.notify("STOPPING=1\nSTATUS=draining")
    drained = gateway.stop(drain_s=STOP_DRAIN_S)
    lifecycle.info("%s", stop_line(gateway, time.monotonic() - started, drained))
    if gateway.decommissioned.is_set():
        log.warning("gateway %s decommissioned: everything is delivered; 'provision "
                    "decommission' destroys its keys", identity.gateway_id)
        return EXIT_DECOMMISSIONED  # the unit's RestartPreventExitStatus: not restarted
    return 0
