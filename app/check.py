"""``gateway.py provision check``: the whole installation, one line per item.

Each item is an :class:`Item`: a name, ``pass``/``warn``/``fail``, what was found, and for
a warning or a failure what to do. In this order:

1. the configuration loads;
2. the identity (its keys, TPM or file), the modes of the files holding secrets, the
   platform's command keys (``app/diag.py`` ``keys_report``);
3. the uplink's certificate: CN, key match, dates, chain (``uplink/certs.py``);
4. the broker, step by step, stopping at the first failure: DNS, TCP, the TLS handshake
   (the configured CA, the client certificate, the host name), MQTT CONNECT (the broker
   authenticates the gateway), and a test publish at QoS 1 on the gateway's check topic
   (``core/topics.py`` ``check_topic``; the PUBACK's reason code tells an ACL refusal).
   While the daemon runs, the last two are read from its state instead: a CONNECT with
   the gateway's certificate would take its session (the broker binds the client id to
   the certificate, docs/broker.md);
5. the clock (the daemon's, or the kernel's when it does not run);
6. each configured device (its port present; handshake, serial and firmware), each
   paired kiosk connected and each paired tag heard;
7. GNSS: a fix and the distance from the installed position (never the coordinates);
8. free disk against the record store's quota;
9. the daemon running (its state file, ``app/state.py``);
10. the unit's hardening (``app/hardening.py``).

Items that need the daemon say so (a warning) while it does not run, and the daemon's
own item fails then: a check that exits 0 means the unit is recording. Before the first
start, ``--before-start`` makes its absence a warning (docs/provision-check.md).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import json
import logging
import os
import queue
import socket
import ssl
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from app.config import Config, load_config
from app.daemon import LOCK_FILE, PRIVATE_IDENTITY_FILES
from app.diag import keys_report
from app.hardening import hardening_findings
from app.state import DEFAULT_RUNTIME_DIR, StateError, daemon_alive, read_state, state_age_ms
from app.supervision import authorised_tags
from buffer.store import default_quota, store_files_bytes, store_path
from core.clock import kernel_clock_synced
from core.errors import UserError
from core.mqtt import BrokerConfig, MqttSetupError, make_client
from core.topics import check_topic
from firmware_bridge.messages import DeviceClass
from provisioning.command_keys import report as command_keys_report
from provisioning.identity import load_identity
from provisioning.kiosks import KIOSKS_FILE, open_kiosks
from provisioning.registry import RegistryError, open_registry
from uplink.certs import Severity
from uplink.failures import Failure, connack_failure, connect_failure, socket_failure
from uplink.forwarder import SESSION_EXPIRY_S

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIMEOUT_S", "START_HINT", "CheckOptions", "Item", "Outcome",
           "check_installation", "exit_code", "render", "summary"]

#: How long each network step may take, seconds (``--timeout``).
DEFAULT_TIMEOUT_S = 10.0
#: A paired tag counts as heard when its last beacon is at most this old, seconds.
TAG_HEARD_WITHIN_S = 60
#: A GNSS receiver without a fix this long after the daemon started is a failure (a cold
#: start takes up to a few minutes under open sky), seconds.
GNSS_COLD_START_S = 180
#: A running gateway connected this long with records waiting and no PUBACK: the broker
#: refuses them (seconds).
ACK_GRACE_S = 30
#: What to do when the daemon does not run.
START_HINT = "start it (systemctl start smartcorr-gateway), then run this check again"
_NOT_RUNNING = f"daemon not running: {START_HINT} to check"
_MS = 1000


class Outcome(enum.StrEnum):
    PASS = "pass"  # noqa: S105 - an outcome, not a password
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Item:
    """One line of the check."""

    name: str
    ok: Outcome
    detail: str
    #: What to do (a warning or a failure); None when there is nothing to do.
    fix: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"name": self.name, "ok": str(self.ok), "detail": self.detail, "fix": self.fix}


def _pass(name: str, detail: str) -> Item:
    return Item(name, Outcome.PASS, detail)


def _warn(name: str, detail: str, fix: str | None) -> Item:
    return Item(name, Outcome.WARN, detail, fix)


def _fail(name: str, detail: str, fix: str) -> Item:
    return Item(name, Outcome.FAIL, detail, fix)


@dataclass(frozen=True, slots=True)
class CheckOptions:
    skip_broker: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: The daemon is not expected to run yet: its absence is a warning, not a failure.
    before_start: bool = False
    #: Leave out the hardening items (a lab or development install, not the production
    #: layout): one warning says so.
    skip_hardening: bool = False
    #: The root of the filesystem the hardening items look at (tests: a tree of their own).
    root: Path = Path("/")


# -- the daemon, as its state file and its lock show it ---------------------------------------
@dataclass(frozen=True, slots=True)
class Daemon:
    """What this check knows of the running daemon."""

    #: Its state (``app/state.py``) when it is alive; None otherwise.
    state: Mapping[str, Any] | None
    #: The pid holding the data directory's lock (a daemon that may write no state).
    lock_pid: int | None
    #: How old the last state file is when the daemon is not alive (ms), else None.
    stale_ms: int | None
    runtime_dir: Path
    #: Why the state file could not be read (app/state.py StateError), if it could not.
    error: str | None = None

    @property
    def alive(self) -> bool:
        return self.state is not None

    @property
    def holds_data_dir(self) -> bool:
        return self.state is not None or self.lock_pid is not None

    def section(self, key: str) -> Mapping[str, Any]:
        """A table of the state ({} when missing: an older daemon)."""
        value = (self.state or {}).get(key)
        return value if isinstance(value, Mapping) else {}

    def rows(self, key: str) -> list[Mapping[str, Any]]:
        value = (self.state or {}).get(key)
        return [r for r in value if isinstance(r, Mapping)] if isinstance(value, list) else []

    def number(self, key: str) -> int | None:
        value = (self.state or {}).get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def uptime_s(self) -> int | None:
        started, written = self.number("started_at_ms"), self.number("written_at_ms")
        if started is None or written is None:
            return None
        return max(0, written - started) // _MS


def runtime_dir(cfg: Config) -> Path:
    """Where the daemon writes its state (``[paths] runtime_dir``)."""
    return cfg.runtime_dir if cfg.runtime_dir is not None else DEFAULT_RUNTIME_DIR


def read_daemon(cfg: Config) -> Daemon:
    where = runtime_dir(cfg)
    try:
        found = read_state(where)
    except StateError as exc:
        return Daemon(None, _lock_holder(cfg.data_dir), None, where, str(exc))
    stale: int | None = None
    alive: Mapping[str, Any] | None = None
    if found is not None and daemon_alive(found):
        alive = found
    elif found is not None:
        age = state_age_ms(found)
        stale = None if age is None else max(0, age)
    return Daemon(alive, _lock_holder(cfg.data_dir), stale, where)


def _lock_holder(data_dir: Path) -> int | None:
    """The pid of the process holding the daemon's lock on *data_dir* (app/daemon.py), or
    None when no process does. A shared, non-blocking probe on a read-only descriptor: it
    never writes the file, and lasts microseconds."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no daemon ever ran here (or we may not read it)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# -- the check --------------------------------------------------------------------------------
