"""The uplink refusing bad certificates and saying its failures, against a real mosquitto
with mTLS on loopback: one line at once (not ten a second), a record, recording going on,
the fix taken without a restart, the state in the status and in systemd's STATUS=."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.assembly import Gateway
from app.config import Config
from buffer.store import store_path
from core import mqtt as mqtt_settings
from core.mqtt import BrokerConfig
from core.record import Reading, Source
from core.topics import PLATFORM_CN
from lab.mosquitto import (
    Mosquitto,
    Pki,
    client_config,
    free_port,
    make_pki,
    start_mosquitto,
)
from lab.site import Platform
from provisioning.identity import Identity
from provisioning.pki import (
    CertFiles,
    issue,
    issue_custom,
    make_not_a_ca,
    write_ca,
    write_pem,
)
from tests.conftest import REPO
from tests.helpers import stop_daemon, stored_records, wait_for
from uplink import forwarder

pytestmark = [
    pytest.mark.slow,
    # paho leaks the socket of a failed TLS handshake; it is collected within the test
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"),
]
SRC = Source("tag_receiver", "TR-0001", "1.0.0")
#: The TLS files are checked this often in these tests, seconds (15 in production).
CHECK_S = 0.02


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks every CHECK_S; paho retries every second (not 1, 2, 4 ... 60 s)."""
    monkeypatch.setattr(forwarder, "CERT_CHECK_S", CHECK_S)
    monkeypatch.setattr(mqtt_settings, "RECONNECT_MAX_S", 1.0)
    monkeypatch.setattr(forwarder, "RECONNECT_MAX_S", 1.0)


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "uplink.forwarder" and text in r.getMessage()]


def _config(broker: Mosquitto | int, pki: Pki, files: CertFiles,
            ca_file: Path | None = None) -> BrokerConfig:
    port = broker if isinstance(broker, int) else broker.port
    return BrokerConfig("127.0.0.1", port, str(ca_file or pki.ca_file), str(files.cert),
                        str(files.key))


def _kinds(data_dir: Path, identity: Identity) -> list[dict[str, object]]:
    return [json.loads(r) for r in stored_records(store_path(data_dir), identity.storage_key)]


@pytest.fixture
def run_gateway(tmp_path: Path, identity: Identity) -> Iterator[Callable[[BrokerConfig],
                                                                         Gateway]]:
    started: list[Gateway] = []

    def run(broker: BrokerConfig) -> Gateway:
        gateway = Gateway(Config(tmp_path / "data", broker), identity)
        gateway.start()
        started.append(gateway)
        return gateway

    yield run
    for gateway in started:
        gateway.stop(drain_s=0)


def _bad_files(kind: str, pki: Pki, directory: Path, gw: str) -> tuple[CertFiles, Path | None]:
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric import ec

    now = dt.datetime.now(dt.UTC)
    if kind == "cn_mismatch":
        return write_pem(directory, "gw", *issue(pki.ca, "gw-other-0002")), None
    if kind == "key_mismatch":
        _, cert = issue(pki.ca, gw)
        return write_pem(directory, "gw", ec.generate_private_key(ec.SECP256R1()), cert), None
    if kind == "expired":
        return write_pem(directory, "gw", *issue_custom(
            pki.ca, gw, not_before=now - dt.timedelta(days=90),
            not_after=now - dt.timedelta(days=2))), None
    assert kind == "ca_not_ca"
    return (write_pem(directory, "gw", *issue(pki.ca, gw)),
            write_ca(directory, make_not_a_ca(), name="not-a-ca"))


