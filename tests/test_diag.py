"""Technicians' diagnostics: useful, machine-readable, and free of secrets and personal data."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from app import diag as diag_module
from app.assembly import VERSION
from app.state import write_state
from buffer.store import Store, store_path
from core.clock import Clock
from core.record import Reading, Source
from provisioning.identity import create_identity, load_identity
from provisioning.pki import issue_to, make_authority, write_ca
from provisioning.registry import open_registry

REPO = Path(__file__).resolve().parents[1]


def setup(tmp_path: Path) -> Path:
    ident = create_identity(tmp_path / "identity", "gw-diag-0001")
    registry = open_registry(ident)
    registry.pair("T0000CAFE", bytes(range(16)))
    registry.close()
    (tmp_path / "data").mkdir()
    store = Store(store_path(tmp_path / "data"), ident.storage_key)
    sealer = store.sealer(ident.gateway_id, ident.session_key())
    store.commit([sealer.seal(Reading("tag.presence", Source("tag_receiver", "TR-1"),
                                      {"tag": "T0000CAFE", "lat_e7": 468123456}, 1),
                              Clock().timestamp(time.monotonic_ns()))])
    store.close()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
identity_dir = "{tmp_path / 'identity'}"
data_dir = "{tmp_path / 'data'}"
[broker]
host = "127.0.0.1"
tls = false
insecure_plaintext = true
[[devices]]
name = "tags"
kind = "tag_receiver"
path = "/dev/serial/by-id/usb-nothing-here"
[gnss]
path = "/dev/ttyACM0"
# the house on the corner: 46.8123, -71.2145
installed_lat = 46.8123
installed_lon = -71.2145
""")
    return cfg


#: The installed position of setup(), and every textual form it could take.
HOME = (46.8123, -71.2145)


def position_forms() -> list[bytes]:
    forms: list[bytes] = []
    for value in HOME:
        e7 = round(value * 1e7)
        for text in (f"{abs(value):.4f}", f"{abs(value):.4f}".replace(".", ","),  # 46.8123
                     f"{abs(value):.3f}", repr(value), str(abs(e7)), str(abs(e7))[:6],
                     f"{abs(value) * 1e7:.1f}"):
            forms += [text.encode(), text.encode("utf-16-le")]
        forms += [struct.pack(fmt, value) for fmt in ("<d", ">d", "<f", ">f")]
        forms += [struct.pack(fmt, e7) for fmt in ("<i", ">i")]
    return forms


def test_the_bundle_holds_no_installed_position_in_any_form(tmp_path: Path) -> None:
    cfg = str(setup(tmp_path))
    out = tmp_path / "bundle.tar.gz"
    assert diag("bundle", "--config", cfg, "--out", str(out)).returncode == 0
    compressed = out.read_bytes()
    blobs = [compressed, gzip.decompress(compressed)]  # the tar stream: headers and members
    with tarfile.open(out) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    blobs += members.values()
    for form in position_forms():
        for blob in blobs:
            assert form not in blob, f"{form!r} is in the bundle"
    config = json.loads(members["gateway.json"])
    assert config["gnss"]["installed_lat"] == "<redacted: personal data>"
    assert config["gnss"]["path"] == "/dev/ttyACM0"  # the rest is there for the technician
    assert out.stat().st_mode & 0o077 == 0


def diag(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "gateway.py"), "diag", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_buffer_keys_ports_reports(tmp_path: Path) -> None:
    cfg = str(setup(tmp_path))
    buf = json.loads(diag("buffer", "--config", cfg, "--json").stdout)
    assert buf["classes"]["position"]["queued"] == 1
    assert buf["integrity"] == "ok"
    assert buf["last_seq"] == 1
    keys = json.loads(diag("keys", "--config", cfg, "--json").stdout)
    assert keys["gateway_id"] == "gw-diag-0001"
    assert keys["paired_tags"] == 1
    assert keys["ok"] is True
    ports = json.loads(diag("ports", "--config", cfg, "--json").stdout)
    assert ports["tags"]["exists"] is False
    assert "by-id" in ports["tags"]["hint"]
    human = diag("buffer", "--config", cfg)
    assert "position:" in human.stdout


