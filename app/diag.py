"""``gateway.py diag``: what a technician on site asks, answered without personal data.

Every command reads the same configuration as the daemon, may run while the
daemon runs (the store is opened read-only), prints a readable report, and with
``--json`` one JSON object. Nothing here prints a key, a tag id, a person
reference or a position; the support bundle includes records only when asked
(``--include-personal``), and then only the ones still queued.

What the bundle holds without ``--include-personal``: ``reports.json`` (buffer, keys
and ports reports: counts, key ids, paths) and ``gateway.json``, the configuration
re-encoded from its parsed values with every key of :data:`PERSONAL_KEYS` replaced by
:data:`REDACTED` (comments are dropped: they may say anything). Personal: the
installed position (``[gnss] installed_lat``/``installed_lon``), which is the
supervised person's home. Not personal, kept: device paths (by-id names carry the
devices' serial numbers, not a person), the broker, directories, intervals, radius.
"""

from __future__ import annotations

import calendar
import io
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import ports as port_probe
from app.assembly import VERSION
from app.config import Config
from app.ports import PROBE_TIMEOUT_S, REPORT_KEYS, Configured, DaemonView
from app.state import (
    BY_ID_DIR,
    DEFAULT_RUNTIME_DIR,
    STATE_FILE,
    StateError,
    daemon_alive,
    read_state,
    state_age_ms,
)
from buffer.store import StoreReader, inspect_store, store_path
from core.clock import kernel_clock_synced
from core.errors import UserError
from provisioning.command_keys import report as command_keys_report
from provisioning.identity import load_identity
from provisioning.registry import REGISTRY_FILE, RegistryError, open_registry
from uplink.certs import Severity, check_certificates, read_tls_files

#: Configuration keys whose values are personal data, by section: never in a bundle.
PERSONAL_KEYS: dict[str, frozenset[str]] = {
    "gnss": frozenset({"installed_lat", "installed_lon"}),
}
REDACTED = "<redacted: personal data>"
#: The systemd unit whose journal a bundle reads (packaging/smartcorr-gateway.service).
JOURNAL_UNIT = "smartcorr-gateway"
#: Log lines a bundle holds by default, and its bounds.
DEFAULT_LOG_LINES = 500
MAX_LOG_LINES = 10_000
MAX_LOG_LINE_CHARS = 2000
MAX_LOG_TAIL_BYTES = 4 * 1024 * 1024
JOURNAL_TIMEOUT_S = 20.0
LOG_MEMBER = "logs.txt"
#: The longest probe of a port ``diag ports --timeout`` accepts, seconds.
MAX_PROBE_TIMEOUT_S = 60.0
#: Certificates listed per file at most (a CA file may hold a chain).
MAX_CERTIFICATES = 16
DAY_MS = 86_400_000


def buffer_report(cfg: Config) -> dict[str, Any]:
    db = store_path(cfg.data_dir)
    if not db.exists():
        return {"store": str(db), "exists": False}
    return {"store": str(db), "exists": True} | inspect_store(db)


def keys_report(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"identity_dir": str(cfg.identity_dir)}
    try:
        ident = load_identity(cfg.identity_path, repair=False)  # the daemon repairs
    except UserError as exc:  # IdentityError; TpmError: the TPM does not answer, or another
        return out | {"ok": False, "error": str(exc)}
    staged = ident.next_key
    problems = []
    for name in ("signing.key", "storage.key", "signing.next.key", REGISTRY_FILE):
        path = cfg.identity_path / name
        if path.exists() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            problems.append(f"{path} is readable by others: chmod 600 {path}")
    try:
        registry = open_registry(ident)
        tags = sum(1 for _ in registry)
        registry.close()
    except RegistryError as exc:
        problems.append(str(exc))
        tags = None
    from core.suites import key_id

    warnings = []
    if ident.key_class != "tpm":
        warnings.append("the identity key is a file on this disk (no TPM): a copy of the "
                        "disk can sign as this gateway; provision with a TPM outside the lab")
    if ident.storage_class != "tpm":
        warnings.append("the storage key is a file on this disk (no TPM): a copy of the "
                        "disk decrypts the stored records")
    ident.close()
    # the platform's command keys (docs/command-keys.md): root, certificates, expiry
    commands = command_keys_report(cfg.identity_path, int(time.time() * 1000))
    warnings += commands.pop("warnings")
    problems += commands.pop("problems")
    # the uplink's TLS files, as the daemon checks them before it connects
    certificates = certificates_report(cfg, ident.gateway_id, problems, warnings)
    return out | {
        "ok": not problems, "gateway_id": ident.gateway_id, "kid": ident.kid,
        "alg": ident.key.alg, "key_class": ident.key_class,
        "storage_class": ident.storage_class, "suite": ident.suite.name,
        "warnings": warnings,
        "staged_kid": key_id(staged.alg, staged.public_raw) if staged else None,
        "paired_tags": tags, "command_keys": commands, "certificates": certificates,
        "problems": problems,
    }