@pytest.mark.parametrize("kind", ["cn_mismatch", "key_mismatch", "expired", "ca_not_ca"])
def test_a_bad_certificate_is_refused_once_and_recording_goes_on(
    kind: str, tmp_path: Path, pki: Pki, *, mosquitto: Mosquitto, identity: Identity,
    run_gateway: Callable[[BrokerConfig], Gateway], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    files, ca_file = _bad_files(kind, pki, tmp_path / "tls", identity.gateway_id)
    gateway = run_gateway(_config(mosquitto, pki, files, ca_file))
    wait_for(lambda: gateway.forwarder.stats.cert_checks >= 25, 15, "25 certificate checks")
    for i in range(50):
        gateway.writer.submit(Reading("tag.presence", SRC, {"counter": i},
                                      time.monotonic_ns()))
    assert gateway.writer.flush()
    assert gateway.status()["uplink"] == f"refused: {kind}"
    assert not gateway.forwarder.stats.connected
    gateway.stop(drain_s=0)

    refused = _lines(caplog, "uplink refuses to connect")
    assert len(refused) == 1, refused  # 25 checks, one line
    assert caplog.records[[r.getMessage() for r in caplog.records].index(refused[0])
                          ].levelno == logging.ERROR
    records = _kinds(tmp_path / "data", identity)
    bodies = [r["body"] for r in records if r["kind"] == "uplink.refused"]
    assert [b["reason"] for b in bodies] == [kind]  # type: ignore[index]
    assert [r["kind"] for r in records].count("tag.presence") == 50  # evidence never waits
    assert not any("New connection" in line for line in mosquitto.log)  # never dialled


def test_a_renewed_certificate_is_taken_without_a_restart(
    tmp_path: Path, pki: Pki, *, mosquitto: Mosquitto, identity: Identity,
    run_gateway: Callable[[BrokerConfig], Gateway], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
) -> None:
    caplog.set_level(logging.INFO)
    # a platform subscribed: a record nobody subscribes to is not acknowledged as delivered
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    request.addfinalizer(platform.stop)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.settimeout(15)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        files = write_pem(tmp_path / "tls", "gw", *issue(pki.ca, "gw-other-0002"))
        gateway = run_gateway(_config(mosquitto, pki, files))
        status = f"STATUS=gateway {identity.gateway_id} running; uplink "
        assert re.fullmatch(re.escape(status) + r"down since \d\d:\d\d \(certificate: for "
                            r"another gateway\), \d+ queued", systemd.recv(4096).decode())
        gateway.writer.submit(Reading("tag.tamper", SRC, {"n": 1}, time.monotonic_ns()))
        write_pem(tmp_path / "tls", "gw", *issue(pki.ca, identity.gateway_id))  # renewed
        seen = []
        while not seen or seen[-1] != status + "connected":
            seen.append(systemd.recv(4096).decode())
        assert seen[0] == status + "connecting"
    assert gateway.forwarder.wait_idle(15)  # the refusal record and the tamper went out
    assert gateway.forwarder.stats.records_acked == gateway.writer.stats.committed
    assert len(_lines(caplog, "the certificate problem is fixed")) == 1
    up = _lines(caplog, f"uplink connected to 127.0.0.1:{mosquitto.port} after")
    assert len(up) == 1
    assert "records queued go out now" in up[0]


def test_a_certificate_renewed_while_connected_is_taken_and_the_session_resumed(
    tmp_path: Path, pki: Pki, *, mosquitto: Mosquitto, identity: Identity,
    run_gateway: Callable[[BrokerConfig], Gateway], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    files = write_pem(tmp_path / "tls", "gw", *issue(pki.ca, identity.gateway_id))
    gateway = run_gateway(_config(mosquitto, pki, files))
    wait_for(lambda: gateway.forwarder.stats.connected, 15, "the first connection")
    old = gateway.forwarder.client
    write_pem(tmp_path / "tls", "gw", *issue(pki.ca, identity.gateway_id))  # renewed
    wait_for(lambda: gateway.forwarder.stats.connects >= 2, 15, "the reconnection")
    gateway.writer.submit(Reading("tag.tamper", SRC, {"n": 1}, time.monotonic_ns()))
    assert gateway.forwarder.wait_idle(15)
    assert gateway.forwarder.client is not old  # made with the new files
    assert len(_lines(caplog, "the TLS files changed and check clean")) == 1
    # the certificate was placed before its key: the half-way pair was not judged
    assert _lines(caplog, "uplink refuses") == []
    assert gateway.forwarder.stats.refused_records == 0
    stats = gateway.forwarder.stats
    assert (stats.sessions_lost, stats.taken_over, stats.takeover_records) == (0, 0, 0)
    assert _lines(caplog, "uplink connected again") == []  # our own reconnect: no outage


def test_a_certificate_not_yet_valid_waits_for_trusted_time(
    tmp_path: Path, pki: Pki, mosquitto: Mosquitto, identity: Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import datetime as dt

    from core.clock import Clock

    caplog.set_level(logging.INFO)
    synced = threading.Event()  # NTP (or GNSS) not there yet: a Pi after a power cut
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    files = write_pem(tmp_path / "tls", "gw", *issue_custom(pki.ca, identity.gateway_id,
                                                            not_before=soon))
    gateway = Gateway(Config(tmp_path / "data", _config(mosquitto, pki, files)), identity,
                      clock=Clock(synced=synced.is_set))
    gateway.start()
    try:
        # the uplink goes on (the broker, with its own clock, refuses the certificate)
        wait_for(lambda: gateway.forwarder.stats.failed_attempts >= 1, 15, "an attempt")
        assert _lines(caplog, "uplink refuses") == []
        assert len(_lines(caplog, "uplink certificate (deferred)")) == 1
        synced.set()  # trusted time confirms it
        wait_for(lambda: gateway.status()["uplink"] == "refused: not_yet_valid", 15,
                 "the refusal")
        gateway.writer.flush()
    finally:
        gateway.stop(drain_s=0)
    assert len(_lines(caplog, "uplink refuses to connect: the certificate")) == 1
    bodies = [r["body"] for r in _kinds(tmp_path / "data", identity)
              if r["kind"] == "uplink.refused"]
    assert [b["reason"] for b in bodies] == ["not_yet_valid"]  # type: ignore[index]


def test_a_dead_broker_is_said_at_once_and_the_reconnection_too(
    tmp_path: Path, pki: Pki, identity: Identity,
    run_gateway: Callable[[BrokerConfig], Gateway], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    t0 = time.time()
    gateway = run_gateway(_config(port, pki, pki.client(identity.gateway_id)))
    wait_for(lambda: gateway.forwarder.stats.failed_attempts >= 2, 15, "two failed attempts")
    lines = _lines(caplog, "uplink cannot connect")
    assert _first_at(caplog, "uplink cannot connect") - t0 <= SAID_WITHIN_S  # the issue's
    assert lines == [f"uplink cannot connect: nothing accepts connections at 127.0.0.1:{port} "
                     "(connection refused): check that the broker runs and [broker] host and "
                     "port (its TLS port, usually 8883); retrying (records are kept in the "
                     "store meanwhile)"]
    assert gateway.status()["uplink"] == "retrying: tcp_refused"
    broker = start_mosquitto(tmp_path / "mq", pki, port=port)
    try:
        wait_for(lambda: gateway.forwarder.stats.connected, 20, "the reconnection")
    finally:
        broker.stop()
    up = _lines(caplog, f"uplink connected to 127.0.0.1:{port} after")
    assert len(up) == 1
    assert "failed attempts); " in up[0]
    assert "records queued go out now" in up[0]


def test_a_wrong_ca_file_is_said_at_once(
    tmp_path: Path, pki: Pki, *, mosquitto: Mosquitto, identity: Identity,
    run_gateway: Callable[[BrokerConfig], Gateway], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    rogue = make_pki(tmp_path / "rogue")
    t0 = time.time()
    gateway = run_gateway(_config(mosquitto, pki, pki.client(identity.gateway_id),
                                  ca_file=rogue.ca_file))
    wait_for(lambda: gateway.forwarder.stats.failed_attempts >= 2, 15, "two failed attempts")
    lines = _lines(caplog, "uplink cannot connect")
    assert _first_at(caplog, "uplink cannot connect") - t0 <= SAID_WITHIN_S  # the issue's
    assert len(lines) == 1
    assert f"the broker at 127.0.0.1:{mosquitto.port} is not trusted" in lines[0]
    assert f"ca_file {rogue.ca_file}" in lines[0]
    assert "install the platform's CA certificate as ca_file" in lines[0]
    assert gateway.status()["uplink"] == "retrying: broker_untrusted"
    # the check said it first: the client certificate is not from that CA
    assert len(_lines(caplog, f"was not issued by a CA of {rogue.ca_file}")) == 1


def test_a_client_certificate_the_broker_refuses_is_said(
    tmp_path: Path, pki: Pki, *, mosquitto: Mosquitto, identity: Identity,
    run_gateway: Callable[[BrokerConfig], Gateway], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    rogue = make_pki(tmp_path / "rogue")
    t0 = time.time()
    gateway = run_gateway(_config(mosquitto, pki, rogue.client(identity.gateway_id)))
    # TLS 1.3: the broker sends its alert after the client's handshake and closes; a client
    # whose CONNECT crossed the close may see only an EOF (uplink/failures.py, _REFUSALS).
    # Once the alert has been seen, every later attempt is that refusal, whatever it shows.
    wait_for(lambda: gateway.forwarder.stats.failed_attempts >= 3
             and gateway.status()["uplink"] == "retrying: cert_refused", 15,
             "three failed attempts, the refusal seen")
    lines = _lines(caplog, "uplink cannot connect")
    assert _first_at(caplog, "uplink cannot connect") - t0 <= SAID_WITHIN_S  # the issue's
    refusals = [line for line in lines if "refused this gateway's certificate (" in line]
    assert len(refusals) == 1
    # at most a close said before it, which names the certificate too
    assert lines[-1] == refusals[0]
    assert len(lines) <= 2
    assert all("this gateway's certificate" in line for line in lines)


def test_a_broker_certificate_for_another_name_is_said(
    tmp_path: Path, pki: Pki, identity: Identity,
    run_gateway: Callable[[BrokerConfig], Gateway], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server = write_pem(tmp_path / "srv", "broker", *issue_custom(
        pki.ca, "broker", names=("broker.invalid",)))
    elsewhere = Pki(tmp_path / "srv", pki.ca, pki.ca_file, server)
    with _broker(tmp_path / "mq", elsewhere) as broker:
        t0 = time.time()
        gateway = run_gateway(_config(broker, pki, pki.client(identity.gateway_id)))
        wait_for(lambda: gateway.forwarder.stats.failed_attempts >= 1, 15, "a failed attempt")
    lines = _lines(caplog, "uplink cannot connect")
    assert _first_at(caplog, "uplink cannot connect") - t0 <= SAID_WITHIN_S  # the issue's
    assert len(lines) == 1
    assert "the broker's certificate is not for the host dialled" in lines[0]
    assert gateway.status()["uplink"] == "retrying: broker_name"


def test_a_connack_refusal_is_said_once(
    tmp_path: Path, pki: Pki, identity: Identity,
    run_gateway: Callable[[BrokerConfig], Gateway], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    # a broker that refuses every client id not starting with "platform-" (CONNACK 0x87)
    with _broker(tmp_path / "mq", pki, extra_conf=["clientid_prefixes platform-"]) as broker:
        t0 = time.time()
        gateway = run_gateway(_config(broker, pki, pki.client(identity.gateway_id)))
        wait_for(lambda: gateway.forwarder.stats.failed_attempts >= 2, 15,
                 "two refused attempts")
    lines = _lines(caplog, "uplink cannot connect")
    assert _first_at(caplog, "uplink cannot connect") - t0 <= SAID_WITHIN_S  # the issue's
    assert lines == [f"uplink cannot connect: the broker at 127.0.0.1:{broker.port} refused the "
                     "connection: Not authorized (CONNACK 0x87): the platform must allow this "
                     f"gateway (gw-{identity.gateway_id}, its certificate's CN) on the broker: "
                     "user, ACL, ban list; retrying (records are kept in the store meanwhile)"]
    assert gateway.status()["uplink"] == "retrying: not_authorized"


#: Issue 13: each uplink failure cause is logged within this many seconds (production
#: timing: the first attempt is made at start and its failure said at once).
SAID_WITHIN_S = 5.0


def _first_at(caplog: pytest.LogCaptureFixture, text: str) -> float:
    """When the first log line holding *text* was made (time.time())."""
    return min(r.created for r in caplog.records if text in r.getMessage())


class _broker:  # noqa: N801 (a context manager read as a function)
    def __init__(self, workdir: Path, pki: Pki, **kwargs: object) -> None:
        self.broker = start_mosquitto(workdir, pki, **kwargs)  # type: ignore[arg-type]

    def __enter__(self) -> Mosquitto:
        return self.broker

    def __exit__(self, *_exc: object) -> None:
        self.broker.stop()


def test_the_daemon_says_a_refusal_on_stderr_and_to_systemd(
    tmp_path: Path, pki: Pki, mosquitto: Mosquitto, identity: Identity,
) -> None:
    """The service as deployed: default verbosity, NOTIFY_SOCKET set."""
    files = write_pem(tmp_path / "tls", "gw", *issue(pki.ca, "gw-other-0002"))
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
identity_dir = "{identity.directory}"
data_dir = "{tmp_path / 'data'}"
[paths]
runtime_dir = "{tmp_path / 'run'}"
[broker]
host = "127.0.0.1"
port = {mosquitto.port}
ca_file = "{pki.ca_file}"
cert_file = "{files.cert}"
key_file = "{files.key}"
""")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
        daemon = subprocess.Popen(
            [sys.executable, str(REPO / "gateway.py"), "run", "--config", str(cfg)],
            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        err: list[str] = []
        pump = threading.Thread(target=lambda: err.extend(daemon.stderr or ()), daemon=True)
        pump.start()
        try:
            status = re.compile(
                f"STATUS=gateway {identity.gateway_id} running; uplink down since "
                r"\d\d:\d\d \(certificate: for another gateway\), \d+ queued$")
            messages: list[str] = []
            while not (any(m.startswith("READY=1") for m in messages)
                       and any(status.search(m) for m in messages)):
                messages.append(systemd.recv(4096).decode())
        finally:
            assert stop_daemon(daemon, 30, err, pump) == 0
            if daemon.stderr is not None:
                daemon.stderr.close()
    # READY says it, or the uplink said it at once after (whichever came last is newest)
    assert status.search(messages[-1])
    lines = [line for line in err if "uplink refuses to connect" in line]
    assert len(lines) == 1, err
    assert " ERROR " in lines[0]
    assert "is for 'gw-other-0002'" in lines[0]