def test_the_bundle_holds_no_secret_and_no_personal_data_unless_asked(tmp_path: Path) -> None:
    cfg = str(setup(tmp_path))
    secrets = [(tmp_path / "identity" / "storage.key").read_bytes(),
               (tmp_path / "identity" / "signing.key").read_bytes(), bytes(range(16))]
    plain = tmp_path / "plain.tar.gz"
    assert diag("bundle", "--config", cfg, "--out", str(plain)).returncode == 0
    with tarfile.open(plain) as tar:
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers())  # type: ignore[union-attr]
    assert b"T0000CAFE" not in blob
    assert b"468123456" not in blob
    assert all(s not in blob and s.hex().encode() not in blob for s in secrets)
    personal = tmp_path / "personal.tar.gz"
    assert diag("bundle", "--config", cfg, "--out", str(personal),
                "--include-personal", "--operator", "Tom Technician").returncode == 0
    with tarfile.open(personal) as tar:
        names = tar.getnames()
        records = tar.extractfile("records.ndjson").read()  # type: ignore[union-attr]
    assert "records.ndjson" in names
    assert b"T0000CAFE" in records


# -- the bundle's reports: versions, uplink, certificate dates, logs (issue 13) -------------------
#: A person reference of the lab, and what the logs of setup_full hold of it and of others.
PERSON = "P-000123"
LOG_LINES = (
    "2026-03-03 14:02:07,001 INFO    gateway: uplink connected to 127.0.0.1:8883",
    "2026-03-03 14:02:08,002 WARNING drivers.tag_receiver: beacon of T0000CAFE rejected",
    f"2026-03-03 14:02:09,003 INFO    drivers.kiosk: check-in person={PERSON} matched",
    "2026-03-03 14:02:10,004 INFO    drivers.gnss: fix lat=46.8123 lon=-71.2145 (9 sats)",
    "2026-03-03 14:02:11,005 DEBUG   smartcorr.trace.serial: tags <- 7e 01 00 42 fe ca 00 00",
    "2026-03-03 14:02:12,006 DEBUG   drivers.nmea: $GPGGA,140212.00,4648.7380,N,07112.8700,W,"
    "1,09,0.9,45.0,M,20.1,M,,*4B",
    "2026-03-03 14:02:13,007 INFO    gateway: home at 46.8123, -71.2145 (installed)",
)