def certificates_report(cfg: Config, gateway_id: str, problems: list[str],
                        warnings: list[str]) -> dict[str, Any]:
    """The uplink's TLS files checked as the daemon checks them (uplink/certs.py): one line
    per error added to *problems*, per warning to *warnings*. The time is trusted when the
    kernel says NTP synchronised it (a certificate not yet valid by an unsynchronised
    clock is a warning here; the daemon checks again once it has trusted time)."""
    broker = cfg.broker
    if not broker.tls:
        return {"tls": False}
    files = read_tls_files(broker.ca_file, broker.cert_file, broker.key_file)
    report = check_certificates(files, gateway_id, now_ms=time.time_ns() // 1_000_000,
                                trusted=kernel_clock_synced())
    for finding in report.findings:
        (problems if finding.severity is Severity.ERROR else warnings).append(
            f"uplink: {finding.line}")
    return {
        "tls": True, "ca_file": files.ca_path, "cert_file": files.cert_path,
        "key_file": files.key_path, "cert_sha256": report.fingerprint,
        "not_after": _utc(report.not_after_ms),
        "findings": [{"code": str(f.code), "severity": str(f.severity), "what": f.what,
                      "todo": f.todo} for f in report.findings],
    }


def _utc(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def ports_report(cfg: Config, *, probe: bool = False, timeout_s: float = PROBE_TIMEOUT_S,
                 by_id_dir: Path = BY_ID_DIR) -> dict[str, Any]:
    """The configured ports (each under its name: present, a tty, who holds it, the
    device's handshake, serial, firmware, frames and errors), ``by_id`` (what
    /dev/serial/by-id lists), ``daemon``, ``problems`` and ``warnings`` (app/ports.py). A
    port the running daemon holds is reported from its state file; with *probe*, a port
    nobody holds is asked for its device's HELLO (or listened to, for GNSS)."""
    configured = [Configured(d.name, d.kind.label, d.path, d.baudrate, d.kind) for d in cfg.devices]
    if cfg.gnss is not None:
        configured.append(Configured("gnss", "gnss", cfg.gnss.path, cfg.gnss.baudrate, None))
    view = daemon_view(cfg)
    return port_probe.ports_report(configured, view, probe=probe, timeout_s=timeout_s,
                                   by_id_dir=by_id_dir)


class DiagError(UserError):
    """A diagnostic cannot be made as asked (e.g. where the bundle goes); the message says why."""


def check_out(out: Path) -> None:
    """Refuse a bundle path that cannot be a new file, before anything is done or recorded."""
    if out.is_dir():
        raise DiagError(f"--out {out} is a directory: give a file path, e.g. "
                        f"{out / 'smartcorr-bundle.tar.gz'}")
    parent = out.parent
    if not parent.is_dir():
        raise DiagError(f"--out {out}: the directory {parent} does not exist: create it or "
                        "give a file path in an existing directory")


# -- the daemon's state -------------------------------------------------------------------------
def runtime_dir(cfg: Config) -> Path | None:
    """Where the daemon writes its state (``[paths] runtime_dir``; None: a configuration
    built in code, which has none)."""
    if cfg.runtime_dir is None and cfg.source is not None:
        return DEFAULT_RUNTIME_DIR
    return cfg.runtime_dir


def read_daemon_state(cfg: Config) -> tuple[dict[str, Any] | None, DaemonView]:
    """The daemon's state (None when there is none or it cannot be read) and what it says
    of the daemon: running, its pid and version, when it wrote, or why it is not known."""
    where = runtime_dir(cfg)
    if where is None:
        return None, DaemonView(False, {"running": False, "note": "no runtime_dir: no state "
                                        "file to read"}, [])
    path = str(where / STATE_FILE)
    try:
        state = read_state(where)
    except StateError as exc:
        return None, DaemonView(None, {"running": None, "state_file": path, "note": str(exc)},
                                [])
    if state is None:
        return None, DaemonView(False, {"running": False, "state_file": path,
                                        "note": f"no state file in {where}: not running, or "
                                                "with another runtime_dir"}, [])
    alive = daemon_alive(state)
    written = state.get("written_at_ms")
    summary: dict[str, Any] = {
        "running": alive, "pid": state.get("pid"), "version": state.get("version"),
        "gateway_id": state.get("gateway_id"), "state_file": path,
        "started": _utc(_int(state.get("started_at_ms"))), "written": _utc(_int(written)),
    }
    if not alive:
        age = state_age_ms(state)
        summary["note"] = ("the state file is stale" + (f" (written {age // 1000} s ago)"
                                                        if age is not None else "")
                           + ": the gateway is not running (it stopped without removing it, "
                             "or was killed)")
    devices = state.get("devices")
    rows = [d for d in devices if isinstance(d, dict)] if isinstance(devices, list) else []
    gnss = state.get("gnss")
    return state, DaemonView(alive, summary, rows, gnss if isinstance(gnss, dict) else {})


def daemon_view(cfg: Config) -> DaemonView:
    return read_daemon_state(cfg)[1]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


#: Parts of the daemon's state a bundle keeps, and their keys: an allowlist, so that a
#: field a later daemon adds (a position?) stays out until someone decides it may go in.
STATE_IN_BUNDLE: dict[str, frozenset[str]] = {
    "uplink": frozenset({"state", "reason", "since_ms", "queued", "queued_by_class",
                         "held", "linger_s", "last_ack_ms", "target", "tls"}),
    "clock": frozenset({"source", "trusted", "offset_ms"}),
    "gnss": frozenset({"configured", "fix", "sats", "hdop", "distance_from_installed_m",
                       "last_fix_ms", "moved"}),
    "disk": frozenset({"store_bytes", "quota_bytes", "free_bytes"}),
}
DEVICE_KEYS_IN_BUNDLE = frozenset({"name", "role", "port", "by_id", "held", "handshake",
                                   "serial", "firmware", "frames", "errors", "last_heard_ms"})
TAG_KEYS_IN_BUNDLE = frozenset({"tag", "present", "last_beacon_ms", "rssi_dbm", "beacons",
                                "counter"})
#: Keys of the state holding a wall-clock time in ms: a bundle shows them as UTC text.
TIME_KEYS = frozenset({"started_at_ms", "written_at_ms", "since_ms", "last_ack_ms",
                       "last_heard_ms", "last_beacon_ms", "last_fix_ms", "t_ms"})


def bundle_state(state: dict[str, Any] | None, *, include_personal: bool) -> dict[str, Any]:
    """What a bundle says of the running gateway, from its state: the uplink, the clock,
    GNSS (never a position), the disk, the devices, the tags (counted; their ids only with
    *include_personal*) and the last alarms (seq, kind and time, never a body)."""
    if state is None:
        return {"uplink": {"state": "unknown", "why": "the gateway is not running (no state "
                                                      "file)"}}
    out: dict[str, Any] = {}
    for section, keys in STATE_IN_BUNDLE.items():
        value = state.get(section)
        if isinstance(value, dict):
            out[section] = _human_times({k: v for k, v in value.items() if k in keys})
    devices = state.get("devices")
    if isinstance(devices, list):
        out["devices"] = [_human_times({k: v for k, v in d.items() if k in DEVICE_KEYS_IN_BUNDLE})
                          for d in devices if isinstance(d, dict)]
    tags = [t for t in state.get("tags") or [] if isinstance(t, dict)]
    out["tags"] = {"listed": len(tags), "total": state.get("tags_total", len(tags)),
                   "present": sum(t.get("present") is True for t in tags),
                   "absent": sum(t.get("present") is False for t in tags)}
    if include_personal:
        out["tags"]["tags"] = [_human_times({k: v for k, v in t.items()
                                             if k in TAG_KEYS_IN_BUNDLE}) for t in tags]
    alarms = state.get("last_alarms")
    if isinstance(alarms, list):
        out["last_alarms"] = [_human_times({k: a.get(k) for k in ("seq", "kind", "t_ms")})
                              for a in alarms if isinstance(a, dict)]
    return out


def _human_times(table: dict[str, Any]) -> dict[str, Any]:
    """*table* with each wall-clock time in ms (:data:`TIME_KEYS`) as UTC text, its key
    without ``_ms`` (``since_ms`` becomes ``since``)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in TIME_KEYS:
            out[key.removesuffix("_ms").removesuffix("_at") if key != "t_ms" else "time"] = \
                _utc(_int(value))
        elif isinstance(value, dict):
            out[key] = _human_times(value)
        else:
            out[key] = value
    return out


# -- certificates: dates, never keys ----------------------------------------------------------
def certificate_dates(cfg: Config, now_ms: int) -> list[dict[str, Any]]:
    """The uplink's certificate and its CA's: subject, issuer, serial, validity in UTC text
    and days left. Only certificate files are read (never ``key_file``)."""
    from cryptography import x509

    out: list[dict[str, Any]] = []
    for role, name in (("client", cfg.broker.cert_file), ("ca", cfg.broker.ca_file)):
        if name is None:
            continue
        try:
            data = Path(name).read_bytes()
            certs = x509.load_pem_x509_certificates(data)
        except (OSError, ValueError) as exc:
            out.append({"role": role, "file": name, "error": str(exc)})
            continue
        for cert in certs[:MAX_CERTIFICATES]:
            not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
            out.append({
                "role": role, "file": name, "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(), "serial": f"{cert.serial_number:x}",
                "not_before": _utc(int(cert.not_valid_before_utc.timestamp() * 1000)),
                "not_after": _utc(not_after), "days_left": (not_after - now_ms) // DAY_MS,
            })
    return out


# -- recent logs ----------------------------------------------------------------------------------
@dataclass
class Logs:
    """Recent log lines and where they came from (``journald``, ``file``, or None: none
    could be had, ``note`` says why)."""

    source: str | None
    lines: list[str]
    note: str | None = None


def recent_logs(log_file: Path | None, count: int = DEFAULT_LOG_LINES) -> Logs:
    """The last *count* lines of the gateway's log: from *log_file* when given (the daemon's
    stderr sent to a file), else from journald (``journalctl -u smartcorr-gateway``)."""
    if log_file is not None:
        return _log_file_tail(log_file, count)
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        return Logs(None, [], "no journalctl here: give the daemon's log with --log-file FILE")
    try:
        done = subprocess.run(
            [journalctl, "-u", JOURNAL_UNIT, "-n", str(count), "-o", "json", "--no-pager",
             "-q"], capture_output=True, timeout=JOURNAL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Logs(None, [], f"journalctl failed ({exc})")
    lines = [line for raw in done.stdout.splitlines()[-count:]
             if (line := _journal_line(raw)) is not None]
    if not lines:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        return Logs("journald", [], f"no entries for the unit {JOURNAL_UNIT}"
                    + (f" ({why[0][:200]})" if why else "")
                    + (": the daemon does not run as that systemd unit here: give its log "
                       "with --log-file FILE" if os.geteuid() == 0 else
                       ": run as root or a member of group systemd-journal, or give "
                       "--log-file FILE"))
    return Logs("journald", lines)


def _journal_line(raw: bytes) -> str | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    message = entry.get("MESSAGE")
    if isinstance(message, list):  # not UTF-8: journald gives the bytes
        message = bytes(b for b in message if isinstance(b, int) and 0 <= b < 256).decode(
            errors="replace")
    if not isinstance(message, str):
        return None
    try:
        when = _utc(int(entry.get("__REALTIME_TIMESTAMP", "")) // 1000)
    except ValueError:
        when = None
    level = _PRIORITIES.get(str(entry.get("PRIORITY")), "")
    return f"{when or '?'} {level} {message}"[:MAX_LOG_LINE_CHARS]


_PRIORITIES = {"0": "emerg", "1": "alert", "2": "crit", "3": "err", "4": "warning",
               "5": "notice", "6": "info", "7": "debug"}


def _log_file_tail(path: Path, count: int) -> Logs:
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - MAX_LOG_TAIL_BYTES))
            data = file.read(MAX_LOG_TAIL_BYTES)
    except OSError as exc:
        raise DiagError(f"--log-file {path}: cannot read it ({exc.strerror or exc})") from None
    lines = data.decode(errors="replace").splitlines()
    if size > MAX_LOG_TAIL_BYTES and lines:
        lines = lines[1:]  # the first may be cut
    return Logs("file", [line[:MAX_LOG_LINE_CHARS] for line in lines[-count:]])


#: What log lines may hold of a person, replaced in a bundle without --include-personal.
_TRACE_LINE = re.compile(r"\bsmartcorr\.trace\b")
_TAG_REF = re.compile(r"\bT[0-9A-Fa-f]{8}\b")
_PERSON = re.compile(r"(\bperson\w*[\"']?\s*[=:]\s*[\"']?)([^\s\"',;)}\]]+)",
                     re.IGNORECASE)
_POSITION_KEYED = re.compile(
    r"(\b(?:lat|lon|lng|latitude|longitude)(?:_e7|_deg)?[\"']?\s*[=:]\s*[\"']?)"
    r"(-?\d+(?:[.,]\d+)?)", re.IGNORECASE)
_POSITION_PAIR = re.compile(r"-?\d{1,3}[.,]\d{3,}\s*[,;/ ]\s*-?\d{1,3}[.,]\d{3,}")
_NMEA = re.compile(r"\$[A-Z]{2}[A-Z]{3},\S*")
_HEX_RUN = re.compile(r"(?:\b[0-9a-fA-F]{2}\b[ :]){15,}\b[0-9a-fA-F]{2}\b")
#: The same detectors by what they find, for checks of other texts (lab/technician_guide.py).
PERSONAL_PATTERNS: dict[str, re.Pattern[str]] = {
    "raw serial trace": _TRACE_LINE, "NMEA sentence": _NMEA, "hex dump": _HEX_RUN,
    "tag id": _TAG_REF, "person reference": _PERSON, "position": _POSITION_KEYED,
    "coordinate pair": _POSITION_PAIR}


@dataclass(frozen=True)
class Personal:
    """Values of this gateway that are personal data, to strike from its logs: the forms
    of the installed position and the paired tags' ids."""

    texts: tuple[str, ...] = ()

    @classmethod
    def of(cls, cfg: Config) -> Personal:
        texts: list[str] = []
        installed = cfg.gnss.installed if cfg.gnss is not None else None
        if installed is not None:
            for e7 in (installed.lat_e7, installed.lon_e7):
                degrees = abs(e7) / 1e7
                texts += [str(abs(e7)), str(abs(e7))[:6]]
                texts += [f"{degrees:.{n}f}" for n in range(3, 8)]
                texts += [t.replace(".", ",") for t in texts[-5:]]
        for tag in _paired_tags(cfg):
            number = int(tag[1:], 16)
            texts += [tag, f"0x{number:x}", f"0x{number:08x}", f"{number:08x}"]
        return cls(tuple(sorted(set(texts), key=len, reverse=True)))