@dataclass
class _Context:
    cfg: Config
    options: CheckOptions
    daemon: Daemon
    gateway_id: str | None = None
    #: ``keys_report`` of app/diag.py (identity, command keys, certificate files)
    keys: dict[str, Any] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)


def check_installation(config_path: Path, options: CheckOptions | None = None) -> list[Item]:
    """Every item of the installation, in order. A configuration that does not load is
    the only item then (nothing else can be checked)."""
    options = options or CheckOptions()
    try:
        cfg = load_config(config_path)
    except UserError as exc:
        return [_fail("config", str(exc), "fix the file as the message says (README.md, "
                                          "'Running it for real', lists every key)")]
    devices = ", ".join(f"{d.name} ({d.kind.label})" for d in cfg.devices) or "no device"
    ctx = _Context(cfg, options, read_daemon(cfg))
    ctx.items.append(_pass("config", f"{config_path} loads: {devices}"
                                     f"{', GNSS' if cfg.gnss else ''}"))
    for step in (_identity, _certificate, _broker, _clock, _devices, _gnss, _disk, _daemon,
                 _hardening):
        try:
            step(ctx)
        except UserError as exc:  # e.g. a TPM that stopped answering midway
            ctx.items.append(_fail(step.__name__.strip("_"), str(exc),
                                   "fix what the message says, then run the check again"))
    return ctx.items


# -- identity, modes, command keys, certificate --------------------------------------------------
#: How keys_report says a file is readable by others (those lines go to "file modes").
_MODE_MARK = " is readable by others: "


def _identity(ctx: _Context) -> None:
    cfg = ctx.cfg
    report = ctx.keys = keys_report(cfg)
    ctx.gateway_id = report.get("gateway_id")
    if "error" in report:
        ctx.items.append(_fail("identity", report["error"],
                               "make the identity with 'provision init --identity-dir "
                               f"{cfg.identity_path} --gateway-id ID', or point [gateway] "
                               "identity_dir at it"))
        ctx.items.append(_modes(cfg))
        return
    commands = command_keys_report(cfg.identity_path, int(time.time() * _MS))
    theirs = set(commands["problems"]) | set(commands["warnings"])
    problems = [p for p in report["problems"]
                if not p.startswith("uplink: ") and _MODE_MARK not in p and p not in theirs]
    files = [name for name, held in (("identity key", report["key_class"]),
                                     ("storage key", report["storage_class"])) if held != "tpm"]
    what = (f"gateway {report['gateway_id']}, identity key {report['kid']} "
            f"({report['alg']}, {'a file' if files else 'in the TPM'}), suite "
            f"{report['suite']}, {report['paired_tags']} tag(s) paired")
    if problems:
        ctx.items.append(_fail("identity", "; ".join(problems),
                               "fix what each line says (docs/provision-check.md)"))
    elif files:
        ctx.items.append(_warn("identity", f"{what}; the {' and the '.join(files)} are files "
                                           "(no TPM): a copy of the disk signs as this gateway "
                                           "and reads its records",
                               "use a TPM 2.0 outside the lab: 'provision init --tpm "
                               "device:/dev/tpmrm0' (then enrol again)"))
    else:
        ctx.items.append(_pass("identity", what))
    ctx.items.append(_modes(cfg))
    ctx.items.append(_command_keys(commands))


def private_files(cfg: Config) -> list[Path]:
    """The files holding secrets or personal data: mode 600 (or stricter)."""
    paths = [cfg.identity_path / name for name in (*PRIVATE_IDENTITY_FILES, KIOSKS_FILE)]
    if cfg.broker.key_file is not None:
        paths.append(Path(cfg.broker.key_file))
    return paths