def publish_state(run_dir: Path, state: dict[str, object], for_s: float = 120.0) -> None:
    """Stand in for a running daemon: *state* written now, then again twice a second (with
    a fresh ``written_at_ms``, as the daemon does) for *for_s* seconds or until the
    directory is gone; a state written once would go stale (5 s) on a loaded machine
    before the command under test reads it."""
    write_state(run_dir, state)
    end = time.monotonic() + for_s

    def again() -> None:
        while time.monotonic() < end:
            time.sleep(0.5)
            try:
                write_state(run_dir, {**state, "written_at_ms": time.time_ns() // 1_000_000})
            except OSError:
                return

    threading.Thread(target=again, name="state-publisher", daemon=True).start()


def setup_full(tmp_path: Path) -> Path:
    """setup() with a TLS broker (CA, certificate, key), a queued check-in naming a person,
    a log file, and the state of a running gateway whose uplink retries, with a position
    in it (a later daemon's key: it must not pass)."""
    cfg = setup(tmp_path)
    ident = load_identity(tmp_path / "identity")
    store = Store(store_path(tmp_path / "data"), ident.storage_key)
    sealer = store.sealer(ident.gateway_id, ident.session_key())  # after setup()'s record
    store.commit([sealer.seal(Reading("checkin", Source("kiosk", "KI-1"),
                                      {"person": PERSON, "result": "match"}, 1),
                              Clock().timestamp(time.monotonic_ns()))])
    store.close()
    ident.close()
    ca = make_authority()
    tls = issue_to(tmp_path / "tls", ca, "gw-diag-0001")
    ca_file = write_ca(tmp_path / "tls", ca)
    text = cfg.read_text().replace(
        'tls = false\ninsecure_plaintext = true\n',
        f'ca_file = "{ca_file}"\ncert_file = "{tls.cert}"\nkey_file = "{tls.key}"\n')
    text += f'[paths]\nruntime_dir = "{tmp_path / "run"}"\n'
    cfg.write_text(text)
    (tmp_path / "run").mkdir()
    now_ms = time.time_ns() // 1_000_000
    publish_state(tmp_path / "run", {
        "version": "0.1.0", "pid": os.getpid(), "gateway_id": "gw-diag-0001",
        "started_at_ms": now_ms - 3_600_000, "written_at_ms": now_ms,
        "uplink": {"state": "retrying", "reason": "TLS: unknown CA",
                   "since_ms": now_ms - 120_000, "queued": 2, "queued_by_class": {},
                   "last_ack_ms": None},
        "clock": {"source": "ntp", "trusted": True, "offset_ms": 3},
        "devices": [], "tags": [{"tag": "T0000CAFE", "present": True,
                                 "last_beacon_ms": now_ms, "rssi_dbm": -60, "beacons": 9,
                                 "counter": 9}],
        "gnss": {"fix": True, "sats": 9, "hdop": 0.9, "distance_from_installed_m": 3,
                 "last_fix_ms": now_ms, "lat": 46.8123, "lon": -71.2145,
                 "lat_e7": 468123000, "lon_e7": -712145000},
        "disk": {"store_bytes": 1, "quota_bytes": 2, "free_bytes": 3},
        "last_alarms": [{"seq": 7, "kind": "tag.tamper", "t_ms": now_ms}],
    })
    (tmp_path / "gateway.log").write_text("\n".join(LOG_LINES) + "\n")
    return cfg


def key_forms(tmp_path: Path) -> list[bytes]:
    """The private keys of the setup in every form a file or a report could show: the
    files' bytes, their PEM bodies, the DER and raw bytes, in hex and in base64."""
    forms: list[bytes] = []
    pems = [tmp_path / "identity" / "signing.key", tmp_path / "identity" / "tls.key",
            tmp_path / "tls" / "gw-diag-0001.key"]
    raws = [(tmp_path / "identity" / "storage.key").read_bytes(), bytes(range(16))]
    for pem in pems:
        data = pem.read_bytes()
        body = b"".join(line for line in data.splitlines() if not line.startswith(b"-----"))
        forms += [data, body, *[line for line in data.splitlines()[1:-1] if len(line) > 16]]
        raws.append(base64.b64decode(body))
    for raw in raws:
        forms += [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
                  base64.urlsafe_b64encode(raw).rstrip(b"=")]
    return forms


def bundle_blobs(out: Path) -> tuple[list[bytes], dict[str, bytes]]:
    compressed = out.read_bytes()
    with tarfile.open(out) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    return [compressed, gzip.decompress(compressed), *members.values()], members


def test_the_bundle_says_versions_uplink_certificates_and_logs_in_readable_times(
        tmp_path: Path) -> None:
    cfg = str(setup_full(tmp_path))
    out = tmp_path / "bundle.tar.gz"
    done = diag("bundle", "--config", cfg, "--out", str(out), "--log-file",
                str(tmp_path / "gateway.log"))
    assert done.returncode == 0, done.stderr
    assert "7 log lines from file" in done.stdout
    _, members = bundle_blobs(out)
    assert set(members) == {"reports.json", "gateway.json", "logs.txt"}
    reports = json.loads(members["reports.json"])
    utc = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
    assert utc.match(reports["created"])
    assert reports["version"]["gateway"] == VERSION
    assert reports["version"]["daemon"] == "0.1.0"
    assert reports["daemon"]["running"] is True
    assert utc.match(reports["daemon"]["started"])
    assert reports["uplink"]["state"] == "retrying"
    assert reports["uplink"]["reason"] == "TLS: unknown CA"
    assert utc.match(reports["uplink"]["since"])
    assert "since_ms" not in reports["uplink"]
    client, ca = reports["certificates"]
    assert (client["role"], client["subject"]) == ("client", "CN=gw-diag-0001")
    assert utc.match(client["not_before"])
    assert utc.match(client["not_after"])
    assert 390 <= client["days_left"] <= 397
    assert ca["role"] == "ca"
    assert reports["status"]["tags"] == {"listed": 1, "total": 1, "present": 1, "absent": 0}
    assert reports["status"]["gnss"]["sats"] == 9
    assert reports["status"]["last_alarms"][0]["kind"] == "tag.tamper"
    assert reports["logs"] == {"source": "file", "lines": 7, "file": "logs.txt",
                               "redacted": True, "note": None}
    logs = members["logs.txt"].decode()
    assert "gateway: uplink connected to 127.0.0.1:8883" in logs
    assert "beacon of <tag> rejected" in logs
    assert "person=<person> matched" in logs
    assert "fix lat=<position> lon=<position> (9 sats)" in logs
    assert "<raw serial trace withheld: personal data>" in logs
    assert "<NMEA sentence withheld>" in logs
    assert "home at <position> (installed)" in logs
    assert "None" not in diag("buffer", "--config", cfg).stdout


def test_the_bundle_holds_no_key_person_or_position_unless_asked(tmp_path: Path) -> None:
    cfg = str(setup_full(tmp_path))
    log = str(tmp_path / "gateway.log")
    out = tmp_path / "bundle.tar.gz"
    assert diag("bundle", "--config", cfg, "--out", str(out), "--log-file", log,
                "--json").returncode == 0
    blobs, _ = bundle_blobs(out)
    personal = [PERSON.encode(), b"T0000CAFE", b"0000cafe", b"7e 01 00 42", b"4648.738",
                b"07112.870", *position_forms()]
    for form in [*key_forms(tmp_path), *personal]:
        for blob in blobs:
            assert form not in blob, f"{form[:40]!r} is in the bundle"
    asked = tmp_path / "personal.tar.gz"
    done = diag("bundle", "--config", cfg, "--out", str(asked), "--log-file", log,
                "--include-personal", "--operator", "Tom Technician")
    assert done.returncode == 0, done.stderr
    blobs, members = bundle_blobs(asked)
    assert PERSON.encode() in members["records.ndjson"]
    assert f"person={PERSON}".encode() in members["logs.txt"]
    assert b"T0000CAFE" in members["reports.json"]  # the tags, listed when asked
    for form in key_forms(tmp_path):
        for blob in blobs:
            assert form not in blob, f"{form[:40]!r} is in the bundle"
    for blob in blobs:  # a later daemon's position key never passes the allowlist
        assert b"468123000" not in blob


def test_recent_logs_are_bounded_in_lines_and_length(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    log.write_text("".join(f"line {n}\n" for n in range(50)) + "x" * 5000 + "\n")
    logs = diag_module.recent_logs(log, 3)
    assert logs.source == "file"
    assert logs.lines[:2] == ["line 48", "line 49"]
    assert logs.lines[2] == "x" * diag_module.MAX_LOG_LINE_CHARS


def test_recent_logs_come_from_journald_as_readable_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """journalctl's JSON output (a program of that name on PATH answers as journald does,
    its arguments written down) becomes lines with UTC times and level names."""
    entries = [
        {"__REALTIME_TIMESTAMP": "1741010527000000", "PRIORITY": "4",
         "MESSAGE": "uplink refuses to connect: TLS: unknown CA", "_CMDLINE": "secret argv"},
        {"__REALTIME_TIMESTAMP": "1741010528000000", "PRIORITY": "6",
         "MESSAGE": list(b"not UTF-8 \xff here")},
        {"__REALTIME_TIMESTAMP": "1741010529000000", "PRIORITY": "3"},  # no message: left out
    ]
    journal = tmp_path / "journal.json"
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    program = tmp_path / "bin" / "journalctl"
    program.parent.mkdir()
    program.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "argv"}\ncat {journal}\n')
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{program.parent}:{os.environ['PATH']}")
    logs = diag_module.recent_logs(None, 100)
    assert (tmp_path / "argv").read_text().split() == [
        "-u", "smartcorr-gateway", "-n", "100", "-o", "json", "--no-pager", "-q"]
    assert logs.source == "journald"
    assert logs.lines == [
        "2025-03-03T14:02:07Z warning uplink refuses to connect: TLS: unknown CA",
        "2025-03-03T14:02:08Z info not UTF-8 \ufffd here"]
    journal.write_text("")
    empty = diag_module.recent_logs(None, 100)
    assert (empty.source, empty.lines) == ("journald", [])
    assert "no entries for the unit smartcorr-gateway" in (empty.note or "")
