"""Start a private mosquitto on a loopback port with mTLS and an ACL (demo, tests, bench).

The ACL is the one a province would deploy: a gateway (MQTT user = the common
name of its client certificate) may write only under its own topic prefix; the
platform's consumers may read every gateway's records and status. The client
id is bound to the certificate too (``use_username_as_clientid``: the broker
replaces whatever client id a client sends with its certificate's CN), so a
client with a valid certificate of its own cannot take a gateway's session;
only a copy of that gateway's certificate can (docs/broker.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.mqtt import BrokerConfig
from core.topics import PLATFORM_CN, TOPIC_ROOT, broker_acl
from provisioning.pki import Authority, CertFiles, issue_to, make_authority, write_ca

STARTUP_TIMEOUT_S = 15.0
#: Starts on a port of free_port()'s before giving up (each a new port: see start_mosquitto).
START_ATTEMPTS = 3


class BrokerError(UserError):
    """mosquitto is missing or did not start; the message says why and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Pki:
    directory: Path
    ca: Authority
    ca_file: Path
    server: CertFiles

    def client(self, cn: str) -> CertFiles:
        return issue_to(self.directory, self.ca, cn)


def make_pki(directory: Path) -> Pki:
    ca = make_authority()
    server = issue_to(directory, ca, "broker", server=True)
    return Pki(directory, ca, write_ca(directory, ca), server)


@dataclass
class Mosquitto:
    host: str
    port: int
    process: subprocess.Popen[str]
    log: list[str]
    log_thread: threading.Thread

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_thread.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if found is None:
        raise BrokerError(
            "mosquitto is not installed: run 'sudo apt-get install mosquitto' "
            "(scripts/setup.sh does it), or give --broker HOST:PORT"
        )
    return found


def start_mosquitto(workdir: Path, pki: Pki, *, port: int | None = None,
                    host: str = "127.0.0.1", persistence: bool = False,
                    bind_client_id: bool = True, extra_conf: Sequence[str] = ()) -> Mosquitto:
    """Start mosquitto; with *persistence*, sessions and queued messages survive a restart
    on the same *workdir* (as on a production broker). *bind_client_id* false leaves the
    client id as the client sent it (stock mosquitto: any client can take any id).
    *extra_conf*: lines appended to the configuration (first the mTLS listener's own, e.g.
    ``crlfile``; then, after a ``listener`` line, another listener's)."""
    # free_port() closes its socket before mosquitto binds the port: another process (an
    # outgoing connection's ephemeral port, a parallel test's broker) may take it
    # meanwhile; mosquitto then exits with "Address already in use": another port
    attempts = START_ATTEMPTS if port is None else 1
    for attempt in range(1, attempts + 1):
        try:
            return _start(workdir, pki, free_port(host) if port is None else port, host,
                          persistence=persistence, bind_client_id=bind_client_id,
                          extra_conf=extra_conf)
        except BrokerError as exc:
            if attempt == attempts or "Address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _start(workdir: Path, pki: Pki, port: int, host: str, *, persistence: bool,
           bind_client_id: bool, extra_conf: Sequence[str]) -> Mosquitto:
    binary = mosquitto_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    acl = workdir / "acl"
    acl.write_text(broker_acl(PLATFORM_CN))
    conf = workdir / "mosquitto.conf"
    lines = [
        f"listener {port} {host}",
        f"cafile {pki.ca_file}",
        f"certfile {pki.server.cert}",
        f"keyfile {pki.server.key}",
        "require_certificate true",
        "use_identity_as_username true",
        # client id := username (the CN): one certificate, one session
        f"use_username_as_clientid {'true' if bind_client_id else 'false'}",
        "allow_anonymous false",
        f"acl_file {acl}",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir}/",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "max_inflight_messages 100",
        "max_queued_messages 10000",
    ]
    if os.geteuid() == 0:
        lines.append("user root")  # keys are 0600 root: do not drop to 'mosquitto'
    lines.extend(extra_conf)
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    log: list[str] = []
    ready = threading.Event()  # it said it runs, or its log ended (it exited)
    running = threading.Event()  # it said it runs

    def pump() -> None:
        for line in proc.stderr or ():
            log.append(line.rstrip())
            if line.rstrip().endswith(" running"):
                running.set()
                ready.set()
        ready.set()

    pump_thread = threading.Thread(target=pump, name="mosquitto-log", daemon=True)
    pump_thread.start()
    broker = Mosquitto(host, port, proc, log, pump_thread)
    # not proc.poll(): a mosquitto that failed closes its log before it can be reaped
    if not ready.wait(STARTUP_TIMEOUT_S) or not running.is_set() or proc.poll() is not None:
        broker.stop()
        raise BrokerError("mosquitto did not start:\n" + "\n".join(log[-20:]))
    return broker


def client_config(broker: Mosquitto, pki: Pki, cn: str) -> BrokerConfig:
    """How a client with a certificate for *cn* (a gateway id, or the platform's
    :data:`~core.topics.PLATFORM_CN`) connects to *broker*: mTLS, the lab's CA."""
    files = pki.client(cn)
    return BrokerConfig(broker.host, broker.port, str(pki.ca_file), str(files.cert),
                        str(files.key))


@contextlib.contextmanager
def records_sink(broker: Mosquitto, pki: Pki, timeout_s: float = 15.0) -> Iterator[list[int]]:
    """A platform client subscribed (QoS 1) to every gateway's records, taking what comes
    and verifying nothing: for benches and tests of the gateway side. Without a
    subscriber the broker keeps nothing and answers PUBACK 0x10, which the gateway's
    uplink does not count as a delivery (docs/uplink-troubleshooting.md). Yields a
    one-element list: the messages taken so far."""
    from core.mqtt import make_client

    taken = [0]
    subscribed = threading.Event()
    client = make_client(PLATFORM_CN, client_config(broker, pki, PLATFORM_CN))

    def on_message(*_args: object) -> None:
        taken[0] += 1

    client.on_connect = lambda c, *_a: c.subscribe(f"{TOPIC_ROOT}/+/records", qos=1)
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if not subscribed.wait(timeout_s):
            raise RuntimeError(f"records_sink: not subscribed within {timeout_s:.0f} s")
        yield taken
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.contextmanager
def running_mosquitto(workdir: Path, pki: Pki, **kwargs: object) -> Iterator[Mosquitto]:
    broker = start_mosquitto(workdir, pki, **kwargs)  # type: ignore[arg-type]
    try:
        yield broker
    finally:
        broker.stop()