def _paired_tags(cfg: Config) -> list[str]:
    """The paired tags' ids (an empty list when the identity or registry cannot be read:
    the generic rules still strike tag ids)."""
    try:
        identity = load_identity(cfg.identity_path, repair=False)
    except UserError:
        return []
    try:
        registry = open_registry(identity)
        try:
            return [tag.tag for tag in registry]
        finally:
            registry.close()
    except (RegistryError, OSError):
        return []
    finally:
        identity.close()


def redact_log_line(line: str, personal: Personal) -> str:
    """*line* without personal data: raw serial traces withheld whole; tag ids, person
    references, positions (keyed, in pairs, in NMEA sentences, and this gateway's installed
    position in any of its forms) and long hex dumps replaced."""
    if _TRACE_LINE.search(line):
        return line.split(" smartcorr.trace", 1)[0] + " <raw serial trace withheld: personal data>"
    out = _NMEA.sub("<NMEA sentence withheld>", line)
    out = _HEX_RUN.sub("<hex withheld>", out)
    out = _TAG_REF.sub("<tag>", out)
    out = _PERSON.sub(r"\1<person>", out)
    out = _POSITION_KEYED.sub(r"\1<position>", out)
    out = _POSITION_PAIR.sub("<position>", out)
    for text in personal.texts:
        if text.upper() in out.upper():
            out = re.sub(re.escape(text), "<redacted>", out, flags=re.IGNORECASE)
    return out