def _modes(cfg: Config) -> Item:
    bad, seen = [], 0
    for path in private_files(cfg):
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue  # optional; a required one missing is its own item's failure
        except OSError as exc:
            bad.append(f"{path} cannot be examined ({exc.strerror or exc})")
            continue
        seen += 1
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            bad.append(f"{path} is mode {stat.S_IMODE(mode):04o} (readable by group or "
                       "others)")
    if bad:
        return _fail("file modes", "; ".join(bad),
                     "chmod 600 each file named (the daemon refuses to start otherwise), "
                     "and check who may have copied it")
    return _pass("file modes", f"{seen} file(s) holding keys or personal data, each mode 600")


def _command_keys(commands: Mapping[str, Any]) -> Item:
    if commands["problems"]:
        return _fail("command keys", "; ".join(commands["problems"]),
                     "install the platform's command keys again (they come with enrolment: "
                     "docs/command-keys.md)")
    if not commands.get("installed"):
        return _warn("command keys", str(commands.get("note")),
                     "enrolment brings them when the platform's operator signs with "
                     "--command-keys DIR ('ingest ca sign' or 'ingest enrol-service'): ask "
                     "for an answer with them, then 'provision enrol --answer DIR' "
                     "(docs/command-keys.md)")
    certs = commands.get("certificates") or []
    detail = (f"root {commands.get('root_kid')}, {len(certs)} certificate(s), revocation "
              f"list {commands.get('revocation_list')}")
    if commands["warnings"]:
        return _warn("command keys", f"{detail}; " + "; ".join(commands["warnings"]),
                     "the platform must send current command keys (docs/command-keys.md)")
    return _pass("command keys", detail)


def _certificate(ctx: _Context) -> None:
    cfg = ctx.cfg
    if not cfg.broker.tls:
        ctx.items.append(_warn("certificate", "plain MQTT ([broker] insecure_plaintext = "
                                              "true): no certificate, records unencrypted on "
                                              "the wire", "test benches only: configure TLS "
                                                          "(ca_file, cert_file, key_file)"))
        return
    if ctx.gateway_id is None:
        ctx.items.append(_fail("certificate", "not checked: the identity does not load "
                                              "(above), so the gateway id is not known",
                               "fix the identity first"))
        return
    report = ctx.keys["certificates"]
    findings = report["findings"]
    errors = [f for f in findings if f["severity"] == str(Severity.ERROR)]
    others = [f for f in findings if f["severity"] != str(Severity.ERROR)]
    if errors:
        ctx.items.append(_fail("certificate", "; ".join(f["what"] for f in errors),
                               "; ".join(dict.fromkeys(f["todo"] for f in errors))))
        return
    what = (f"{report['cert_file']}: CN {ctx.gateway_id}, the key matches, valid until "
            f"{report['not_after']}")
    if others:
        ctx.items.append(_warn("certificate", f"{what}; " + "; ".join(f["what"]
                                                                       for f in others),
                               "; ".join(dict.fromkeys(f["todo"] for f in others))))
    else:
        ctx.items.append(_pass("certificate", f"{what}, issued by a CA of {report['ca_file']}"))


# -- the broker, step by step -------------------------------------------------------------------
class _Stop(Exception):  # noqa: N818 - control flow inside _broker only
    """A broker step failed: the steps after it are not tried."""


def _broker(ctx: _Context) -> None:
    broker = ctx.cfg.broker
    if ctx.options.skip_broker:
        ctx.items.append(_warn("broker", "not checked (--skip-broker)",
                               "run the check without --skip-broker once the network is up"))
        return
    where = f"{broker.host}:{broker.port}"
    timeout = ctx.options.timeout_s
    try:
        addresses = _step_dns(ctx, broker, where)
        sock = _step_tcp(ctx, addresses, broker, where, timeout)
        try:
            _step_tls(ctx, sock, broker, where, timeout)
        finally:
            sock.close()
        if ctx.daemon.holds_data_dir:
            _from_daemon(ctx, where)
        else:
            _step_mqtt(ctx, broker, where, timeout)
    except _Stop:
        return