# -- the bundle -----------------------------------------------------------------------------------
def versions(state: dict[str, Any] | None) -> dict[str, Any]:
    """This program's version, the running daemon's, Python's and the system's."""
    return {"gateway": VERSION, "daemon": None if state is None else state.get("version"),
            "python": platform.python_version(), "system": platform.platform(terse=True)}


def bundle(cfg: Config, out: Path, *, include_personal: bool = False,
           log_file: Path | None = None, log_lines: int = DEFAULT_LOG_LINES) -> dict[str, Any]:
    """A support bundle (tar.gz, mode 0600): ``reports.json`` (versions, the daemon and its
    uplink, certificate dates, buffer, keys and ports reports, all times as UTC text),
    ``gateway.json`` (the configuration), ``logs.txt`` (recent log lines). No key ever;
    no personal data unless *include_personal* (then the queued records too, decrypted,
    and the logs as they are)."""
    check_out(out)
    now_ms = time.time_ns() // 1_000_000
    logs = recent_logs(log_file, log_lines)
    personal = Personal.of(cfg)
    log_text = logs.lines if include_personal else [redact_log_line(line, personal)
                                                     for line in logs.lines]
    state, daemon = read_daemon_state(cfg)
    status = bundle_state(state if daemon.running else None, include_personal=include_personal)
    reports = {
        "created": _utc(now_ms), "created_local": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "personal_data": include_personal, "version": versions(state),
        "daemon": daemon.summary, "uplink": status.pop("uplink", None), "status": status,
        "certificates": certificate_dates(cfg, now_ms),
        "buffer": buffer_report(cfg), "keys": keys_report(cfg), "ports": ports_report(cfg),
        "logs": {"source": logs.source, "lines": len(logs.lines), "file": LOG_MEMBER,
                 "redacted": not include_personal, "note": logs.note},
    }
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise DiagError(f"--out {out}: cannot write it ({exc.strerror or exc}): give a file "
                        "path in a directory you may write") from None
    os.fchmod(fd, 0o600)  # never readable by others, not even while it is written
    with os.fdopen(fd, "wb") as file, tarfile.open(fileobj=file, mode="w:gz") as tar:
        add_member(tar, "reports.json", json.dumps(reports, indent=2).encode())
        if cfg.source is not None:  # the installed position stays out, even with personal data
            add_member(tar, "gateway.json",
                       json.dumps(redacted_config(cfg.source), indent=2).encode())
        add_member(tar, LOG_MEMBER, "".join(f"{line}\n" for line in log_text).encode())
        if include_personal:
            add_member(tar, "records.ndjson", _queued_records(cfg))
    return {"bundle": str(out), "size": out.stat().st_size, "personal_data": include_personal,
            "logs": {"source": logs.source, "lines": len(logs.lines), "note": logs.note},
            "daemon_running": daemon.running}


def redacted_config(source: Path) -> dict[str, Any]:
    """The configuration's values (already checked by load_config) without personal data."""
    raw = tomllib.loads(source.read_text(encoding="utf-8"))
    for section, keys in PERSONAL_KEYS.items():
        tables = raw.get(section)
        for table in tables if isinstance(tables, list) else [tables]:
            if isinstance(table, dict):
                table.update(dict.fromkeys(keys & table.keys(), REDACTED))
    return raw


def _queued_records(cfg: Config) -> bytes:
    identity = load_identity(cfg.identity_path, repair=False)
    identity.close()  # the storage key is unsealed: the TPM is not needed any more
    reader = StoreReader(store_path(cfg.data_dir), identity.storage_key)
    try:
        return b"\n".join(reader.queued())
    finally:
        reader.close()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """*data* as the bundle member *name*: mode 0600, dated now."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def render(report: dict[str, Any], indent: str = "") -> str:
    """A report for people: one ``key: value`` a line, nested tables indented, lists as
    ``- item`` lines, None as ``none``, booleans as yes/no (no Python reprs)."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.append(render(value, indent + "  "))
        elif isinstance(value, list | tuple) and value:
            lines.append(f"{indent}{key}:")
            for item in value:
                if isinstance(item, dict):
                    lines.append(f"{indent}  -")
                    lines.append(render(item, indent + "    "))
                else:
                    lines.append(f"{indent}  - {_text(item)}")
        else:
            lines.append(f"{indent}{key}: {_text(value)}")
    return "\n".join(lines)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, dict | list | tuple) and not value):
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# -- reports for people ---------------------------------------------------------------------------
def render_ports(report: dict[str, Any]) -> str:
    """``diag ports`` for people: the daemon, each configured port on a few lines, what
    /dev/serial/by-id lists, then the problems and warnings."""
    daemon = report.get("daemon") or {}
    if daemon.get("running"):
        lines = [f"gateway: running (pid {daemon.get('pid')}, version {daemon.get('version')}, "
                 f"state written {_local(daemon.get('written'))}): the ports it holds are "
                 "reported from its state"]
    elif daemon.get("running") is None:
        lines = [f"gateway: unknown ({daemon.get('note')}); ports held locked are not probed"]
    else:
        lines = [f"gateway: not running ({daemon.get('note')}): the ports nobody holds are "
                 "probed"]
    for name, entry in report.items():
        if name in REPORT_KEYS or not isinstance(entry, dict):
            continue
        lines.append("")
        lines += _port_lines(name, entry)
    lines.append("")
    by_id = report.get("by_id")
    if by_id is None:
        lines.append(f"{BY_ID_DIR}: absent (udev makes it when a USB serial device is "
                     "plugged in)")
    else:
        lines.append(f"{BY_ID_DIR}:" + ("" if by_id else " empty"))
        for link in by_id:
            what = [f"looks like a {_role(link['role_guess'])}" if link.get("role_guess")
                    else "role unknown"]
            if link.get("configured_as"):
                what.append(f"configured as {', '.join(link['configured_as'])}")
            else:
                what.append("not configured")
            if link.get("held_by_gateway"):
                what.append("held by the gateway")
            lines.append(f"  {link['name']} -> {link.get('device') or '(nothing)'}  "
                         f"({'; '.join(what)})")
    for title, key in (("PROBLEMS", "problems"), ("warnings", "warnings")):
        items = report.get(key) or []
        if items:
            lines.append(f"{title}:")
            lines += [f"  - {item}" for item in items]
    if not report.get("problems"):
        lines.append("ok: every configured port is usable")
    return "\n".join(lines)