def _step_dns(ctx: _Context, broker: BrokerConfig, where: str) -> list[tuple[Any, ...]]:
    try:
        found = socket.getaddrinfo(broker.host, broker.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        failure = connect_failure(exc if isinstance(exc, socket.gaierror) else
                                  socket.gaierror(str(exc)), where,
                                  ca_file=broker.ca_file, tls=broker.tls)
        ctx.items.append(_fail("broker DNS", failure.what, failure.todo))
        raise _Stop from None
    names = sorted({str(a[4][0]) for a in found})
    ctx.items.append(_pass("broker DNS", f"{broker.host} resolves to {', '.join(names)}"))
    return found


def _step_tcp(ctx: _Context, addresses: list[tuple[Any, ...]], broker: BrokerConfig,
              where: str, timeout: float) -> socket.socket:
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        began = time.monotonic()
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        ms = (time.monotonic() - began) * _MS
        ctx.items.append(_pass("broker TCP", f"connected to {address[0]} port {address[1]} "
                                             f"in {ms:.0f} ms"))
        return sock
    failure = _failure(error, where, broker)
    ctx.items.append(_fail("broker TCP", failure.what, failure.todo))
    raise _Stop


def _failure(exc: BaseException | None, where: str, broker: BrokerConfig) -> Failure:
    if isinstance(exc, socket.timeout | TimeoutError):
        exc = TimeoutError(str(exc))
    return connect_failure(exc, where, ca_file=broker.ca_file, tls=broker.tls)


def _step_tls(ctx: _Context, sock: socket.socket, broker: BrokerConfig, where: str,
              timeout: float) -> None:
    if not broker.tls:
        ctx.items.append(_warn("broker TLS", "plain MQTT: nothing authenticates the broker, "
                                             "and records cross the network unencrypted",
                               "test benches only: configure TLS in [broker]"))
        return
    try:
        context = ssl.create_default_context(cafile=broker.ca_file)
        context.load_cert_chain(str(broker.cert_file), str(broker.key_file))
    except (OSError, ssl.SSLError, ValueError) as exc:
        ctx.items.append(_fail("broker TLS", f"the TLS files cannot be loaded ({exc})",
                               "fix the certificate item above (ca_file, cert_file, "
                               "key_file in [broker])"))
        raise _Stop from None
    sock.settimeout(timeout)
    try:
        with context.wrap_socket(sock, server_hostname=broker.host) as tls:
            version = tls.version()
            peer = tls.getpeercert() or {}
    except (OSError, ssl.SSLError) as exc:
        failure = _failure(exc, where, broker)
        ctx.items.append(_fail("broker TLS", failure.what, failure.todo))
        raise _Stop from None
    names = [str(pair[1]) for rdn in peer.get("subject", ()) for pair in rdn
             if pair[0] == "commonName"]
    ctx.items.append(_pass("broker TLS", f"{version} with the broker "
                                         f"{names[0] if names else '(no CN)'}: its certificate "
                                         f"is signed by {broker.ca_file} and holds the name "
                                         f"{broker.host}"))


def _from_daemon(ctx: _Context, where: str) -> None:
    """The running daemon holds the gateway's MQTT session: what it saw stands for CONNECT
    and publish (a CONNECT of ours with the same certificate would take its session)."""
    daemon = ctx.daemon
    if not daemon.alive:
        ctx.items.append(_warn("broker MQTT", f"not tried: the daemon (pid {daemon.lock_pid}) "
                                              "holds the gateway's session and writes no state "
                                              f"in {daemon.runtime_dir}",
                               "an older daemon: stop it to test CONNECT and a publish here "
                               "(systemctl stop smartcorr-gateway), then start it again"))
        return
    uplink = daemon.section("uplink")
    state, reason = uplink.get("state"), uplink.get("reason")
    since = _ago(daemon, uplink.get("since_ms"))
    if state == "connected":
        ctx.items.append(_pass("broker MQTT", f"the running gateway is connected to {where}"
                                              f"{f' (for {since})' if since else ''}: the "
                                              "broker accepted its CONNECT"))
    elif state == "disabled":
        ctx.items.append(_warn("broker MQTT", "the running gateway's uplink is disabled",
                               "check [broker] in the configuration"))
        return
    else:
        text = f"the running gateway is not connected ({state or 'unknown'}"
        ctx.items.append(_fail("broker MQTT", f"{text}{f': {reason}' if reason else ''})",
                               "fix what the reason says (docs/uplink-troubleshooting.md); "
                               "'journalctl -u smartcorr-gateway' has the uplink's lines"))
        return
    acked = _ago(daemon, uplink.get("last_ack_ms"))
    queued = uplink.get("queued")
    connected_s = _age_s(daemon, uplink.get("since_ms"))
    if acked is not None:
        ctx.items.append(_pass("broker publish", f"the broker acknowledged the gateway's "
                                                 f"records (the last PUBACK {acked} ago)"))
    elif isinstance(queued, int) and queued and connected_s is not None and \
            connected_s >= ACK_GRACE_S:
        ctx.items.append(_fail("broker publish", f"no PUBACK in the {_seconds(connected_s)} "
                                                 f"the gateway has been connected, with "
                                                 f"{queued} record(s) waiting: the broker "
                                                 "refuses them (its ACL?)",
                               "'journalctl -u smartcorr-gateway' shows the refusal (PUBACK "
                               "0x87: not authorised); " + _ACL_FIX.format(gw=ctx.gateway_id)))
    else:
        ctx.items.append(_warn("broker publish", "no PUBACK yet on the running gateway's "
                                                 "connection", "run the check again in a "
                                                               "minute"))


def _age_s(daemon: Daemon, at_ms: object) -> int | None:
    written = daemon.number("written_at_ms")
    if not isinstance(at_ms, int) or written is None:
        return None
    return max(0, written - at_ms) // _MS


def _ago(daemon: Daemon, at_ms: object) -> str | None:
    age = _age_s(daemon, at_ms)
    return None if age is None else _seconds(age)


def _seconds(s: int) -> str:
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h"


#: The test message: no personal data, not retained, read by no one.
def _check_payload(gateway_id: str) -> bytes:
    return json.dumps({"gw": gateway_id, "check": True, "at_ms": int(time.time() * _MS)},
                      sort_keys=True).encode()


def _step_mqtt(ctx: _Context, broker: BrokerConfig, where: str, timeout: float) -> None:
    gateway_id = ctx.gateway_id
    if gateway_id is None:
        ctx.items.append(_fail("broker MQTT", "not tried: the identity does not load "
                                              "(above), so the gateway id is not known",
                               "fix the identity first"))
        raise _Stop
    with _Probe(gateway_id, broker, where, timeout) as probe:
        ctx.items.append(probe.connect())
        if ctx.items[-1].ok is Outcome.FAIL:
            raise _Stop
        ctx.items.append(probe.publish(check_topic(gateway_id), _check_payload(gateway_id)))


#: paho's log lines that carry the socket error that closed a connection.
_SOCKET_ERRORS = ("failed to receive on socket", "failed to send on socket",
                  "timeout on socket")


class _Probe:
    """One MQTT v5 connection of this command, as the gateway's uplink makes it
    (``core/mqtt.py``), with a clean session that the broker forgets at once (a stopped
    daemon starts clean anyway). paho's callbacks post events to a queue."""

    def __init__(self, gateway_id: str, broker: BrokerConfig, where: str,
                 timeout: float) -> None:
        self.gateway_id, self.broker, self.where, self.timeout = (gateway_id, broker, where,
                                                                  timeout)
        self.events: queue.Queue[tuple[str, Any, Any]] = queue.Queue(maxsize=64)
        self.socket_error: str | None = None
        self.client: mqtt.Client | None = None

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def _post(self, *event: Any) -> None:
        try:
            self.events.put_nowait((event[0], event[1], event[2] if len(event) > 2 else None))
        except queue.Full:  # bounded: a broker flooding us loses events, not memory
            log.debug("check: event dropped (%s)", event[0])

    def connect(self) -> Item:
        try:
            client = make_client(self.gateway_id, self.broker)
        except MqttSetupError as exc:
            return _fail("broker MQTT", str(exc), "fix the certificate item above")
        client.reconnect_delay_set(3600, 3600)  # one attempt: this command reports, not retries
        client.on_connect = lambda _c, _u, _f, reason, _p: self._post("connack", reason)
        client.on_disconnect = lambda _c, _u, _f, reason, _p: self._post("closed", reason)
        client.on_publish = lambda _c, _u, mid, reason, _p: self._post("puback", mid, reason)
        client.on_log = self._on_log
        # the gateway's own session, resumed and kept as the daemon keeps it: a clean start
        # would wipe the commands queued in it while the daemon is stopped; what the broker
        # delivers now is never acknowledged here, so it comes again to the daemon
        client.manual_ack_set(True)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_timeout = self.timeout
        try:
            client.connect(self.broker.host, self.broker.port, self.broker.keepalive_s,
                           clean_start=False, properties=props)
        except (OSError, ssl.SSLError, ValueError) as exc:
            failure = _failure(exc, self.where, self.broker)
            return _fail("broker MQTT", failure.what, failure.todo)
        self.client = client
        client.loop_start()
        event = self._next(("connack", "closed"))
        if event is None:
            return _fail("broker MQTT", f"no CONNACK from {self.where} within "
                                        f"{self.timeout:g} s",
                         "check the broker's log; it may be overloaded")
        kind, reason, _ = event
        if kind == "closed":
            failure = socket_failure(self.socket_error, self.where, tls=self.broker.tls)
            return _fail("broker MQTT", failure.what, failure.todo)
        if reason.is_failure:
            failure = connack_failure(int(reason.value), str(reason), self.where,
                                      self.gateway_id)
            return _fail("broker MQTT", failure.what, failure.todo)
        return _pass("broker MQTT", f"CONNECT accepted as {self.gateway_id} (MQTT v5)")

    def publish(self, topic: str, payload: bytes) -> Item:
        assert self.client is not None  # noqa: S101 - connect() succeeded
        info = self.client.publish(topic, payload, qos=1, retain=False)
        while (event := self._next(("puback", "closed"))) is not None:
            kind, first, reason = event
            if kind == "closed":
                return _fail("broker publish", f"{self.where} closed the connection after the "
                                               f"test publish on {topic} (an MQTT 3 broker "
                                               "refusing it by its ACL does that)",
                             _ACL_FIX.format(gw=self.gateway_id))
            if first != info.mid:
                continue
            if reason is not None and reason.is_failure:
                code = int(reason.value)
                what = (f"the broker refused the test publish on {topic}: {reason} "
                        f"(PUBACK 0x{code:02X})")
                if code == 0x87:
                    return _fail("broker publish", f"{what}: its ACL does not let this "
                                                   "gateway publish under its own prefix",
                                 _ACL_FIX.format(gw=self.gateway_id))
                return _fail("broker publish", what, "check the broker's log")
            return _pass("broker publish", f"a QoS 1 test message on {topic} acknowledged "
                                           "(PUBACK): the ACL lets this gateway publish")
        return _fail("broker publish", f"no PUBACK for the test publish on {topic} within "
                                       f"{self.timeout:g} s", "check the broker's log")

    def _on_log(self, _client: mqtt.Client, _userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and text.startswith(_SOCKET_ERRORS):
            self.socket_error = text

    def _next(self, kinds: tuple[str, ...]) -> tuple[str, Any, Any] | None:
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                return None
            if event[0] in kinds:
                return event
        return None


_ACL_FIX = ("the platform must deploy the broker ACL of docs/broker.md (core/topics.py "
            "broker_acl): user {gw} may write smartcorr/v1/gw/{gw}/records, /status and "
            "/check")


# -- the clock ---------------------------------------------------------------------------------
_CLOCK_FIX = ("let NTP reach its servers ('timedatectl timesync-status' or 'chronyc "
              "tracking' says why not) or give the GNSS antenna a view of the sky; records "
              "made meanwhile say 'unsynced'")


def _clock(ctx: _Context) -> None:
    daemon = ctx.daemon
    if daemon.alive:
        clock = daemon.section("clock")
        if not clock:
            ctx.items.append(_warn("clock", "the running daemon does not report its clock",
                                   "an older daemon: 'journalctl -u smartcorr-gateway' shows "
                                   "its time.step lines"))
            return
        source = clock.get("source")
        offset = clock.get("offset_ms")
        more = f", {offset:+d} ms from the system clock" if isinstance(offset, int) else ""
        if clock.get("trusted") is True:
            ctx.items.append(_pass("clock", f"synchronised (source {source}{more})"))
        else:
            ctx.items.append(_fail("clock", f"not synchronised: the gateway stamps its records "
                                            f"'unsynced' (source {source}{more})", _CLOCK_FIX))
        return
    if kernel_clock_synced():
        ctx.items.append(_pass("clock", "the kernel's clock is synchronised (NTP)"))
    elif ctx.cfg.gnss is not None:
        ctx.items.append(_warn("clock", "the kernel's clock is not synchronised (no NTP); the "
                                        "gateway takes GNSS time once it has a fix",
                               f"{_NOT_RUNNING} the clock it uses"))
    else:
        ctx.items.append(_fail("clock", "the kernel's clock is not synchronised (no NTP), and "
                                        "no GNSS receiver is configured", _CLOCK_FIX))


# -- devices, kiosks, tags ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Port:
    exists: bool
    read_write: bool
    hint: str


def _port(path: str) -> _Port:
    """Whether a configured serial port is there, and ours to open (``diag ports`` says
    more: who holds it, what answers on it)."""
    if not Path(path).exists():
        hint = ("check the cable, and that 'ls -l /dev/serial/by-id/' lists this name"
                if "/by-id/" in path else "check the cable")
        return _Port(False, False, hint)
    return _Port(True, os.access(path, os.R_OK | os.W_OK), "")


def _devices(ctx: _Context) -> None:
    cfg, daemon = ctx.cfg, ctx.daemon
    rows = {r.get("port"): r for r in daemon.rows("devices")}
    for device in cfg.devices:
        name = f"device {device.name}"
        port = _port(device.path)
        if not port.exists:
            ctx.items.append(_fail(name, f"{device.kind.label} port {device.path} is missing",
                                   f"plug the {device.kind.label} in; {port.hint} (the path "
                                   "in [[devices]] must name it; 'diag ports' lists what is "
                                   "there)"))
            continue
        if not port.read_write:
            ctx.items.append(_fail(name, f"{device.path} may not be read and written by this "
                                         "user", "add the gateway's user to the group owning "
                                                 "it (dialout), or run the check as that user"))
            continue
        if not daemon.alive:
            ctx.items.append(_warn(name, f"{device.kind.label} port {device.path} present",
                                   f"{_NOT_RUNNING} the device"))
            continue
        ctx.items.append(_device(name, device.path, rows.get(device.path)))
    if ctx.gateway_id is None:
        return  # the identity does not load (above): its pairings cannot be read
    identity = load_identity(ctx.cfg.identity_path, repair=False)
    try:
        kiosks = open_kiosks(identity)
        try:
            serials = [k.serial for k in kiosks]
        finally:
            kiosks.close()
        try:
            registry = open_registry(identity)
            try:
                paired: list[tuple[str, int]] | None = [(t.tag, t.absent_after_s)
                                                        for t in registry]
            finally:
                registry.close()
        except RegistryError:
            paired = None  # the identity item says what is wrong with it
    finally:
        identity.close()
    _kiosks(ctx, serials)
    if paired is not None:
        _tags(ctx, paired)


def _device(name: str, path: str, row: Mapping[str, Any] | None) -> Item:
    if row is None:
        return _fail(name, f"the running daemon does not report {path}",
                     "restart the gateway if the configuration changed since it started")
    handshake = str(row.get("handshake") or "pending")
    if not row.get("held"):
        return _fail(name, f"the daemon cannot open {path} ({handshake})",
                     "check the cable; 'diag ports' and the daemon's log say why")
    if handshake == "ok":
        return _pass(name, f"{row.get('serial')} firmware {row.get('firmware')}, "
                           f"{row.get('frames')} frame(s), {row.get('errors')} error(s)")
    if handshake.startswith("failed"):
        return _fail(name, f"the device on {path} was refused: {handshake}",
                     "connect the right device to this port (the [[devices]] kind), or update "
                     "its firmware (docs/serial-protocol.md)")
    return _fail(name, f"the port {path} is open but no device answered its handshake",
                 "check the device is powered and on this port; 'diag ports' shows the ports")


def _kiosks(ctx: _Context, serials: list[str]) -> None:
    configured = [d for d in ctx.cfg.devices if d.kind is DeviceClass.KIOSK]
    if serials and not configured:
        ctx.items.append(_fail("kiosks", f"{len(serials)} kiosk(s) paired, but no [[devices]] "
                                         "of kind kiosk", "add the kiosk's port to the "
                                                          "configuration"))
        return
    rows = [r for r in ctx.daemon.rows("devices") if r.get("role") == DeviceClass.KIOSK.label]
    for serial in serials:
        name = f"kiosk {serial}"
        if not ctx.daemon.alive:
            ctx.items.append(_warn(name, "paired", f"{_NOT_RUNNING} that it is connected"))
            continue
        row = next((r for r in rows if r.get("serial") == serial), None)
        if row is not None and row.get("handshake") == "ok":
            ctx.items.append(_pass(name, f"connected on {row.get('port')}, firmware "
                                         f"{row.get('firmware')}"))
        else:
            others = [str(r.get("serial")) for r in rows if r.get("serial")]
            ctx.items.append(_fail(name, "paired, but not connected" + (
                f" (the kiosk port has {', '.join(others)})" if others else ""),
                "connect this kiosk to the kiosk port, or pair the kiosk that is there "
                "(provision pair-kiosk)"))
    for row in rows:
        if row.get("serial") and row.get("serial") not in serials:
            ctx.items.append(_fail(f"kiosk {row.get('serial')}", "connected but not paired: "
                                   "its check-ins are refused (kiosk.spoof)",
                                   "pair it: provision pair-kiosk --serial "
                                   f"{row.get('serial')}"))


def _tags(ctx: _Context, paired: list[tuple[str, int]]) -> None:
    receivers = [d for d in ctx.cfg.devices if d.kind is DeviceClass.TAG_RECEIVER]
    if not paired:
        if receivers:
            ctx.items.append(_warn("tags", "no tag paired: nothing is monitored",
                                   "pair the tag: provision pair-tag --tag T... --operator "
                                   "NAME"))
        return
    if not receivers:
        ctx.items.append(_fail("tags", f"{len(paired)} tag(s) paired, but no [[devices]] of "
                                       "kind tag_receiver", "add the receiver's port to the "
                                                            "configuration"))
        return
    daemon = ctx.daemon
    rows = {r.get("tag"): r for r in daemon.rows("tags")}
    uptime = daemon.uptime_s()
    authorised = authorised_tags(ctx.cfg.data_dir, time.time_ns() // 1_000_000) \
        if ctx.cfg.require_authorisation else None
    for tag, absent_after in paired:
        ctx.items.append(_tag(tag, absent_after, rows.get(tag), daemon, uptime))
        if ctx.cfg.require_authorisation and tag not in (authorised or ()):
            ctx.items.append(_warn(
                f"tag {tag} authorisation", "no authorisation in force: nothing of its "
                "presence is recorded (Art. 29; [supervision] require_authorisation)",
                "the platform authorises the monitoring: ingest command --gw GW "
                f"set-authorisation --tag {tag} ... (docs/supervision.md); its beacons are "
                "counted and dropped until then"))


def _tag(tag: str, absent_after: int, row: Mapping[str, Any] | None, daemon: Daemon,
         uptime: int | None) -> Item:
    name = f"tag {tag}"
    if not daemon.alive:
        return _warn(name, f"paired (absent after {absent_after} s)",
                     f"{_NOT_RUNNING} that it is heard")
    if row is None:
        return _fail(name, "paired after the gateway started: it is not listening for it",
                     "restart the gateway (systemctl restart smartcorr-gateway)")
    age = _ago(daemon, row.get("last_beacon_ms"))
    written = daemon.number("written_at_ms") or 0
    last = row.get("last_beacon_ms")
    age_s = (written - last) // _MS if isinstance(last, int) else None
    rssi = row.get("rssi_dbm")
    if age_s is not None and age_s <= TAG_HEARD_WITHIN_S:
        return _pass(name, f"heard {age} ago, RSSI {rssi} dBm, {row.get('beacons')} "
                           "beacon(s) since the start")
    fix = (f"check the tag is charged, worn and in range (provision range-test --tag {tag}), "
           "and that its key was loaded into it (a beacon under another key is a tag.spoof "
           "alarm, not a presence)")
    if age_s is None and uptime is not None and uptime < TAG_HEARD_WITHIN_S:
        return _warn(name, f"not heard yet (the gateway started {uptime} s ago)",
                     "run the check again in a minute")
    if age_s is None:
        since = f" (started {_seconds(uptime)} ago)" if uptime is not None else ""
        return _fail(name, f"not heard since the gateway started{since}", fix)
    return _fail(name, f"not heard for {age} (its last beacon, RSSI {rssi} dBm)", fix)


# -- GNSS ---------------------------------------------------------------------------------------
def _gnss(ctx: _Context) -> None:
    ctx.items.append(_gnss_item(ctx))


_NO_POSITION = ("no installed position: a moved gateway raises no alarm",
                "set [gnss] installed_lat and installed_lon to where the unit is installed")


def _gnss_item(ctx: _Context) -> Item:  # noqa: PLR0911 - one outcome per case
    gnss, daemon = ctx.cfg.gnss, ctx.daemon
    if gnss is None:
        return _warn("GNSS", "no GNSS receiver configured: a moved gateway goes unnoticed, and "
                             "the clock rests on NTP alone",
                     "configure [gnss] (path, installed_lat, installed_lon)")
    port = _port(gnss.path)
    if not port.exists:
        return _fail("GNSS", f"port {gnss.path} is missing",
                     f"plug the GNSS receiver in; {port.hint} ('diag ports' lists what is "
                     "there)")
    if not daemon.alive:
        more = f"; {_NO_POSITION[0]}" if gnss.installed is None else ""
        return _warn("GNSS", f"port {gnss.path} present{more}", f"{_NOT_RUNNING} the fix")
    row = next((r for r in daemon.rows("devices") if r.get("port") == gnss.path), None)
    if row is not None and not row.get("held"):
        return _fail("GNSS", f"the daemon cannot open {gnss.path}",
                     "check the cable; 'diag ports' and the daemon's log say why")
    fix = daemon.section("gnss")
    if not fix:
        return _warn("GNSS", "the running daemon does not report GNSS",
                     "an older daemon: its log says more")
    uptime = daemon.uptime_s()
    if fix.get("fix") is not True:
        last = _ago(daemon, fix.get("last_fix_ms"))
        detail = "no fix" + (f" for {last}" if last else " since the gateway started")
        if last is None and uptime is not None and uptime < GNSS_COLD_START_S:
            return _warn("GNSS", f"{detail} ({uptime} s ago): a cold start takes a few minutes",
                         "run the check again in a few minutes")
        return _fail("GNSS", detail, "give the antenna a view of the sky (near a window), "
                                     "check its cable")
    what = f"fix, {fix.get('sats')} satellites, HDOP {fix.get('hdop')}"
    if gnss.installed is None:
        return _warn("GNSS", f"{what}; {_NO_POSITION[0]}", _NO_POSITION[1])
    distance = fix.get("distance_from_installed_m")
    if not isinstance(distance, int):
        return _pass("GNSS", what)
    radius = gnss.installed.radius_m
    if distance > radius:
        return _fail("GNSS", f"{what}; {distance} m from the installed position, beyond its "
                             f"radius of {radius} m: a gateway.moved alarm follows",
                     "if the unit is where it was installed, the installed position is "
                     "wrong: correct [gnss] installed_lat/installed_lon (the change is "
                     "recorded as config.changed)")
    return _pass("GNSS", f"{what}; {distance} m from the installed position (radius "
                         f"{radius} m)")


# -- disk ---------------------------------------------------------------------------------------
def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _disk(ctx: _Context) -> None:
    cfg, disk = ctx.cfg, ctx.daemon.section("disk")
    store, quota, free = (disk.get(k) for k in ("store_bytes", "quota_bytes", "free_bytes"))
    if not all(isinstance(v, int) for v in (store, quota, free)):
        st = os.statvfs(_existing(cfg.data_dir))
        free = st.f_bavail * st.f_frsize
        store = store_files_bytes(store_path(cfg.data_dir))
        quota = cfg.quota_bytes if cfg.quota_bytes is not None else \
            default_quota(_existing(cfg.data_dir))
    if not isinstance(store, int) or not isinstance(quota, int) or not isinstance(free, int):
        raise TypeError("disk figures")  # pragma: no cover - computed just above
    what = (f"{_mib(free)} free; the record store holds {_mib(store)} of its quota "
            f"{_mib(quota)}")
    if free + store < quota:
        ctx.items.append(_fail("disk", f"{what}: the disk cannot hold a full store (a full "
                                       "disk stops the gateway acknowledging devices)",
                               "free space on the disk, or lower [gateway] quota_bytes (at "
                               f"most {_mib(free + store)})"))
    else:
        ctx.items.append(_pass("disk", what))


# -- the daemon ---------------------------------------------------------------------------------
def _daemon(ctx: _Context) -> None:
    daemon = ctx.daemon
    if daemon.alive:
        uptime = daemon.uptime_s()
        ctx.items.append(_pass("daemon", f"running (pid {daemon.number('pid')}, version "
                                         f"{(daemon.state or {}).get('version')}"
                                         + (f", up {_seconds(uptime)}" if uptime is not None
                                            else "") + ")"))
        return
    if daemon.error is not None:
        ctx.items.append(_fail("daemon", daemon.error, "run the check as the gateway's user "
                                                       "or as root"))
        return
    if daemon.lock_pid is not None:
        ctx.items.append(_fail("daemon", f"a gateway (pid {daemon.lock_pid}) holds "
                                         f"{ctx.cfg.data_dir} but writes no current state in "
                                         f"{daemon.runtime_dir}",
                               "restart it (systemctl restart smartcorr-gateway); if this "
                               "persists, [paths] runtime_dir must be the same for it and "
                               "for this command"))
        return
    detail = "not running" + (f" (its last state is {_seconds(daemon.stale_ms // _MS)} old)"
                              if daemon.stale_ms is not None else "")
    if ctx.options.before_start:
        ctx.items.append(_warn("daemon", f"{detail} (--before-start)", START_HINT))
    else:
        ctx.items.append(_fail("daemon", f"{detail}: nothing is recorded", START_HINT))


# -- hardening ----------------------------------------------------------------------------------
def _hardening(ctx: _Context) -> None:
    """The unit's hardening (app/hardening.py: sshd, consoles, passwords, the service's user
    and unit, the modes and owners of the production layout, the code's integrity), each
    finding a line under its own name."""
    if ctx.options.skip_hardening:
        ctx.items.append(_warn("hardening", "not checked (--skip-hardening)",
                               "check it on the unit as installed (docs/hardening.md)"))
        return
    for finding in hardening_findings(ctx.options.root):
        ctx.items.append(Item(finding.name, Outcome(str(finding.status)), finding.detail,
                              finding.fix))


# -- output -------------------------------------------------------------------------------------
def exit_code(items: list[Item]) -> int:
    return 1 if any(i.ok is Outcome.FAIL for i in items) else 0


def summary(items: list[Item]) -> dict[str, Any]:
    failed = sum(i.ok is Outcome.FAIL for i in items)
    warned = sum(i.ok is Outcome.WARN for i in items)
    return {"ok": failed == 0, "failed": failed, "warnings": warned,
            "items": [i.to_json() for i in items]}


_MARKS = {True: {Outcome.PASS: "✔", Outcome.WARN: "!", Outcome.FAIL: "✘"},
          False: {Outcome.PASS: "PASS", Outcome.WARN: "WARN", Outcome.FAIL: "FAIL"}}


def render(items: list[Item], *, unicode: bool) -> str:
    """One line per item (and the fix under each warning or failure), then a verdict."""
    marks = _MARKS[unicode]
    arrow = "→" if unicode else "->"
    width = max(len(i.name) for i in items)
    lines = []
    for item in items:
        lines.append(f"{marks[item.ok]:<{4 if not unicode else 1}} {item.name:<{width}}  "
                     f"{item.detail}")
        if item.fix and item.ok is not Outcome.PASS:
            lines.append(f"{'':<{4 if not unicode else 1}} {'':<{width}}  {arrow} {item.fix}")
    out = summary(items)
    lines.append(f"{out['failed']} failed, {out['warnings']} warning(s): " +
                 ("the installation is ready" if out["ok"] else "NOT ready: fix each line "
                                                                 "marked "
                                                                 f"{marks[Outcome.FAIL]}"))
    return "\n".join(lines)