def _port_lines(name: str, entry: dict[str, Any]) -> list[str]:
    lines = [f"{name} ({_role(entry.get('role'))}): {entry.get('path')}"]
    if not entry.get("exists"):
        lines.append(f"  MISSING: {entry.get('hint') or 'not present'}")
        return lines
    device = entry.get("device")
    kind = {True: "tty", False: "NOT A TTY", None: "tty not checked"}[entry.get("tty")]
    access = {True: "read/write", False: "NO read/write access",
              None: "access unknown"}[entry.get("read_write")]
    lines.append(f"  device {device}" + (f" (by-id {entry['by_id']})"
                                         if entry.get("by_id") and entry["by_id"] not in
                                         str(entry.get("path")) else "") + f"; {kind}, {access}")
    holder = "held by the gateway" if entry.get("held_by_gateway") else "not held by the gateway"
    if entry.get("open_by"):
        holder += f"; open in {', '.join(entry['open_by'])}"
    lines.append(f"  {holder}")
    handshake = entry.get("handshake")
    if handshake is not None:
        source = {"daemon": "the gateway's", "probe": "probe"}.get(str(entry.get("source")), "")
        said = [f"{source} handshake: {handshake}"]
        if entry.get("serial"):
            said.append(f"serial {entry['serial']}")
        if entry.get("firmware"):
            said.append(f"firmware {entry['firmware']}")
        if entry.get("protocol"):
            said.append(f"protocol {entry['protocol']}")
        lines.append("  " + ", ".join(said))
        counts = f"  {entry.get('frames') or 0} frames, {entry.get('errors') or 0} errors"
        if entry.get("last_heard_ms"):
            counts += f"; last heard {_local(_utc(entry['last_heard_ms']))}"
        nmea = entry.get("nmea")
        if isinstance(nmea, dict):
            types = f" ({', '.join(nmea['types'])})" if nmea.get("types") else ""
            counts = (f"  NMEA: {nmea.get('sentences')} sentences{types}, "
                      f"{entry.get('errors') or 0} errors; "
                      + (f"fix, {nmea.get('sats')} satellites, HDOP {nmea.get('hdop')}"
                         if nmea.get("fix") else "no fix")
                      + (f"; last heard {_local(_utc(entry['last_heard_ms']))}"
                         if entry.get("last_heard_ms") else ""))
        lines.append(counts)
    elif entry.get("source") is None and not entry.get("problems"):
        lines.append("  not probed (--no-probe)")
    if entry.get("hint") and entry.get("problems"):
        lines.append(f"  hint: {entry['hint']}")
    return lines


def _role(role: object) -> str:
    return {"tag_receiver": "tag receiver", "kiosk": "kiosk", "gnss": "GNSS receiver"}.get(
        str(role), str(role))


def _local(utc_text: object) -> str:
    """UTC text (``2025-03-03T14:02:07Z``) as local time, for people on site."""
    if not isinstance(utc_text, str):
        return "unknown"
    try:
        when = time.strptime(utc_text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return utc_text
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(calendar.timegm(when)))


def render_buffer(report: dict[str, Any]) -> str:
    """``diag buffer`` for people: the store, one line per class, integrity, files."""
    if not report.get("exists"):
        return (f"store: {report.get('store')}: none yet (the gateway makes it at its first "
                "start)")
    lines = [f"store: {report['store']}", f"last seq: {report.get('last_seq')}, boot "
             f"{report.get('boot')}", "queued:"]
    classes = report.get("classes") or {}
    total = sum(int(c.get("queued") or 0) for c in classes.values())
    for label, entry in classes.items():
        oldest = entry.get("oldest_s")
        lines.append(f"  {label + ':':<11}{entry.get('queued', 0):>9,} records, "
                     f"{_bytes(entry.get('bytes'))}"
                     + (f", oldest {_duration(oldest)} old" if oldest is not None else ""))
    lines.append(f"  {'total:':<11}{total:>9,} records")
    lines.append(f"integrity: {report.get('integrity')}")
    files = report.get("files") or {}
    lines.append("files: " + (", ".join(f"{n} {_bytes(b)}" for n, b in sorted(files.items()))
                              or "none"))
    return "\n".join(lines)


def _bytes(n: object) -> str:
    if not isinstance(n, int):
        return "unknown"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "unknown"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172_800:
        return f"{s // 3600} h"
    return f"{s // 86_400} days"


def render_bundle(result: dict[str, Any]) -> str:
    """``diag bundle`` for people: where it is, what it holds."""
    logs = result.get("logs") or {}
    return (f"bundle {result['bundle']} ({_bytes(result.get('size'))}, mode 600): reports, "
            f"configuration, {logs.get('lines', 0)} log lines"
            + (f" from {logs['source']}" if logs.get("source") else "")
            + (f" ({logs['note']})" if logs.get("note") else "")
            + ("; PERSONAL DATA included (queued records, logs as they are)"
               if result.get("personal_data") else "; no personal data, no key"))
